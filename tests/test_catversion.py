"""--adapter catversion: learned key/value tokens in the text encoder's last self-attention layers (CatVersion,
arXiv 2311.14631) on the tiny SD pipeline: what trains, the adapter off is the base model, the attention to the
tokens, the CAT term, resume, two processes, bad input, evaluate_kps."""

import json
import os
import shutil
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, component_class, train_args, watch_forward
from safetensors.torch import load_file

import train_cat_lora as T

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
IDS = [[49406, 320, 1125, 539, 49407, 49407], [49406, 320, 49407, 49407, 49407, 49407]]


def catversion_args(pipeline, data, output, *extra, steps=4):
    """The tiny pipeline's fast command line for CatVersion: the caption names the class word, which is CAT's
    trigger."""
    return train_args(pipeline, data, output, "--adapter", "catversion", "--instance_prompt", "a photo of teapot",
                      "--trigger_token", "teapot", "--learning_rate", "1e-2", *extra, steps=steps)


def text_encoder(pipeline: str, attention: str = "sdpa"):
    model = component_class(pipeline, "text_encoder").from_pretrained(pipeline, subfolder="text_encoder")
    model.set_attn_implementation(attention)
    return model.requires_grad_(False)


def test_only_the_learned_tokens_train(tiny_pipeline, instance_dir, tmp_path, run_training):
    """Every parameter but the learned tokens stays bit-identical; the tokens move; only they require grad."""
    ran = {}

    def keep(module):
        ran.setdefault(type(module).__name__, module)

    kinds = tuple(component_class(tiny_pipeline, name) for name in ("text_encoder", "unet"))
    with watch_forward(kinds, keep):
        run_training(catversion_args(tiny_pipeline, instance_dir, tmp_path / "out", "--cat_alpha", "1", steps=3))
    unet, encoder = ran[kinds[1].__name__], ran[kinds[0].__name__]
    assert not [name for name, p in unet.named_parameters() if p.requires_grad]
    trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith(".residual") for name in trainable), trainable
    base_unet = component_class(tiny_pipeline, "unet").from_pretrained(tiny_pipeline, subfolder="unet").state_dict()
    assert all(torch.equal(v, base_unet[k]) for k, v in unet.state_dict().items())
    base_encoder = text_encoder(tiny_pipeline).state_dict()
    trained = {k.replace(".attention.", "."): v for k, v in encoder.state_dict().items() if "residual" not in k}
    assert trained.keys() == base_encoder.keys()
    assert all(torch.equal(v, base_encoder[k]) for k, v in trained.items())
    initial = T.CatVersion.attach(text_encoder(tiny_pipeline), seed=0).state_dict()
    saved = load_file(tmp_path / "out" / T.CATVERSION_WEIGHT_NAME)
    assert saved.keys() == initial.keys() and not any(torch.equal(saved[k], initial[k]) for k in saved)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_adapter_off_is_the_base_model_bit_for_bit(tiny_pipeline, tmp_path, attention):
    ids = torch.tensor(IDS)
    model = text_encoder(tiny_pipeline, attention)
    base = model(ids)[0]
    catversion = T.CatVersion.attach(model, tokens=2, seed=3)
    on = model(ids)[0]
    with T.adapters_disabled(model):
        off = model(ids)[0]
    assert torch.equal(off, base) and not torch.allclose(on, base)
    # Saved and loaded into a fresh encoder: the same encoding with the adapter on; unloaded, the base again.
    catversion.save(tmp_path, {})
    fresh = text_encoder(tiny_pipeline, attention)
    T.load_catversion(fresh, tmp_path)
    assert torch.equal(fresh(ids)[0], on)
    T.unload_catversion(fresh)
    assert torch.equal(fresh(ids)[0], base)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_every_query_attends_to_the_learned_tokens_with_a_zero_mask_column(tiny_pipeline, attention):
    """One attention layer computed by hand: every position i attends to the learned tokens (logit q.k * scale,
    nothing added) and to positions 0..i of the prompt."""
    model = text_encoder(tiny_pipeline, attention)
    catversion = T.CatVersion.attach(model, tokens=2, seed=1)
    layer = catversion.layers[max(catversion.layers)]
    seen = {}
    layer.register_forward_hook(lambda module, args, kwargs, output: seen.update(x=kwargs["hidden_states"],
                                                                                  y=output[0]), with_kwargs=True)
    model(torch.tensor(IDS))
    attention_layer, x = layer.attention, seen["x"].double()
    heads, width = attention_layer.num_heads, attention_layer.head_dim

    def project(linear, states):
        return F.linear(states, linear.weight.double(), linear.bias.double())

    expected = torch.zeros_like(x)
    for b in range(x.shape[0]):
        q, k, v = (project(p, x[b]) for p in (attention_layer.q_proj, attention_layer.k_proj, attention_layer.v_proj))
        for i in range(x.shape[1]):
            keys = torch.cat([layer.residual[0].double(), k[: i + 1]])
            values = torch.cat([layer.residual[1].double(), v[: i + 1]])
            row = []
            for h in range(heads):
                part = slice(h * width, (h + 1) * width)
                weights = torch.softmax(keys[:, part] @ q[i, part] * width ** -0.5, dim=0)
                row.append(weights @ values[:, part])
            expected[b, i] = project(attention_layer.out_proj, torch.cat(row))
    torch.testing.assert_close(seen["y"].double(), expected, atol=1e-5, rtol=1e-5)


def test_cat_term_anchors_the_adapter_on_prediction_for_y_to_the_adapter_off_one(tiny_pipeline, instance_dir):
    """With CatVersion the frozen pass of the CAT term encodes y with the adapter off: the term is
    ||unet(enc_base(y)) - unet(enc_on(y))||^2 on the same noisy latents."""
    family = T.model_family(Namespace(pretrained_model_name_or_path=tiny_pipeline, resolution=32))
    models = family.load_models()
    T.CatVersion.attach(models["text_encoder"], seed=0)
    examples = [T.Example(p, "a photo of teapot", "a photo of", str(p)) for p in T.list_images(instance_dir)]
    batch = T.collate_examples([T.make_dataset(examples[:2], [], 32, True, False)[i] for i in range(2)])
    encode = T.PromptEncoder(family, {"text_encoder": models["text_encoder"]})
    losses = T.training_step(batch, family, models, encode, T.StepConfig(cat_alpha=1.0), lambda loss: loss.backward())
    z = family.noisy_latents(batch, models["vae"], models["noise_scheduler"], torch.float32)
    base_encoder = text_encoder(tiny_pipeline)
    with torch.no_grad():
        on = family.predict(models["unet"], z, family.encode_prompts(models, ["a photo of"] * 2))
        off = family.predict(models["unet"], z, family.encode_prompts({"text_encoder": base_encoder},
                                                                      ["a photo of"] * 2))
    assert losses["cat"].item() > 0
    torch.testing.assert_close(losses["cat"], F.mse_loss(on, off), rtol=1e-5, atol=0)


def test_resume_is_bit_exact(tiny_pipeline, instance_dir, tmp_path, run_training):
    common = ("--random_flip", "--checkpointing_steps", "3", "--cat_alpha", "1")
    run_training(catversion_args(tiny_pipeline, instance_dir, tmp_path / "full", *common, steps=6))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    run_training(catversion_args(tiny_pipeline, instance_dir, tmp_path / "resumed", *common,
                                 "--resume_from_checkpoint", "latest", steps=6))
    a = load_file(tmp_path / "full" / T.CATVERSION_WEIGHT_NAME)
    b = load_file(tmp_path / "resumed" / T.CATVERSION_WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # two CPU processes (about 30 s); SD's 2-process test stays in the default run
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_pipeline, instance_dir, tmp_path):
    """As tests/test_reliability.py's LoRA test: 2 processes x batch 1 against 1 process x batch 2."""
    single, double = tmp_path / "single", tmp_path / "double"
    common = ["--learning_rate", "1e-1", "--adam_epsilon", "1", "--cat_alpha", "1"]
    subprocess.run([sys.executable, str(ROOT / "train_cat_lora.py"),
                    *catversion_args(tiny_pipeline, instance_dir, single, *common, steps=4)],
                   check=True, env=ENV, capture_output=True)
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_cat_lora.py"),
         *catversion_args(tiny_pipeline, instance_dir, double, *common, "--train_batch_size", "1", steps=4)],
        env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("wrote ") == 3  # tokens, settings and model card, written once
    a, b = load_file(single / T.CATVERSION_WEIGHT_NAME), load_file(double / T.CATVERSION_WEIGHT_NAME)
    initial = T.CatVersion.attach(text_encoder(tiny_pipeline), seed=0).state_dict()
    for key in a:
        assert (a[key] - initial[key]).norm() > 0, key
        assert (a[key] - b[key]).norm() <= 1e-4 * (a[key] - initial[key]).norm(), key


@pytest.mark.parametrize("extra, message", [
    (("--rank", "8"), "--rank cannot be used with --adapter catversion"),
    (("--train_text_encoder",), "--train_text_encoder cannot be used with --adapter catversion"),
    (("--output_kohya_format",), "--output_kohya_format cannot be used with --adapter catversion"),
    (("--pre_compute_text_embeddings",), "--pre_compute_text_embeddings cannot be used with --adapter catversion"),
    (("--train_text_encoder_ti", "--token_abstraction", "teapot"),
     "--train_text_encoder_ti cannot be used with --adapter catversion"),
    (("--catversion_tokens", "0"), "--catversion_tokens must be positive"),
])
def test_flags_that_mean_nothing_for_catversion_are_refused(tiny_pipeline, instance_dir, tmp_path, extra, message):
    with pytest.raises(T.InputError, match=message):
        T.main(catversion_args(tiny_pipeline, instance_dir, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_other_families_are_refused_in_one_line_before_loading(tiny_sdxl_pipeline, instance_dir, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train_cat_lora.py"),
                             *catversion_args(tiny_sdxl_pipeline, instance_dir, tmp_path / "out")],
                            env=ENV, capture_output=True, text=True)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == ["train_cat_lora.py: error: --adapter catversion is supported for SD 1.x/2.x only, not SDXL: the "
                      "paper defines and runs it on SD 1.5's single CLIP text encoder"], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_catversion_file_that_does_not_fit_is_refused(tiny_pipeline, tmp_path):
    catversion = T.CatVersion.attach(text_encoder(tiny_pipeline), seed=0)
    catversion.save(tmp_path, {})
    state = {k: torch.zeros(1, 7) for k in catversion.state_dict()}
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / T.CATVERSION_WEIGHT_NAME))
    with pytest.raises(T.InputError, match="do not fit this text encoder"):
        T.load_catversion(text_encoder(tiny_pipeline), tmp_path)


def test_evaluate_kps_scores_a_catversion_adapter_on_for_y_t_and_off_for_y(tiny_pipeline, instance_dir, tiny_clip,
                                                                          tmp_path, run_training):
    import numpy as np
    from PIL import Image

    import evaluate_kps

    run_training(catversion_args(tiny_pipeline, instance_dir, tmp_path / "cv", "--cat_alpha", "0", steps=2))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"caption": caption, "reference": str(path)}) + "\n" for caption, path in
                               zip(["a photo of sks teapot", "sks teapot on a beach"], T.list_images(instance_dir))))
    out = tmp_path / "eval"
    evaluate_kps.main(["--pretrained_model_name_or_path", tiny_pipeline, "--eval_prompts", str(prompts),
                       "--trigger_token", "sks", "--lora", f"cv={tmp_path / 'cv'}", "--lora", "base=none",
                       "--num_inference_steps", "2", "--resolution", "32", "--guidance_scale", "7",
                       "--batch_size", "4", "--clip_model", str(tiny_clip[0]), "--clip_pretrained",
                       str(tiny_clip[1]), "--dino_model", "none", "--output_dir", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())["adapters"]
    assert set(metrics) == {"cv", "base"} and metrics["cv"]["n"] == 2
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]

    def pixels(adapter, key):
        return [np.asarray(Image.open(out / p[key]), dtype=np.int16) for p in pairs if p["adapter"] == adapter]

    # I(y) of the CatVersion adapter is the base model's I(y) (adapter off); its I(y_T) is y with the adapter on.
    for cv, base in zip(pixels("cv", "without_trigger"), pixels("base", "without_trigger")):
        assert np.abs(cv - base).max() <= 1
    moved = [np.abs(cv - base).max() for cv, base in zip(pixels("cv", "with_trigger"), pixels("base", "without_trigger"))]
    print("largest pixel change by the adapter:", moved)
    assert min(moved) > 2
