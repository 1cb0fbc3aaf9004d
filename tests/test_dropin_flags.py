"""Drop-in compatibility with diffusers' DreamBooth-LoRA scripts.

Every flag of diffusers' train_dreambooth_lora.py, train_dreambooth_lora_sdxl.py and train_dreambooth_lora_flux.py
(the lists in tests/data/diffusers_flags, each naming the diffusers commit it was read from; extract.py there
regenerates them) must parse here, or stop with exit status 2 and one line naming it. Parsing only: no model loads,
except in the one short training run that checks the validation schedule and --repeats.
"""

import ast
import importlib.machinery
import importlib.util
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import train_args

import train_cat_lora as T

DATA = Path(__file__).resolve().parent / "data" / "diffusers_flags"
SCRIPTS = ["train_dreambooth_lora", "train_dreambooth_lora_sdxl", "train_dreambooth_lora_flux",
           "train_dreambooth_lora_sd3", "train_dreambooth_lora_qwen_image", "train_dreambooth_lora_z_image",
           "train_dreambooth_lora_flux2", "train_dreambooth_lora_flux2_klein"]
MINIMAL = ["--pretrained_model_name_or_path", "base-model", "--instance_data_dir", "images",
           "--instance_prompt", "a photo of sks dog", "--trigger_token", "sks"]

# What this script refuses outright: each flag stops the parse with one line saying why.
REFUSED = {"--do_edm_style_training", "--use_dora", "--text_encoder_use_attention_mask", "--validation_images",
           "--class_labels_conditioning", "--enable_npu_flash_attention", "--do_fp8_training", "--remote_text_encoder",
           "--offload", "--use_aspect_ratio_buckets", "--aspect_ratio_buckets",
           "--caption_dropout", "--final_validation_prompt", "--pretrained_tokenizer_4_name_or_path",
           "--pretrained_text_encoder_4_name_or_path"}
# Accepted, but only usable with an optional package; without it: one line naming the flag.
NEEDS_PACKAGE = {"--enable_xformers_memory_efficient_attention": "xformers"}
# Parsed for the model families that give them their meaning (ModelFamily.flags).
FAMILY = {"--pretrained_vae_model_name_or_path", "--max_sequence_length", "--guidance_scale", "--weighting_scheme",
          "--logit_mean", "--logit_std", "--mode_scale", "--lora_layers", "--upcast_before_saving",
          "--precondition_outputs", "--lora_blocks", "--text_encoder_out_layers"}
# A value that makes sense for flags whose value is checked while parsing.
VALUES = {"--resolution": "64", "--resume_from_checkpoint": "latest", "--optimizer": "AdamW", "--report_to": "none",
          "--lr_scheduler": "constant", "--lora_dropout": "0.1"}
# Flags that need others to be valid, here as in diffusers.
COMPANIONS = {"--with_prior_preservation": ["--class_data_dir", "class-images", "--class_prompt", "a photo of dog"]}

# Defaults that differ from diffusers' for a flag with the same meaning, and why. Per script.
SHARED_DIFFERENCES = {
    "--output_dir": "this script's own output name",
    "--lr_warmup_steps": "0 as in the paper (A.2) and in every LoRA command of diffusers' READMEs",
    "--validation_epochs": "validation defaults to every --validation_steps 100 (one of the two schedules)",
}
# Family flags whose default is the family's own: None here, the family's diffusers script's value when it runs.
FAMILY_DEFAULTS = {
    "--max_sequence_length": "None: the family's own (Flux.1 512, SD3 77, Qwen-Image, Z-Image and FLUX.2 512)",
    "--weighting_scheme": "None: the family's own (SD3 logit_normal, the others none)",
}
# Against the transformer families' scripts (they share the SDXL script's optimizer defaults).
TRANSFORMER_DIFFERENCES = {
    **SHARED_DIFFERENCES,
    "--adam_weight_decay": "train_dreambooth_lora.py's 1e-2 (the paper's); the transformer scripts use 1e-4",
    "--text_encoder_lr": "None: --learning_rate, as train_dreambooth_lora.py trains the text encoder",
    "--adam_weight_decay_text_encoder": "None: --adam_weight_decay, as in train_dreambooth_lora.py",
}
DIFFERENT_DEFAULTS = {
    "train_dreambooth_lora": {**SHARED_DIFFERENCES,
                              "--learning_rate": "1e-4, the paper's (A.2) and diffusers' README command's"},
    "train_dreambooth_lora_sdxl": {
        **SHARED_DIFFERENCES,
        "--resolution": "512 for SD 1.x; the SDXL family sets its own",
        "--adam_weight_decay": "train_dreambooth_lora.py's 1e-2 (the paper's); the SDXL script uses 1e-4",
        "--text_encoder_lr": "None: --learning_rate, as train_dreambooth_lora.py trains the text encoder",
        "--adam_weight_decay_text_encoder": "None: --adam_weight_decay, as in train_dreambooth_lora.py",
    },
    "train_dreambooth_lora_flux": {
        **SHARED_DIFFERENCES,
        "--adam_weight_decay": "train_dreambooth_lora.py's 1e-2 (the paper's); the Flux script uses 1e-4",
        "--text_encoder_lr": "None: --learning_rate, as train_dreambooth_lora.py trains the text encoder",
        "--adam_weight_decay_text_encoder": "None: --adam_weight_decay, as in train_dreambooth_lora.py",
        "--lora_alpha": "None: the rank, as diffusers' SD and SDXL scripts; Flux's fixed 4 differs from rank > 4",
        **FAMILY_DEFAULTS,
    },
    "train_dreambooth_lora_sd3": {**TRANSFORMER_DIFFERENCES, **FAMILY_DEFAULTS},
    "train_dreambooth_lora_qwen_image": {**SHARED_DIFFERENCES, **FAMILY_DEFAULTS,
                                         "--adam_weight_decay": TRANSFORMER_DIFFERENCES["--adam_weight_decay"],
                                         "--lora_alpha": "None: the rank; the Qwen-Image script's fixed 4 differs from "
                                                         "rank > 4"},
    "train_dreambooth_lora_z_image": {**TRANSFORMER_DIFFERENCES, **FAMILY_DEFAULTS,
                                      "--lora_alpha": "None: the rank; the script's fixed 4 differs from rank > 4"},
    "train_dreambooth_lora_flux2": {**TRANSFORMER_DIFFERENCES, **FAMILY_DEFAULTS,
                                    "--lora_alpha": "None: the rank; the script's fixed 4 differs from rank > 4",
                                    "--text_encoder_out_layers": "None: the pipeline's own (10 20 30 for [dev])"},
    "train_dreambooth_lora_flux2_klein": {
        **TRANSFORMER_DIFFERENCES, **FAMILY_DEFAULTS,
        "--lora_alpha": "None: the rank; the script's fixed 4 differs from rank > 4",
        "--text_encoder_out_layers": "None: the pipeline's own, 9 18 27, which it reads at inference (the script's "
                                     "10 20 30 would train the LoRA on other features than it is used with)"},
}


def read_flags(script: str) -> tuple[str, list[dict]]:
    """(header naming the diffusers commit, rows) of a flag list."""
    lines = (DATA / f"{script}.txt").read_text(encoding="utf-8").splitlines()
    rows = []
    for line in lines:
        if line.startswith("#"):
            continue
        flag, kind, default, choices, required, help_text = line.split("\t")
        rows.append({"flag": flag, "kind": kind, "default": ast.literal_eval(default),
                     "choices": ast.literal_eval(choices) if choices else None, "help": help_text})
    return lines[0], rows


ALL_FLAGS = {row["flag"]: row for script in SCRIPTS for row in read_flags(script)[1]}


def argv_with(row: dict) -> list[str]:
    """The minimal command plus ``row``'s flag with a valid value of its kind."""
    flag, kind = row["flag"], row["kind"]
    base = list(MINIMAL)
    if flag == "--dataset_name":  # an alternative to --instance_data_dir, not an addition
        base = base[:2] + base[4:]
    if kind == "store_true":
        values = []
    elif flag in VALUES:
        values = [VALUES[flag]]
    elif row["choices"]:
        values = [row["choices"][0]]
    else:
        values = {"int": ["2"], "float": ["0.5"], "bool": ["True"], "str": ["text"], "str+": ["a.png", "b.png"],
                  "int+": ["1", "2"]}[kind]
    return base + COMPANIONS.get(flag, []) + [flag, *values]


def parse(argv: list[str], capsys):
    """("ok", args), ("refused", message) or ("argparse", what argparse printed)."""
    try:
        return "ok", T.parse_args(argv)
    except T.InputError as error:
        return "refused", str(error)
    except SystemExit:
        return "argparse", capsys.readouterr().err


def test_flag_lists_name_their_diffusers_commit():
    for script in SCRIPTS:
        header, rows = read_flags(script)
        assert re.match(rf"# diffusers [0-9a-f]{{40}} \(\d{{4}}-\d\d-\d\d\) examples/dreambooth/{script}\.py$", header)
        assert len(rows) > 50 and len({row["flag"] for row in rows}) == len(rows)


@pytest.mark.parametrize("flag", sorted(ALL_FLAGS))
def test_every_diffusers_flag_is_accepted_or_refused_in_one_line(flag, capsys):
    row = ALL_FLAGS[flag]
    outcome, result = parse(argv_with(row), capsys)
    assert outcome != "argparse", f"{flag}: argparse rejected it:\n{result}"
    if flag in REFUSED or (flag in NEEDS_PACKAGE and importlib.util.find_spec(NEEDS_PACKAGE[flag]) is None):
        assert outcome == "refused", f"{flag} should be refused"
        assert result.startswith(flag) and "\n" not in result
        return
    assert outcome == "ok", f"{flag}: {result}"
    value = getattr(result, flag[2:])
    if row["kind"] == "store_true":
        assert value is True
    elif row["kind"] in ("int", "float"):
        assert value == float(argv_with(row)[-1])  # parsed as a number
    elif flag not in VALUES and not row["choices"] and row["kind"] == "str":
        assert value == "text"


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_refused_flags_exit_2_with_one_line_before_any_model_loads(flag, capsys):
    assert T.cli(argv_with(ALL_FLAGS[flag])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"train_cat_lora.py: error: {flag} is not supported: ")


def test_refusal_from_the_command_line(tmp_path):
    script = Path(T.__file__)
    result = subprocess.run([sys.executable, str(script), *MINIMAL, "--do_edm_style_training"], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 2
    reason = T.REFUSED_FLAGS["--do_edm_style_training"][1]
    assert result.stderr.splitlines() == [
        f"train_cat_lora.py: error: --do_edm_style_training is not supported: {reason}"]


def test_help_lists_refused_and_family_flags():
    text = T.build_parser().format_help()
    for flag in REFUSED:
        assert re.search(rf"{flag}\b[^\n]*\n?\s*\[not supported\]", text), flag
    helps = {action.dest: action.help for action in T.build_parser()._actions}
    for dest in T.FAMILY_FLAGS:  # each family flag's help names the families that read it
        readers = [family.label for family in T.FAMILIES.values() if family.reads(dest)]
        assert readers and helps[dest].startswith(", ".join(readers) + ": "), dest
    assert set(T.REFUSED_FLAGS) == REFUSED
    assert {f"--{dest}" for dest in T.FAMILY_FLAGS} == FAMILY


def test_the_lists_cover_what_this_test_classifies():
    assert REFUSED | FAMILY | set(NEEDS_PACKAGE) <= set(ALL_FLAGS)


def readme_command(script: str) -> list[str]:
    """The README's first LoRA command for ``script``: its flags after the script name, variables expanded."""
    text = (DATA / f"{script}.readme_command.txt").read_text(encoding="utf-8")
    exports = dict(re.findall(r"^export (\w+)=(.*)$", text, flags=re.M))
    command = "\n".join(line for line in text.splitlines() if not line.startswith(("#", "export ")))
    command = re.sub(r"\$(\w+)", lambda match: shlex.split(exports[match.group(1)])[0], command)
    words = shlex.split(command.replace("\\\n", " "))  # join the continued lines
    return words[words.index(f"{script}.py") + 1:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_readme_first_lora_command_parses_with_the_trigger_added(script, monkeypatch):
    argv = readme_command(script) + ["--trigger_token", "sks"]
    assert "--validation_epochs=50" in argv or script != "train_dreambooth_lora"
    refused = [word.split("=")[0] for word in argv if word.split("=")[0] in REFUSED]
    if refused:  # FLUX.2's commands ask for float8 training (and [dev]'s for a remote text encoder)
        with pytest.raises(T.InputError, match=f"^{refused[0]} is not supported: "):
            T.parse_args(argv)
        argv = [word for word in argv if word.split("=")[0] not in REFUSED]
    assert refused == {"train_dreambooth_lora_flux2": ["--do_fp8_training", "--remote_text_encoder"],
                       "train_dreambooth_lora_flux2_klein": ["--do_fp8_training"]}.get(script, [])
    for flag, package in (("--report_to=wandb", "wandb"), ("--optimizer=prodigy", "prodigyopt")):
        if flag not in argv or importlib.util.find_spec(package) is not None:
            continue
        # As in diffusers' script, the command needs the package; here it says so in one line before anything loads.
        with pytest.raises(T.InputError, match=rf"^{flag.replace('=', ' ')} needs the {package} package"):
            T.parse_args(argv)
        fake = types.ModuleType(package)  # stands in for the installed package
        fake.__spec__ = importlib.machinery.ModuleSpec(package, None)
        monkeypatch.setitem(sys.modules, package, fake)
    args = T.parse_args(argv)
    assert args.trigger_token == "sks" and args.validation_prompt == "A photo of sks dog in a bucket"
    if script == "train_dreambooth_lora":
        assert (args.validation_epochs, args.validation_steps) == (50, None)
    else:
        assert args.validation_epochs == 25


@pytest.mark.parametrize("script", SCRIPTS)
def test_defaults_equal_diffusers_where_the_meaning_is_the_same(script):
    parser = T.build_parser()
    differ = {}
    for row in read_flags(script)[1]:
        flag = row["flag"]
        if flag in REFUSED:
            continue
        ours = parser.get_default(flag[2:])
        if ours != row["default"]:
            differ[flag] = (row["default"], ours)
    assert set(differ) == set(DIFFERENT_DEFAULTS[script]), differ


def test_interpolation_choices_are_torchvisions():
    from torchvision import transforms

    names = sorted(name.lower() for name in dir(transforms.InterpolationMode) if not name.startswith("__"))
    assert sorted(T.INTERPOLATION_MODES) == names


@pytest.mark.parametrize("flags, message", [
    (("--validation_steps", "10", "--validation_epochs", "2"), "give --validation_steps or --validation_epochs"),
    (("--optimizer", "sgd"), "--optimizer sgd: expected AdamW or prodigy"),
    (("--lora_dropout", "1"), "--lora_dropout must be in"),
    (("--repeats", "0"), "--repeats must be positive"),
    (("--prodigy_decouple", "maybe"), None),
])
def test_bad_values_of_new_flags(flags, message, capsys):
    outcome, result = parse(MINIMAL + list(flags), capsys)
    if message is None:
        assert outcome == "argparse" and "--prodigy_decouple: expected true or false, got 'maybe'" in result
    else:
        assert outcome == "refused" and result.startswith(message)


def test_prodigy_switches_read_false_as_false(capsys):
    args = T.parse_args(MINIMAL + ["--prodigy_decouple", "False", "--prodigy_safeguard_warmup", "0"])
    assert args.prodigy_decouple is False and args.prodigy_safeguard_warmup is False
    assert args.prodigy_use_bias_correction is True


def test_dataset_without_caption_column_captions_every_image_with_the_instance_prompt(capsys):
    base = ["--pretrained_model_name_or_path", "m", "--dataset_name", "d", "--trigger_token", "sks"]
    assert parse(base, capsys) == ("refused", "--dataset_name needs --caption_column (captions from the dataset) "
                                              "or --instance_prompt")
    assert T.parse_args(base + ["--instance_prompt", "a sks dog"]).caption_column is None


def test_dataset_captions_follow_caption_column(tmp_path):
    import json

    from conftest import draw_subject

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        draw_subject(data / f"{i}.png", shift=i)
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"sks teapot {i}"}) + "\n"
                                                 for i in range(2)))
    base = ["--pretrained_model_name_or_path", "m", "--dataset_name", str(data), "--trigger_token", "sks",
            "--cache_dir", str(tmp_path / "cache")]
    args = T.parse_args(base + ["--instance_prompt", "a photo of sks dog"])
    assert [e.caption for e in T.collect_instance_examples(args, T.load_concepts(args))] == ["a photo of sks dog"] * 2
    assert any((tmp_path / "cache").iterdir())  # --cache_dir: where datasets cached it
    args = T.parse_args(base + ["--caption_column", "text"])
    assert sorted(e.caption for e in T.collect_instance_examples(args, T.load_concepts(args))) == [
        "sks teapot 0", "sks teapot 1"]
    args = T.parse_args(base + ["--caption_column", "prompt", "--instance_prompt", "a photo of sks dog"])
    with pytest.raises(T.InputError, match="^--caption_column 'prompt' is not a column of"):
        T.collect_instance_examples(args, T.load_concepts(args))


def test_validation_schedules():
    def due(steps_per_epoch, max_steps, **flags):
        args = T.parse_args(MINIMAL + [x for k, v in flags.items() for x in (f"--{k}", str(v))]
                            + ["--max_train_steps", str(max_steps)])
        return [s for s in range(1, max_steps + 1) if T.validation_due(args, s, steps_per_epoch, max_steps)]

    assert due(3, 10) == [10]  # --validation_steps 100 by default; always after the last step
    assert due(3, 10, validation_steps=4) == [4, 8, 10]
    # diffusers validates after epoch indices 0, N, 2N, ...: epochs 1, 1+N, ... counted from 1
    assert due(3, 20, validation_epochs=2) == [3, 9, 15, 20]
    assert due(3, 20, validation_epochs=1) == [3, 6, 9, 12, 15, 18, 20]
    # the step count derived from --num_train_epochs (no --max_train_steps): still validated after the last step
    args = T.parse_args(MINIMAL + ["--num_train_epochs", "3", "--validation_steps", "4"])
    assert [s for s in range(1, 10) if T.validation_due(args, s, 3, 9)] == [4, 8, 9]


def test_text_encoder_lr_and_decay_make_a_second_parameter_group():
    import torch

    unet_params, text_params = [torch.nn.Parameter(torch.zeros(1))], [torch.nn.Parameter(torch.zeros(1))]
    args = T.parse_args(MINIMAL + ["--train_text_encoder"])
    assert T.optimizer_parameter_groups(args, unet_params, text_params, args.learning_rate) == unet_params + text_params
    args = T.parse_args(MINIMAL + ["--train_text_encoder", "--text_encoder_lr", "5e-6"])
    optimizer = T.make_optimizer(args, T.optimizer_parameter_groups(args, unet_params, text_params, args.learning_rate), args.learning_rate)
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(1e-4, 1e-2), (5e-6, 1e-2)]
    args = T.parse_args(MINIMAL + ["--train_text_encoder", "--adam_weight_decay_text_encoder", "1e-3"])
    optimizer = T.make_optimizer(args, T.optimizer_parameter_groups(args, unet_params, text_params, args.learning_rate), args.learning_rate)
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(1e-4, 1e-2), (1e-4, 1e-3)]


def test_fused_adamw_makes_the_same_update_as_the_default_kernel():
    # make_optimizer(fused=True) (what the training run asks for on CPU and CUDA) must build the fused optimizer, and
    # its steps must match the per-tensor implementation's.
    import torch

    args = T.parse_args(MINIMAL + ["--adam_weight_decay", "0.01"])
    params = {}
    for fused in (False, True):
        generator = torch.Generator().manual_seed(0)
        tensors = [torch.nn.Parameter(torch.randn(4, 8, generator=generator)) for _ in range(3)]
        optimizer = T.make_optimizer(args, tensors, 1e-2, fused=fused)
        assert bool(optimizer.defaults["fused"]) == fused
        for _ in range(5):
            for p in tensors:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        params[fused] = [p.detach().clone() for p in tensors]
    for default, fused in zip(params[False], params[True]):
        torch.testing.assert_close(default, fused, rtol=1e-5, atol=1e-6)


def test_prodigy_gets_diffusers_settings_and_one_learning_rate(monkeypatch):
    import torch

    class RecordingProdigy:  # stands in for prodigyopt.Prodigy, which is not a dependency
        def __init__(self, params, **settings):
            self.params, self.settings = params, settings

    fake = types.ModuleType("prodigyopt")
    fake.__spec__ = importlib.machinery.ModuleSpec("prodigyopt", None)
    fake.Prodigy = RecordingProdigy
    monkeypatch.setitem(sys.modules, "prodigyopt", fake)
    args = T.parse_args(MINIMAL + ["--optimizer", "Prodigy", "--learning_rate", "1.0", "--train_text_encoder",
                                   "--text_encoder_lr", "5e-6", "--prodigy_beta3", "0.99", "--prodigy_decouple",
                                   "false", "--adam_weight_decay", "1e-4"])
    unet_params, text_params = [torch.nn.Parameter(torch.zeros(1))], [torch.nn.Parameter(torch.zeros(1))]
    optimizer = T.make_optimizer(args, T.optimizer_parameter_groups(args, unet_params, text_params, args.learning_rate), args.learning_rate)
    assert optimizer.params == unet_params + text_params  # Prodigy: --learning_rate for the text encoder too
    assert optimizer.settings == {"lr": 1.0, "betas": (0.9, 0.999), "beta3": 0.99, "weight_decay": 1e-4,
                                  "eps": 1e-8, "decouple": False, "use_bias_correction": True,
                                  "safeguard_warmup": True}
    with pytest.raises(T.InputError, match="^--use_8bit_adam applies to AdamW"):
        T.parse_args(MINIMAL + ["--optimizer", "prodigy", "--use_8bit_adam"])


def test_prior_generation_precision():
    import torch

    assert T.prior_generation_dtype(None, torch.bfloat16) == torch.bfloat16
    assert [T.prior_generation_dtype(p, torch.bfloat16) for p in ("no", "fp32", "fp16", "bf16")] == [
        torch.float32, torch.float32, torch.float16, torch.bfloat16]


def test_image_interpolation_mode_changes_the_resize():
    import torch
    from PIL import Image

    image = Image.effect_noise((48, 48), 64).convert("RGB")
    lanczos, _, _ = T.augment(image, 32, True, False, None, "lanczos")
    nearest, _, _ = T.augment(image, 32, True, False, None, "nearest")
    assert lanczos.shape == nearest.shape == (3, 32, 32) and not torch.equal(lanczos, nearest)


def test_tokenizer_flags(tiny_pipeline):
    from argparse import Namespace

    def tokenizer(**flags):
        family = T.model_family(Namespace(pretrained_model_name_or_path=tiny_pipeline, **flags))
        return family.load_tokenizers()["tokenizer"]

    assert tokenizer(tokenizer_max_length=20).model_max_length == 20
    assert tokenizer(tokenizer_name=str(Path(tiny_pipeline) / "tokenizer")).model_max_length == 77
    with pytest.raises(T.InputError, match="--tokenizer_max_length 100 exceeds the tokenizer's limit of 77"):
        tokenizer(tokenizer_max_length=100)


@pytest.mark.parametrize("pipeline", ["tiny_qwenimage_pipeline", "tiny_zimage_pipeline", "tiny_flux2_klein_pipeline",
                                      "tiny_flux2_pipeline"])
def test_tokenizer_max_length_is_refused_where_max_sequence_length_cuts_the_prompt(pipeline, request):
    """These families' only tokenizer reads --max_sequence_length tokens, which used to overwrite (or, FLUX.2 [dev],
    ignore) --tokenizer_max_length silently."""
    from argparse import Namespace

    family = T.model_family(Namespace(pretrained_model_name_or_path=request.getfixturevalue(pipeline)))
    args = T.parse_args(MINIMAL + ["--tokenizer_max_length", "16"])
    with pytest.raises(T.InputError, match=r"^--tokenizer_max_length: .* --max_sequence_length \(\d+\); set that"):
        T.check_family_options(args, family)
    T.check_family_options(T.parse_args(MINIMAL), family)


def test_tokenizer_name_reaches_flux2_devs_processor(tiny_flux2_pipeline, tmp_path):
    from argparse import Namespace

    family = T.model_family(Namespace(pretrained_model_name_or_path=tiny_flux2_pipeline))
    processor = family.load_tokenizers()["tokenizer"]
    processor.tokenizer.add_tokens(["<only-in-the-copy>"])
    processor.save_pretrained(tmp_path / "processor")
    for name, expected in ((None, False), (str(tmp_path / "processor"), True)):
        family = T.model_family(Namespace(pretrained_model_name_or_path=tiny_flux2_pipeline, tokenizer_name=name))
        tokenizer = family.load_tokenizers()["tokenizer"].tokenizer
        assert ("<only-in-the-copy>" in tokenizer.get_vocab()) == expected


def test_caption_limit_counts_the_special_tokens_each_tokenizer_adds(tiny_flux_pipeline):
    """CLIP wraps a caption in a start and an end token, T5 adds only its end token: Flux.1's T5 reads
    --max_sequence_length - 1 caption tokens (it was taken for - 2), its CLIP 77 - 2."""
    from argparse import Namespace

    family = T.model_family(Namespace(pretrained_model_name_or_path=tiny_flux_pipeline, max_sequence_length=32))
    tokenizers = family.load_tokenizers()
    assert family.caption_token_limit("tokenizer") == tokenizers["tokenizer"].model_max_length - 2 == 75
    t5 = tokenizers["tokenizer_2"]
    assert family.caption_token_limit("tokenizer_2") == 31
    words = " ".join(["teapot"] * 40)
    ids = t5(words, add_special_tokens=False).input_ids[:31]
    caption = t5.decode(ids)
    assert len(t5(caption, max_length=32, truncation=True).input_ids) == 32  # 31 caption tokens + </s>: all read
    assert t5(caption).input_ids[-1] == t5.eos_token_id and t5(caption).input_ids[0] != t5.eos_token_id


@pytest.mark.parametrize("flag, value, message", [
    ("--lr_scheduler", "cosin", "argument --lr_scheduler: invalid choice: 'cosin'"),
    ("--report_to", "tensorbord", "argument --report_to: invalid choice: 'tensorbord'"),
])
def test_scheduler_and_tracker_typos_are_one_line_before_anything_loads(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        T.cli(MINIMAL + ["--output_dir", str(tmp_path / "out"), flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_tracker_without_its_package_is_one_line(tmp_path):
    from importlib.util import find_spec

    missing = [name for name in T.TRACKERS if name not in ("all", "none") and find_spec(name) is None]
    if not missing:
        pytest.skip("every tracker package is installed here")
    with pytest.raises(T.InputError, match=f"^--report_to {missing[0]} needs the {missing[0]} package"):
        T.parse_args(MINIMAL + ["--output_dir", str(tmp_path / "out"), "--report_to", missing[0]])


def test_validation_epochs_repeats_and_lora_dropout_in_a_run(tiny_pipeline, tmp_path, run_training):
    """1 image x --repeats 2 at batch 1: 2 steps per epoch. --validation_epochs 2 over 5 steps validates after
    epoch 1 (step 2) and the last step (5), not after epoch 2 (step 4); without the repeats it would be 1, 3, 5."""
    import json

    from conftest import draw_subject
    from safetensors import safe_open

    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    draw_subject(images / "0.png", shift=0)
    run_training(train_args(tiny_pipeline, images, out, "--train_batch_size", "1", "--repeats", "2", "--cat_alpha",
                            "0", "--validation_prompt", "a sks teapot", "--validation_epochs", "2",
                            "--num_validation_images", "1", "--num_validation_inference_steps", "1",
                            "--lora_dropout", "0.25", "--image_interpolation_mode", "bicubic", steps=5))
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-2.png", "step-5.png"]
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as weights:
        assert json.loads(weights.metadata()["lora_adapter_metadata"])["unet.lora_dropout"] == 0.25


def test_validation_samples_in_eval_mode_and_training_resumes_in_train_mode(tiny_pipeline, instance_dir, tmp_path,
                                                                             run_training):
    """With --lora_dropout the validation grid must be drawn without dropout: every U-Net call under no_grad
    (--cat_alpha 0 has no frozen pass, so those are the validation's) runs in eval mode, every training call in
    train mode, also after a validation in the middle of the run."""
    import torch
    from conftest import watch_forward
    from diffusers import UNet2DConditionModel

    calls = []
    with watch_forward(UNet2DConditionModel, lambda unet: calls.append((torch.is_grad_enabled(), unet.training))):
        run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "out", "--cat_alpha", "0", "--lora_dropout",
                                "0.5", "--validation_prompt", "a sks teapot", "--validation_steps", "1",
                                "--num_validation_images", "1", "--num_validation_inference_steps", "1", steps=2))
    assert [grad for grad, _ in calls] == [True, False, False, True, False, False]  # step, 2 rows, step, 2 rows
    assert all(training == grad for grad, training in calls), calls


def test_the_flags_page_lists_every_flag_as_accepted_family_or_refused():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "flags.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Everything else you know from"):readme.index("### Outputs")]
    accepted = set(re.findall(r"--\w+", section[section.index("Accepted with"):section.index("plus this script")]))
    family_part = section[section.index("for the families that read them"):section.index("Refused, each")]
    family = set(re.findall(r"--\w+", family_part[:family_part.index("Given to a model")]))
    refused = set(re.findall(r"^\| `(--\w+)`", section, flags=re.M))
    assert (family - {"--help"}, refused) == (FAMILY, REFUSED)
    assert accepted == set(ALL_FLAGS) - FAMILY - REFUSED - {"--pretrained_model_name_or_path", "--instance_data_dir",
                                                            "--instance_prompt", "--output_dir", "--seed"}
