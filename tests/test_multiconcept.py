"""Many concepts in one adapter (examples/toyworld/multiconcept.py, make_concepts.py --set 20): the multi-concept
training path, the judge's confusion measure, and the 20-concept set."""

import argparse
import filecmp
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, draw_subject, sequence_length

import make_concepts
import multiconcept

TOYWORLD = ROOT / "examples" / "toyworld"


def test_three_concepts_train_in_one_adapter_and_each_y_strips_only_its_own_trigger(tmp_path, tiny_pipeline,
                                                                                      run_training):
    # Each caption also names another concept's trigger: its y must keep that one and lose only its own.
    captions = {"sks": "a photo of sks circle beside hok", "hok": "a photo of hok circle beside sks",
                "ohwx": "a photo of ohwx square beside sks"}
    concepts = []
    for n, (trigger, caption) in enumerate(captions.items()):
        (tmp_path / trigger).mkdir()
        for i in range(2):
            draw_subject(tmp_path / trigger / f"{i}.png", shift=i, color=(60 * n, 200 - 60 * n, 30))
        concepts.append({"instance_data_dir": trigger, "instance_prompt": caption, "trigger_token": trigger,
                         "class_word": caption.split()[4]})
    args = multiconcept.parse_args(["--pretrained_model_name_or_path", tiny_pipeline, "--base_steps", "2",
                                    "--steps_per_concept", "1", "--output_dir", str(tmp_path / "out")])
    run = multiconcept.Run(3, "cat_swap", 0)  # CAT with the swapped-trigger term
    command = multiconcept.multi_concept_command(args, run, concepts, tmp_path, tmp_path / "out")
    assert not set(multiconcept.SINGLE_CONCEPT_FLAGS) & set(command)
    assert command[command.index("--max_train_steps") + 1] == "4"  # 2 + 1 x (3 - 1)

    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer")
    encoded = []

    def record_prompts(module, inputs):  # the token ids every text-encoder pass embeds
        if isinstance(module, CLIPTextModel):
            ids = inputs[0] if inputs else None
            if ids is not None:
                encoded.extend(tokenizer.batch_decode(ids, skip_special_tokens=True))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record_prompts)
    try:
        run_training([*command[1:], "--max_sequence_length", str(sequence_length(tiny_pipeline))])
    finally:
        handle.remove()
    assert (tmp_path / "out" / "adapters" / run.name / "pytorch_lora_weights.safetensors").is_file()
    prompts = {" ".join(p.split()) for p in encoded}
    own_stripped = {"a photo of circle beside hok", "a photo of circle beside sks", "a photo of square beside sks"}
    assert set(captions.values()) | own_stripped <= prompts
    assert "a photo of circle beside" not in prompts  # no y lost another concept's trigger
    # y_swap: a caption with its own trigger (only) replaced by another concept's; nothing else was encoded
    swapped = {caption.replace(f"of {own} ", f"of {other} ") for own, caption in captions.items()
               for other in captions if other != own}
    assert prompts & swapped and prompts <= set(captions.values()) | own_stripped | swapped
    assert "swapped-trigger term beta 1.0" in (tmp_path / "out" / "adapters" / run.name / "README.md").read_text()


def swap_concepts(tmp_path) -> list[str]:
    """Two concepts of two images each, as a --concepts_list (its flags)."""
    concepts = []
    for n, trigger in enumerate(("sks", "hok")):
        (tmp_path / trigger).mkdir()
        for i in range(2):
            draw_subject(tmp_path / trigger / f"{i}.png", shift=i, color=(200 - 150 * n, 30 + 150 * n, 30))
        concepts.append({"instance_data_dir": str(tmp_path / trigger), "trigger_token": trigger,
                         "instance_prompt": f"a photo of {trigger} circle", "class_word": "circle"})
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    return ["--concepts_list", str(tmp_path / "concepts.json")]


def test_swap_term_is_the_adapted_prediction_under_another_trigger_against_the_frozen_one_on_y(tmp_path,
                                                                                              tiny_pipeline):
    """--cat_swap_alpha beta: beta * ||eps_frozen(z_t, t, y) - eps_lora(z_t, t, y_swap)||^2, computed here by hand
    on the same noisy latents; its gradient is the only difference from a CAT step; lean = batched; and the
    swapped caption is drawn after every other draw of the sample, so the rest of the batch is unchanged."""
    import train_cat_lora as T

    flags = ["--pretrained_model_name_or_path", tiny_pipeline, *swap_concepts(tmp_path)]
    plain_args, swap_args = T.parse_args(flags), T.parse_args([*flags, "--cat_swap_alpha", "0.5"])
    plain = T.collect_instance_examples(plain_args, T.load_concepts(plain_args))
    examples = T.collect_instance_examples(swap_args, T.load_concepts(swap_args))
    assert {(e.caption, e.cat_caption, e.swap_captions) for e in examples} == {
        ("a photo of sks circle", "a photo of circle", ("a photo of hok circle",)),
        ("a photo of hok circle", "a photo of circle", ("a photo of sks circle",))}
    items = [T.make_dataset(ex, [], 32, True, False, seed=3)[k] for ex in (plain, examples) for k in range(4)]
    for without, with_swap in zip(items[:4], items[4:]):
        assert with_swap["swap_prompt"] == with_swap["prompt"].replace(*(
            ("sks", "hok") if "sks" in with_swap["prompt"] else ("hok", "sks")))
        assert torch.equal(with_swap["pixel_values"], without["pixel_values"])
        rest = {key: value for key, value in with_swap.items() if key not in ("swap_prompt", "pixel_values")}
        assert rest == {key: value for key, value in without.items() if key != "pixel_values"}
    batch = T.collate_examples(items[4:6])

    family = T.model_family(argparse.Namespace(pretrained_model_name_or_path=tiny_pipeline, resolution=32,
                                               max_sequence_length=sequence_length(tiny_pipeline)))
    models = family.load_models()
    T.add_lora_adapters(family, models, 4, 4.0, False)
    unet = models["unet"]
    torch.manual_seed(0)
    lora = {name: p for name, p in unet.named_parameters() if "lora_" in name}
    for p in lora.values():
        p.data.normal_(0, 0.1)
    encode = T.PromptEncoder(family, {name: models[name] for name in family.text_encoders})

    def step(beta, mode="lean"):
        unet.zero_grad()
        config = T.StepConfig(cat_alpha=1.0, cat_mode=mode, cat_swap_alpha=beta)
        losses = T.training_step(batch, family, models, encode, config, lambda loss: loss.backward())
        return losses, {name: p.grad.clone() for name, p in lora.items()}

    z = family.noisy_latents(batch, models["vae"], models["noise_scheduler"], torch.float32)
    with torch.no_grad(), T.adapters_disabled(unet):
        frozen = family.predict(unet, z, encode(batch["cat_prompts"]))
    unet.zero_grad()
    by_hand = torch.nn.functional.mse_loss(family.predict(unet, z, encode(batch["swap_prompts"])), frozen)
    (0.5 * by_hand).backward()
    swap_grads = {name: p.grad.clone() for name, p in lora.items()}

    losses, grads = step(0.5)
    cat_losses, cat_grads = step(0.0)
    assert losses["swap"].item() == pytest.approx(by_hand.item(), rel=1e-5) and by_hand.item() > 0
    # The diffusion pass, y's adapted pass and the frozen pass are the same computations in both lean steps (same
    # rows, shapes and kernels; the swap pass runs after y's has been backwarded): bit-equal. Batched mode runs y and
    # y_swap as one 4-row batch, y alone in a 2-row batch without the swap term. The CPU's matrix kernels block by
    # the row count, so the rows' sums are taken in another order: the first layer (the time embedding's Linear,
    # inputs bit-equal) already differs by 1 ulp, and the UNet carries that to ~6 ulps of its prediction (1.4e-6 at
    # |eps| <= 1.35) and 1.0e-6 of this loss (measured, x86-64, one thread). Bounded by Cauchy-Schwarz: |dL| / L <=
    # 2 max|d eps| / rms(eps_lora - eps_frozen) = 2 * 1.4e-6 / 0.022 = 1.3e-4; 2e-4 sits above it and far below what
    # the wrong rows or conditioning change.
    assert losses["diffusion"] == cat_losses["diffusion"]
    assert losses["cat"] == cat_losses["cat"]
    assert losses["loss"].item() == pytest.approx(cat_losses["loss"].item() + 0.5 * by_hand.item(), rel=1e-5)
    for name in lora:
        torch.testing.assert_close(grads[name], cat_grads[name] + swap_grads[name], rtol=1e-4, atol=1e-7)
    batched_losses, batched_grads = step(0.5, "batched")
    assert batched_losses["swap"].item() == pytest.approx(losses["swap"].item(), rel=1e-5)
    assert batched_losses["cat"].item() == pytest.approx(losses["cat"].item(), rel=2e-4)
    for name in lora:
        torch.testing.assert_close(batched_grads[name], grads[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("extra, message", [
    (["--cat_swap_alpha", "-1"], "--cat_swap_alpha must be >= 0"),
    (["--cat_swap_alpha", "1", "--cat_alpha", "0"], "--cat_swap_alpha anchors on CAT's frozen pass"),
    (["--cat_swap_alpha", "1", "--train_text_encoder_ti"], "cannot be used with --train_text_encoder_ti"),
])
def test_bad_swap_flags_are_refused_in_one_line(tmp_path, extra, message):
    import train_cat_lora as T

    with pytest.raises(T.InputError, match=message):
        T.parse_args(["--pretrained_model_name_or_path", "unused", *swap_concepts(tmp_path), *extra])
    one = ["--pretrained_model_name_or_path", "unused", "--instance_data_dir", str(tmp_path / "sks"),
           "--instance_prompt", "a photo of sks circle", "--trigger_token", "sks", "--cat_swap_alpha", "1"]
    with pytest.raises(T.InputError, match="give a --concepts_list with at least two triggers"):
        T.parse_args(one)


def test_assign_and_confusion_on_hand_made_embeddings():
    axes = torch.eye(4)
    concept_means, none_mean = axes[:3] * 2.0, axes[3]  # three concepts and "none"; means need not be unit length
    images = torch.stack([axes[0], axes[0] + 0.1 * axes[1], axes[1], axes[3], axes[2] + 0.05 * axes[3]])
    verdicts = multiconcept.assign(images, concept_means, none_mean)
    assert verdicts.tolist() == [0, 0, 1, -1, 2]
    # Concept 0's trigger drew: itself twice, concept 1 (in the adapter, same class) once, nothing once, and
    # concept 2 once, which the adapter never learned: not confusion.
    scores = multiconcept.confusion_scores(verdicts, own=0, adapter_concepts=[0, 1], same_class=[0, 1])
    assert scores == pytest.approx({"assigned_own": 0.4, "confusion": 0.2, "confusion_same_class": 0.2})
    scores = multiconcept.confusion_scores(verdicts, own=0, adapter_concepts=[0, 1, 2], same_class=[0])
    assert scores == pytest.approx({"assigned_own": 0.4, "confusion": 0.4, "confusion_same_class": 0.0})
    alone = multiconcept.confusion_scores(verdicts, own=0, adapter_concepts=[0], same_class=[0])
    assert alone["confusion"] == 0.0 and alone["confusion_same_class"] == 0.0


def test_seconds_per_step_reads_the_finished_training_bar():
    log = ("Steps:  50%|#####     | 200/400 [00:20<00:20, 9.9it/s]\r"
           "Steps: 100%|##########| 400/400 [01:20<00:00, 5.0it/s, loss=0.1]\nwrote x\n")
    assert multiconcept.seconds_per_step(log) == pytest.approx(0.2)
    assert multiconcept.seconds_per_step("Steps: 100%|#| 10/10 [1:00:00<00:00, 1s/it]") == pytest.approx(360.0)
    with pytest.raises(ValueError):
        multiconcept.seconds_per_step("Steps:  50%|#| 5/10 [00:05<00:05, 1it/s]")


def test_bad_k_is_refused_in_one_line_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"--ks/--more_ks: K must lie in 1\.\.20"):
        multiconcept.main(["--ks", "1", "21", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_twenty_concept_set_is_deterministic_and_keeps_the_five_byte_identical(tmp_path):
    for out in (tmp_path / "a", tmp_path / "b"):
        make_concepts.main(["--set", "20", "--out", str(out)])
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".png"]) == 20 * 6
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert not mismatch and not errors
    # ... the same bytes as the committed concepts20/, and the five of Table 1 as in concepts/
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", TOYWORLD / "concepts20", files, shallow=False)
    assert not mismatch and not errors
    five = sorted(p.relative_to(TOYWORLD / "concepts") for p in (TOYWORLD / "concepts").rglob("*")
                  if p.is_file() and p.name != "concepts.json")
    assert len(five) == 5 * 6 + 5
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", TOYWORLD / "concepts", five, shallow=False)
    assert not mismatch and not errors
    entries = json.loads((tmp_path / "a" / "concepts.json").read_text())
    assert [e["trigger_token"] for e in entries] == list(make_concepts.SET20_ORDER)
    assert sorted(e["class_word"] for e in entries) == sorted(["circle", "square", "triangle", "cross"] * 5)
    old = {e["trigger_token"]: e for e in json.loads((TOYWORLD / "concepts" / "concepts.json").read_text())}
    assert all(e == old[e["trigger_token"]] for e in entries if e["trigger_token"] in old)
    # --set 5 still writes exactly the committed concepts/
    make_concepts.main(["--out", str(tmp_path / "five")])
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "five", TOYWORLD / "concepts", [*five, Path("concepts.json")],
                                           shallow=False)
    assert not mismatch and not errors


def test_toy_world_triggers_of_the_twenty_are_single_clip_tokens():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOYWORLD / "models" / "toy-sd", subfolder="tokenizer")
    for trigger in make_concepts.SET20_ORDER:
        assert len(tokenizer.tokenize(trigger)) == 1, trigger
