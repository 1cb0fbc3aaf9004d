"""--cat_prompts (a bank of trigger-less prompts y', issue 29) and evaluate_kps.py --unrelated_prompts."""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import draw_subject, families_slow_except, sequence_length, train_args
from PIL import Image
from safetensors.torch import load_file

import evaluate_kps as ek
import train_cat_lora as T

BANK = "a photo of a {class}\na red square on a white background\n\n# a comment\na yellow triangle\n"


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "pytorch_lora_weights.safetensors"), load_file(b / "pytorch_lora_weights.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def two_concepts(tmp_path) -> list[str]:
    """Two concepts (sks circle, hok square) of two images each, as --concepts_list flags."""
    concepts = []
    for n, (trigger, word) in enumerate((("sks", "circle"), ("hok", "square"))):
        (tmp_path / trigger).mkdir()
        for i in range(2):
            draw_subject(tmp_path / trigger / f"{i}.png", shift=i, color=(200 - 150 * n, 30 + 150 * n, 30))
        concepts.append({"instance_data_dir": str(tmp_path / trigger), "trigger_token": trigger,
                         "instance_prompt": f"a photo of {trigger} {word}", "class_word": word})
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    return ["--concepts_list", str(tmp_path / "concepts.json")]


def test_each_concept_gets_the_bank_with_its_class_word_drawn_last_in_the_sample_seed(tmp_path, tiny_pipeline):
    """{class} becomes each concept's own class word; the bank prompt is drawn after every other draw of the sample,
    so everything else in the item is what a run without a bank sees; every line is drawn."""
    (tmp_path / "bank.txt").write_text(BANK)
    flags = ["--pretrained_model_name_or_path", tiny_pipeline, *two_concepts(tmp_path)]
    plain_args = T.parse_args(flags)
    bank_args = T.parse_args([*flags, "--cat_prompts", str(tmp_path / "bank.txt")])
    plain = T.collect_instance_examples(plain_args, T.load_concepts(plain_args))
    examples = T.with_prompt_bank(plain, T.load_prompt_bank(bank_args.cat_prompts, T.load_concepts(bank_args)))
    assert {e.caption: e.bank_prompts for e in examples} == {
        "a photo of sks circle": ("a photo of a circle", "a red square on a white background", "a yellow triangle"),
        "a photo of hok square": ("a photo of a square", "a red square on a white background", "a yellow triangle")}
    n = 40
    without = [T.make_dataset(plain, [], 32, False, True, seed=3)[k] for k in range(n)]
    with_bank = [T.make_dataset(examples, [], 32, False, True, seed=3)[k] for k in range(n)]
    for a, b in zip(without, with_bank):
        assert b["bank_prompt"] in examples[0 if "sks" in b["prompt"] else 2].bank_prompts
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        rest = {key: value for key, value in b.items() if key not in ("bank_prompt", "pixel_values")}
        assert rest == {key: value for key, value in a.items() if key != "pixel_values"}
    assert {item["bank_prompt"].replace("square", "circle") for item in with_bank} == {
        "a photo of a circle", "a red circle on a white background", "a yellow triangle"}
    assert T.collate_examples(with_bank[:2])["bank_prompts"] == [item["bank_prompt"] for item in with_bank[:2]]


def step_setup(tiny_pipeline, tmp_path):
    """The tiny SD pipeline with random (non-zero) LoRA weights and a 2-row batch drawn from a bank run's dataset."""
    (tmp_path / "bank.txt").write_text("a red square on a white background\na yellow triangle\na blue cross\n")
    flags = ["--pretrained_model_name_or_path", tiny_pipeline, *two_concepts(tmp_path),
             "--cat_prompts", str(tmp_path / "bank.txt")]
    args = T.parse_args(flags)
    concepts = T.load_concepts(args)
    examples = T.with_prompt_bank(T.collect_instance_examples(args, concepts), T.load_prompt_bank(args.cat_prompts,
                                                                                                   concepts))
    dataset = T.make_dataset(examples, [], 32, True, False, seed=1)
    batch = T.collate_examples([dataset[0], dataset[1]])
    assert len(set(batch["bank_prompts"])) == 2  # two different y' (seed chosen so)
    family = T.model_family(argparse.Namespace(pretrained_model_name_or_path=tiny_pipeline, resolution=32,
                                               max_sequence_length=sequence_length(tiny_pipeline)))
    models = family.load_models()
    T.add_lora_adapters(family, models, 4, 4.0, False)
    torch.manual_seed(0)
    lora = {name: p for name, p in models["unet"].named_parameters() if "lora_" in name}
    for p in lora.values():
        p.data.normal_(0, 0.1)
    return family, models, batch, lora


def test_bank_term_is_its_definition_by_hand_its_gradient_adds_and_lean_equals_batched(tiny_pipeline, tmp_path):
    """alpha_bank * ||eps_frozen(z_t, t, y') - eps_lora(z_t, t, y')||^2 on the rows' own z_t and t, computed here by
    hand: the loss and its gradient are CAT's plus this term's; lean = batched; with row weights (--cat_alpha auto)
    each row's bank part is weighted by its multiplier and the drift is the mean of the drifts on y and y'."""
    family, models, batch, lora = step_setup(tiny_pipeline, tmp_path)
    unet = models["unet"]
    encode = T.PromptEncoder(family, {name: models[name] for name in family.text_encoders})

    def step(bank_alpha, mode="lean", weights=None):
        unet.zero_grad()
        config = T.StepConfig(cat_alpha=1.0, cat_mode=mode, cat_bank_alpha=bank_alpha)
        losses = T.training_step(batch, family, models, encode, config, lambda loss: loss.backward(),
                                 cat_weights=weights)
        return losses, {name: p.grad.clone() for name, p in lora.items()}

    z = family.noisy_latents(batch, models["vae"], models["noise_scheduler"], torch.float32)
    with torch.no_grad(), T.adapters_disabled(unet):
        frozen_y = family.predict(unet, z, encode(batch["cat_prompts"]))
        frozen_bank = family.predict(unet, z, encode(batch["bank_prompts"]))
    unet.zero_grad()
    adapted_bank = family.predict(unet, z, encode(batch["bank_prompts"]))
    by_hand = ((adapted_bank - frozen_bank) ** 2).mean()
    (0.5 * by_hand).backward()
    bank_grads = {name: p.grad.clone() for name, p in lora.items()}
    with torch.no_grad():
        adapted_y = family.predict(unet, z, encode(batch["cat_prompts"]))
        drift_by_hand = (T.relative_drift(adapted_y, frozen_y) + T.relative_drift(adapted_bank, frozen_bank)) / 2

    losses, grads = step(0.5)
    cat_losses, cat_grads = step(0.0)
    assert "bank" in cat_losses and cat_losses["bank"] == 0  # logged as 0 when the term does not run
    # The frozen pass runs y and y' as one 4-row batch here, y alone (2 rows) without the bank: the CPU's matrix
    # kernels sum in another order, a few ulps of the prediction (tests/test_multiconcept.py measured ~6 ulps for the
    # same shapes in the swap term): rel 1e-5 on losses of order 1e-3, rtol 1e-4 on gradients, far below the change
    # that a wrong row, prompt or latent makes: the bank term's gradient is 4% of the whole step's here (measured;
    # asserted above 1%), a hundred times rtol.
    assert losses["diffusion"] == cat_losses["diffusion"]
    assert losses["bank"].item() == pytest.approx(by_hand.item(), rel=1e-5) and by_hand.item() > 0
    assert losses["cat"].item() == pytest.approx(cat_losses["cat"].item(), rel=2e-4)
    assert losses["loss"].item() == pytest.approx(cat_losses["loss"].item() + 0.5 * by_hand.item(), rel=1e-5)
    for name in lora:
        torch.testing.assert_close(grads[name], cat_grads[name] + bank_grads[name], rtol=1e-4, atol=1e-7)
    assert sum(g.abs().sum() for g in bank_grads.values()) > 0.01 * sum(g.abs().sum() for g in cat_grads.values())
    batched_losses, batched_grads = step(0.5, "batched")
    assert batched_losses["bank"].item() == pytest.approx(losses["bank"].item(), rel=1e-5)
    for name in lora:
        torch.testing.assert_close(batched_grads[name], grads[name], rtol=1e-4, atol=1e-7)

    # --cat_alpha auto: row weights w; the bank term is alpha_bank * mean_i(w_i * mse_i(y'))
    weights = torch.tensor([2.0, 0.0])
    weighted, weighted_grads = step(0.5, weights=weights)
    unet.zero_grad()
    per_row = ((family.predict(unet, z, encode(batch["bank_prompts"])) - frozen_bank) ** 2).mean(dim=(1, 2, 3))
    (0.5 * (weights * per_row).mean()).backward()
    weighted_bank_grads = {name: p.grad.clone() for name, p in lora.items()}
    torch.testing.assert_close(weighted["drift"], drift_by_hand, rtol=1e-4, atol=0)
    _, zero_grads = step(0.0, weights=weights)
    for name in lora:
        torch.testing.assert_close(weighted_grads[name], zero_grads[name] + weighted_bank_grads[name], rtol=1e-4,
                                   atol=1e-7)


def test_lean_mode_runs_one_adapted_pass_at_a_time_with_a_bank(tiny_pipeline, tmp_path):
    """Lean mode's memory: each adapted pass (the diffusion term's, y's, y''s) is backwarded before the next one
    runs, so a bank step holds one pass's activations at a time, as a CAT step does; the frozen pass (y and y'
    together, no gradient) runs in between. Seen through a forward hook on the U-Net and the backward callback."""
    family, models, batch, lora = step_setup(tiny_pipeline, tmp_path)
    unet = models["unet"]
    encode = T.PromptEncoder(family, {name: models[name] for name in family.text_encoders})
    events = []
    handle = unet.register_forward_hook(
        lambda module, args, output: events.append(("forward", args[0].shape[0], torch.is_grad_enabled())))

    def backward(loss):
        events.append(("backward",))
        loss.backward()

    try:
        for mode in ("lean", "batched"):
            events.clear()
            T.training_step(batch, family, models, encode, T.StepConfig(cat_alpha=1.0, cat_mode=mode,
                                                                         cat_bank_alpha=0.5), backward)
            if mode == "lean":
                assert events == [("forward", 2, True), ("backward",), ("forward", 2, True), ("forward", 4, False),
                                  ("backward",), ("forward", 2, True), ("backward",)], events
            else:  # batched: y_T, y and y' in one call (6 rows), the frozen pass, one backward
                assert events == [("forward", 6, True), ("forward", 4, False), ("backward",)], events
    finally:
        handle.remove()


def bank_step(batch, family, models, encode, lora, mode: str, latents: str) -> tuple[dict, dict]:
    """One training step with CAT (alpha 1) and the bank (alpha 0.5) on ``latents``: its losses and LoRA gradients."""
    models[family.denoiser].zero_grad()
    config = T.StepConfig(cat_alpha=1.0, cat_mode=mode, cat_bank_alpha=0.5, cat_bank_latents=latents)
    losses = T.training_step(batch, family, models, encode, config, lambda loss: loss.backward())
    return losses, {name: p.grad.clone() for name, p in lora.items()}


def check_bank_term_on(z_prime: dict, latents: str, batch, family, models, encode, lora) -> None:
    """training_step's bank term with ``latents`` is alpha_bank * ||eps_frozen(z') - eps_lora(z')||^2 on y' and
    ``z_prime``, by hand; it differs from the term on the sample's z_t; CAT's own term is untouched (its frozen rows
    share a 4-row call with the bank rows: ulps, as in the test above); lean = batched."""
    denoiser = models[family.denoiser]
    with torch.no_grad():
        with T.adapters_disabled(denoiser):
            frozen = family.predict(denoiser, z_prime, encode(batch["bank_prompts"]))
        by_hand = ((family.predict(denoiser, z_prime, encode(batch["bank_prompts"])) - frozen) ** 2).mean()
    losses, grads = bank_step(batch, family, models, encode, lora, "lean", latents)
    assert losses["bank"].item() == pytest.approx(by_hand.item(), rel=1e-5) and by_hand.item() > 0
    sample_losses, _ = bank_step(batch, family, models, encode, lora, "lean", "sample")
    assert abs(sample_losses["bank"].item() - by_hand.item()) > 0.01 * by_hand.item()  # another input than z_t
    assert losses["cat"].item() == pytest.approx(sample_losses["cat"].item(), rel=1e-5)
    batched_losses, batched_grads = bank_step(batch, family, models, encode, lora, "batched", latents)
    assert batched_losses["bank"].item() == pytest.approx(losses["bank"].item(), rel=1e-5)
    for name in lora:
        torch.testing.assert_close(batched_grads[name], grads[name], rtol=1e-4, atol=1e-7)


def test_noise_latents_put_the_bank_term_on_pure_noise_at_the_last_timestep(tiny_pipeline, tmp_path):
    """--cat_prompts_latents noise: the bank term is alpha_bank * ||eps_frozen(z', T, y') - eps_lora(z', T, y')||^2
    with z' = sqrt(1 - abar_T) * noise (SD's last timestep, no image), the noise drawn from each sample's own seed
    (salted); computed here by hand. CAT's own term keeps the sample's z_t; lean = batched."""
    family, models, batch, lora = step_setup(tiny_pipeline, tmp_path)
    scheduler = models["noise_scheduler"]
    encode = T.PromptEncoder(family, {name: models[name] for name in family.text_encoders})

    z = family.noisy_latents(batch, models["vae"], scheduler, torch.float32)
    last = scheduler.config.num_train_timesteps - 1
    noise = torch.stack([torch.randn(z["noisy"].shape[1:], generator=torch.Generator().manual_seed(
        int(seed) ^ T.BANK_NOISE_SALT)) for seed in batch["noise_seeds"]])
    z_noise = {**z, "noisy": (1 - scheduler.alphas_cumprod[last]) ** 0.5 * noise,
               "timesteps": torch.full((2,), last, dtype=torch.long)}
    check_bank_term_on(z_noise, "noise", batch, family, models, encode, lora)


def base_images_of(prompts, per_prompt: int = 2) -> dict:
    """Stand-ins for the base model's images of each prompt (--cat_prompts_latents base): flat colors, 32 px."""
    return {prompt: [T.Example(Image.new("RGB", (32, 32), (40 * n, 200 - 30 * k, 90)), prompt, prompt,
                               f"cat-bank-base/{n}-{k}") for k in range(per_prompt)]
            for n, prompt in enumerate(prompts)}


def test_base_latents_put_the_bank_term_on_the_base_model_s_image_of_y_prime(tiny_pipeline, tmp_path):
    """--cat_prompts_latents base: each row's z' is one of the base model's images of its y', noised at its own t'
    (the batch's "bank", drawn after every other draw of the sample); the term is alpha_bank * ||eps_frozen(z', t',
    y') - eps_lora(z', t', y')||^2, computed here by hand; CAT's own term keeps z_t; lean = batched."""
    family, models, batch, lora = step_setup(tiny_pipeline, tmp_path)
    vae, scheduler = models["vae"], models["noise_scheduler"]
    args = T.parse_args(["--pretrained_model_name_or_path", tiny_pipeline, "--concepts_list",
                         str(tmp_path / "concepts.json"), "--cat_prompts", str(tmp_path / "bank.txt")])  # step_setup's
    concepts = T.load_concepts(args)
    examples = T.with_prompt_bank(T.collect_instance_examples(args, concepts), T.load_prompt_bank(args.cat_prompts,
                                                                                                   concepts))
    bank_base = base_images_of(dict.fromkeys(p for e in examples for p in e.bank_prompts))
    items = [T.make_dataset(examples, [], 32, True, False, seed=1, bank_base=bank_base)[k] for k in range(2)]
    plain = [T.make_dataset(examples, [], 32, True, False, seed=1)[k] for k in range(2)]
    for item, without in zip(items, plain):  # the base image and its seed are drawn last: the rest is unchanged
        rest = {k: v for k, v in item.items()
                if k != "pixel_values" and (k == "bank_prompt" or not k.startswith("bank_"))}
        assert rest == {k: v for k, v in without.items() if k != "pixel_values"}
        assert torch.equal(item["pixel_values"], without["pixel_values"])
    batch = T.collate_examples(items)
    assert batch["bank"]["pixel_values"].shape == (2, 3, 32, 32) and batch["bank_prompts"] == [i["bank_prompt"]
                                                                                              for i in items]
    for row, item in enumerate(items):  # each row's image is one of its own prompt's
        assert any(torch.equal(batch["bank"]["pixel_values"][row], T.augment(e.image, 32, True, False, None)[0])
                   for e in bank_base[item["bank_prompt"]])
    encode = T.PromptEncoder(family, {name: models[name] for name in family.text_encoders})

    z_base = family.noisy_latents(batch["bank"], vae, scheduler, torch.float32)
    z = family.noisy_latents(batch, vae, scheduler, torch.float32)
    assert not torch.equal(z_base["timesteps"], z["timesteps"])  # its own t' (the seeds make them differ here)
    check_bank_term_on(z_base, "base", batch, family, models, encode, lora)


def test_base_images_are_generated_once_kept_in_the_output_dir_and_reused(tiny_pipeline, instance_dir, tmp_path):
    """prepare_bank_base_examples: --cat_prompts_base_images images per prompt from the base pipeline, saved as a
    tensor file (no image files), loaded again while the settings are the same, regenerated when they change."""
    from accelerate import Accelerator

    out = tmp_path / "out"
    flags = ["--pretrained_model_name_or_path", tiny_pipeline, "--instance_data_dir", str(instance_dir),
             "--instance_prompt", "a photo of sks teapot", "--trigger_token", "sks", "--output_dir", str(out),
             "--resolution", "32", "--seed", "0", "--cat_prompts_base_images", "2"]
    family = T.model_family(argparse.Namespace(pretrained_model_name_or_path=tiny_pipeline, resolution=32,
                                               max_sequence_length=sequence_length(tiny_pipeline)))
    examples = [T.Example("unused.png", "a photo of sks teapot", "a photo of teapot", "0.png",
                          bank_prompts=("a red square", "a yellow triangle"))]
    accelerator = Accelerator(cpu=True)
    first = T.prepare_bank_base_examples(T.parse_args(flags), family, accelerator, torch.float32, examples)
    assert [len(images) for images in first.values()] == [2, 2] and set(first) == {"a red square", "a yellow triangle"}
    assert [p.name for p in out.iterdir()] == ["cat_bank_base_images.pt"]
    pixels = {prompt: [np.asarray(e.image) for e in images] for prompt, images in first.items()}
    assert not np.array_equal(*pixels["a red square"])  # two draws, not one image twice
    stamp = (out / "cat_bank_base_images.pt").stat().st_mtime_ns
    again = T.prepare_bank_base_examples(T.parse_args(flags), family, accelerator, torch.float32, examples)
    assert (out / "cat_bank_base_images.pt").stat().st_mtime_ns == stamp  # reused, not generated again
    assert all(np.array_equal(np.asarray(e.image), p) for prompt in again for e, p in zip(again[prompt], pixels[prompt]))
    one = T.prepare_bank_base_examples(T.parse_args([*flags, "--cat_prompts_base_images", "1"]), family, accelerator,
                                       torch.float32, examples)
    assert [len(images) for images in one.values()] == [1, 1]
    # a prompt's images come from its own seed: the first image is the same whatever the count
    assert all(np.array_equal(np.asarray(one[prompt][0].image), pixels[prompt][0]) for prompt in one)


def test_base_latents_train_and_resume_bit_exact(tiny_pipeline, instance_dir, tmp_path, run_training):
    """End to end with --cat_prompts_latents base: the term runs, and a run resumed from step 2 in a folder without
    the base images' file (so generated again) ends with the same weights as the uninterrupted one."""
    (tmp_path / "bank.txt").write_text(BANK)
    logged = []
    common = ("--cat_class_word", "teapot", "--cat_prompts", str(tmp_path / "bank.txt"), "--cat_prompts_latents",
              "base", "--cat_prompts_base_images", "1", "--checkpointing_steps", "2", "--cache_latents")
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "full", *common, steps=4),
                 on_log=lambda values, step: logged.append(values))
    assert all(values["loss/bank"] > 0 for values in logged[1:])
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "resumed", *common,
                            "--resume_from_checkpoint", "latest", steps=4))
    assert same_weights(tmp_path / "full", tmp_path / "resumed")
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "sample", *common[:4], "--checkpointing_steps",
                            "2", "--cache_latents", steps=4))
    assert not same_weights(tmp_path / "full", tmp_path / "sample")  # the base images did change the training


def test_pure_noise_is_the_schedules_last_timestep_for_both_objectives(tiny_pipeline, tmp_path):
    """Flow matching: sigma 1, timestep 1000, z' = the noise itself; DDPM: t = T - 1, z' = sqrt(1 - abar_T) noise;
    each row from its own generator (the same seed, the same z')."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    config = T.FamilyConfig(pretrained_model_name_or_path=tiny_pipeline)
    like = torch.zeros(2, 4, 8, 8)

    def generators():
        return [torch.Generator().manual_seed(seed) for seed in (3, 4)]

    expected = torch.stack([torch.randn(4, 8, 8, generator=g) for g in generators()])
    flow = T.FlowMatchingObjective(config).pure_noise(like, generators(), FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert torch.equal(flow["noisy"], expected) and flow["sigmas"].tolist() == [1.0, 1.0]
    assert flow["timesteps"].tolist() == [1000.0, 1000.0]
    ddpm_scheduler = DDPMScheduler()
    ddpm = T.DDPMObjective(config).pure_noise(like, generators(), ddpm_scheduler)
    assert ddpm["timesteps"].tolist() == [999, 999]
    torch.testing.assert_close(ddpm["noisy"], (1 - ddpm_scheduler.alphas_cumprod[999]) ** 0.5 * expected)


def test_noise_latents_without_a_bank_is_one_line(tiny_pipeline, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert T.cli(train_args(tiny_pipeline, instance_dir, out, "--cat_prompts_latents", "noise")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cat_prompts_latents sets the --cat_prompts term's input" in err, err
    assert not out.exists()


def test_bank_alpha_zero_is_cat_bit_for_bit(tiny_pipeline, instance_dir, tmp_path, run_training):
    (tmp_path / "bank.txt").write_text(BANK)
    common = ("--random_flip", "--cat_class_word", "teapot")
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "cat", *common, steps=2))
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "zero", *common, "--cat_prompts",
                            str(tmp_path / "bank.txt"), "--cat_prompts_alpha", "0", steps=2))
    assert same_weights(tmp_path / "cat", tmp_path / "zero")
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "bank", *common, "--cat_prompts",
                            str(tmp_path / "bank.txt"), steps=2))
    assert not same_weights(tmp_path / "cat", tmp_path / "bank")  # the term does change the weights


def test_resume_with_a_bank_and_a_budget_is_bit_exact(tiny_pipeline, instance_dir, tmp_path, run_training):
    """The bank draw is part of each sample's seed and --cat_alpha auto's state is checkpointed: a run resumed from
    step 3 ends with the same weights as the uninterrupted one, and the budget moved on the bank's drift too."""
    (tmp_path / "bank.txt").write_text(BANK)
    logged = []
    common = ("--cat_alpha", "auto", "--cat_drift_budget", "1e-7", "--cat_every", "2", "--learning_rate", "1e-2",
              "--random_flip", "--checkpointing_steps", "3", "--cat_class_word", "teapot",
              "--cat_prompts", str(tmp_path / "bank.txt"), "--cat_mode", "batched")
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "full", *common, steps=6),
                 on_log=lambda values, step: logged.append(values))
    assert all("loss/bank" in values for values in logged)
    assert [values["loss/bank"] > 0 for values in logged] == [False, True] * 3  # CAT (and bank) on even steps
    assert logged[-1]["cat/alpha_0"] > 0
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "resumed", *common,
                            "--resume_from_checkpoint", "latest", steps=6))
    assert same_weights(tmp_path / "full", tmp_path / "resumed")


@pytest.mark.parametrize("family_pipeline", families_slow_except("flux"), indirect=True)
def test_the_bank_trains_on_every_family(family_pipeline, instance_dir, tmp_path, run_training):
    (tmp_path / "bank.txt").write_text(BANK)
    logged = []
    run_training(train_args(family_pipeline, instance_dir, tmp_path / "out", "--cat_class_word", "teapot",
                            "--cat_prompts", str(tmp_path / "bank.txt"), steps=2),
                 on_log=lambda values, step: logged.append(values))
    assert logged[1]["loss/bank"] > 0  # step 1: the LoRA starts at zero, so every CAT term is 0


@pytest.mark.parametrize("family_pipeline", families_slow_except("flux"), indirect=True)
def test_base_latents_train_on_every_family(family_pipeline, instance_dir, tmp_path, run_training):
    """The base model's images go through each family's own latents (packing, shifts, time ids) as the subject's."""
    (tmp_path / "bank.txt").write_text("a red square\na yellow triangle\n")
    logged = []
    run_training(train_args(family_pipeline, instance_dir, tmp_path / "out", "--cat_class_word", "teapot",
                            "--cat_prompts", str(tmp_path / "bank.txt"), "--cat_prompts_latents", "base",
                            "--cat_prompts_base_images", "1", steps=2),
                 on_log=lambda values, step: logged.append(values))
    assert logged[1]["loss/bank"] > 0


@pytest.mark.parametrize("bank, extra, message", [
    (None, [], "--cat_prompts: .*missing.txt: no such file"),
    ("\n# only a comment\n  \n", [], "bank.txt: no prompts"),
    ("a photo of a dog\na SKS teapot in the snow\n", [], "line 2 'a SKS teapot in the snow' contains the trigger 'sks'"),
    ("a photo of a {class}\n", [], "line 1 uses {class} but concept 'sks' has no class word"),
    ("a dog\n", ["--cat_alpha", "0"], "--cat_prompts adds to CAT's term: give --cat_alpha > 0"),
    ("a dog\n", ["--cat_prompts_alpha", "-1"], "--cat_prompts_alpha must be >= 0"),
    ("a dog\n", ["--cat_prompts_latents", "base", "--cat_prompts_base_images", "0"],
     "--cat_prompts_base_images 0: give at least 1"),
])
def test_bad_bank_input_is_one_line_before_any_model_loads(tiny_pipeline, instance_dir, tmp_path, capsys, bank,
                                                            extra, message):
    import re

    path = tmp_path / ("missing.txt" if bank is None else "bank.txt")
    if bank is not None:
        path.write_text(bank)
    out = tmp_path / "out"
    assert T.cli(train_args(tiny_pipeline, instance_dir, out, "--cat_prompts", str(path), *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not out.exists()  # checked in parse_args / check_inputs, before the accelerator and any model


def test_unrelated_prompts_columns_are_recomputed_from_the_saved_images(tiny_pipeline, instance_dir, tiny_clip,
                                                                         tmp_path, run_training):
    """evaluate_kps.py --unrelated_prompts: base and adapter draw each prompt at the same seeds; 'unrelated cos' and
    'unrelated Δpx' equal the cosine of the saved images' CLIP embeddings and their mean pixel change, by hand."""
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "lora", "--cat_alpha", "0", "--learning_rate",
                            "5e-2", steps=2))
    (tmp_path / "ref.png").write_bytes((instance_dir / "0.png").read_bytes())
    (tmp_path / "eval.jsonl").write_text(json.dumps({"caption": "a photo of sks teapot", "reference": "ref.png"}))
    (tmp_path / "unrelated.txt").write_text("a blue cross\n\na green square on a black background\n")
    config, checkpoint = tiny_clip
    out = tmp_path / "eval"
    metrics = ek.main(["--pretrained_model_name_or_path", tiny_pipeline, "--eval_prompts", str(tmp_path / "eval.jsonl"),
                       "--trigger_token", "sks", "--lora", f"lora={tmp_path / 'lora'}", "--num_images_per_prompt", "2",
                       "--num_inference_steps", "2", "--resolution", "32", "--guidance_scale", "1",
                       "--unrelated_prompts", str(tmp_path / "unrelated.txt"), "--clip_model", str(config),
                       "--clip_pretrained", str(checkpoint), "--dino_model", "none", "--output_dir", str(out)])
    lines = [json.loads(line) for line in (out / "unrelated.jsonl").read_text().splitlines()]
    assert [(line["adapter"], line["prompt"], line["seed"]) for line in lines] == [
        (name, prompt, seed) for name in ("lora", "base")
        for prompt, seeds in (("a blue cross", (0, 1)), ("a green square on a black background", (2, 3)))
        for seed in seeds]
    images = {name: [Image.open(out / line["image"]).convert("RGB") for line in lines if line["adapter"] == name]
              for name in ("lora", "base")}
    clip = T.load_clip(str(config), str(checkpoint))
    a, b = (T.clip_image_embeddings(clip, images[name]).double().numpy() for name in ("lora", "base"))
    cosine = np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    pixels = {name: np.stack([np.asarray(image, dtype=np.float64) for image in images[name]]) for name in images}
    change = np.abs(pixels["lora"] - pixels["base"]).mean() / 255
    assert change > 0.001  # the LoRA did move the images (else the comparison would be vacuous)
    # float32 embeddings of the same PNG-exact images: 1e-6 is a few float32 ulps of a cosine near 1.
    assert metrics["lora"]["unrelated_cosine"] == pytest.approx(cosine, abs=1e-6)
    assert metrics["lora"]["unrelated_pixel_change"] == pytest.approx(change, abs=1e-12)
    header = (out / "table.md").read_text().splitlines()[0]
    assert "| KPS mean | unrelated cos | unrelated Δpx |" in header
    assert Image.open(out / "unrelated.png").size == (ek.COMPARISON_LABEL_WIDTH + 2 * 64, 2 * 64)


def test_unrelated_prompts_refuse_a_trigger_and_an_empty_file(tmp_path):
    (tmp_path / "u.txt").write_text("a dog\nsks at the beach\n")
    with pytest.raises(T.InputError, match="line 2 'sks at the beach' contains the trigger 'sks'"):
        ek.load_unrelated_prompts(tmp_path / "u.txt", "sks")
    (tmp_path / "u.txt").write_text("# nothing\n")
    with pytest.raises(T.InputError, match="no prompts"):
        ek.load_unrelated_prompts(tmp_path / "u.txt", "sks")
