"""train_cat_lora.py on the tiny offline pipeline: the CAT term, what it trains, what it saves, how it resumes."""

import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from client_key_maps import comfy_clip_key_map, comfy_load, comfy_unet_config, comfy_unet_key_map
from conftest import draw_subject, drift_on_trigger_less_prompts, train_args
from safetensors.torch import load_file

import train_cat_lora as T


def tiny_models(pipeline: str, train_text_encoder: bool = False, rank: int = 4):
    args = Namespace(pretrained_model_name_or_path=pipeline, revision=None, variant=None)
    tokenizer, scheduler, text_encoder, vae, unet = T.load_models(args)
    T.add_lora_adapters(unet, text_encoder, rank, float(rank), train_text_encoder)
    return tokenizer, scheduler, text_encoder, vae, unet


def tiny_batch(tokenizer, instance_dir: Path, class_dir: Path | None = None):
    examples = [T.Example(p, "a photo of sks teapot", "a photo of teapot", str(p)) for p in T.list_images(instance_dir)]
    class_examples = []
    if class_dir is not None:
        class_examples = [T.Example(p, "a photo of teapot", "a photo of teapot", str(p)) for p in T.list_images(class_dir)]
    dataset = T.make_dataset(examples[:2], class_examples[:2], tokenizer, 32, True, False)
    return T.collate_examples([dataset[0], dataset[1]])


def losses_for(models, batch, alpha, seed=0, cat_mode="lean", backward=None, **kwargs):
    _, scheduler, text_encoder, vae, unet = models
    torch.manual_seed(seed)
    options = dict(cat_alpha=alpha, cat_mode=cat_mode, prior_loss_weight=1.0, snr_gamma=None, noise_offset=0.0,
                   weight_dtype=torch.float32, backward=backward or (lambda loss: loss.backward()))
    options.update(kwargs)
    return T.training_step(batch, unet, text_encoder, vae, scheduler, **options)


def lora_parameters(model):
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def test_step_zero_cat_term_is_zero_and_frozen_pass_is_base_unet(tiny_pipeline, instance_dir):
    from diffusers import UNet2DConditionModel

    models = tiny_models(tiny_pipeline)
    tokenizer, _, text_encoder, _, unet = models
    batch = tiny_batch(tokenizer, instance_dir)
    losses = losses_for(models, batch, alpha=1.0)
    assert losses["cat"].item() == 0.0  # LoRA up-weights start at zero: adapted == frozen, exactly

    base = UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet")
    torch.manual_seed(1)
    for p in lora_parameters(unet).values():  # make the adapter non-trivial first
        p.data.normal_(0, 0.1)
    latents, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    embeds = T.encode_prompt(text_encoder, batch["cat_input_ids"])
    with torch.no_grad():
        with T.adapters_disabled(unet):
            frozen = unet(latents, t, embeds).sample
        adapted = unet(latents, t, embeds).sample
        reference = base(latents, t, embeds).sample
    assert torch.equal(frozen, reference)
    assert not torch.allclose(adapted, reference)


def count_lora_calls(*models) -> dict:
    """Forward hooks on every LoRA down-projection of ``models``: returns {model index: list of calls}."""
    calls = {}
    for index, model in enumerate(models):
        calls[index] = []
        modules = [m for name, m in model.named_modules() if name.endswith("lora_A.default")]
        assert modules, f"model {index} has no LoRA layers"
        for module in modules:
            module.register_forward_hook(lambda *_, found=calls[index]: found.append(1))
    return calls


def test_frozen_pass_never_calls_the_lora_branch(tiny_pipeline, instance_dir, monkeypatch):
    """Neither the U-Net's nor the text encoder's LoRA layers run in the frozen pass, inside a real CAT step."""
    models = tiny_models(tiny_pipeline, train_text_encoder=True)
    tokenizer, _, text_encoder, _, unet = models
    calls = count_lora_calls(unet, text_encoder)
    batch = tiny_batch(tokenizer, instance_dir)
    T.frozen_prediction(unet, text_encoder, torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), batch["cat_input_ids"])
    assert calls == {0: [], 1: []}

    in_frozen_pass = []
    original_frozen = T.frozen_prediction

    def counted_frozen(*args, **kwargs):
        before = (len(calls[0]), len(calls[1]))
        prediction = original_frozen(*args, **kwargs)
        in_frozen_pass.append((len(calls[0]) - before[0], len(calls[1]) - before[1]))
        return prediction

    monkeypatch.setattr(T, "frozen_prediction", counted_frozen)
    for mode in ("lean", "batched"):
        losses_for(models, batch, alpha=1.0, cat_mode=mode)
        assert in_frozen_pass.pop() == (0, 0), mode
    assert calls[0] and calls[1]  # the adapted passes did run both adapters


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_cat_gradient_reaches_only_adapter_parameters(tiny_pipeline, instance_dir, train_text_encoder):
    models = tiny_models(tiny_pipeline, train_text_encoder=train_text_encoder)
    tokenizer, _, text_encoder, _, unet = models
    torch.manual_seed(2)
    for model in (unet, text_encoder):
        for p in lora_parameters(model).values():
            p.data.normal_(0, 0.1)
    batch = tiny_batch(tokenizer, instance_dir)
    noisy, t = torch.randn(2, 4, 16, 16), torch.tensor([100, 700])
    adapted = unet(noisy, t, T.encode_prompt(text_encoder, batch["cat_input_ids"])).sample
    frozen = T.frozen_prediction(unet, text_encoder, noisy, t, batch["cat_input_ids"])
    assert not frozen.requires_grad
    loss = T.cat_loss(adapted, frozen)
    assert loss.item() > 0
    loss.backward()
    for model in (unet, text_encoder, models[3]):
        for name, p in model.named_parameters():
            if "lora_" in name and (model is unet or train_text_encoder):
                assert p.requires_grad and p.grad is not None, name
            else:
                assert not p.requires_grad and p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for p in lora_parameters(unet).values())
    if train_text_encoder:
        assert any(p.grad.abs().sum() > 0 for p in lora_parameters(text_encoder).values())


def test_losses_combine_diffusion_prior_and_cat(tiny_pipeline, instance_dir, tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for i in range(2):
        draw_subject(class_dir / f"{i}.png", shift=i, color=(30, 30, 200))
    models = tiny_models(tiny_pipeline)
    torch.manual_seed(3)
    for p in lora_parameters(models[4]).values():
        p.data.normal_(0, 0.1)
    batch = tiny_batch(models[0], instance_dir, class_dir)
    assert batch["pixel_values"].shape[0] == 4 and batch["num_instance"] == 2
    losses = losses_for(models, batch, alpha=0.7, prior_loss_weight=0.5, snr_gamma=5.0, noise_offset=0.1)
    assert losses["prior"].item() > 0 and losses["cat"].item() > 0
    expected = losses["diffusion"] + 0.5 * losses["prior"] + 0.7 * losses["cat"]
    torch.testing.assert_close(losses["loss"].detach(), expected)


def test_alpha_zero_is_the_plain_lora_objective(tiny_pipeline, instance_dir):
    """With alpha = 0 the loss is the plain LoRA diffusion loss, from the same random stream."""
    import torch.nn.functional as F

    models = tiny_models(tiny_pipeline)
    tokenizer, scheduler, text_encoder, vae, unet = models
    torch.manual_seed(4)
    for p in lora_parameters(unet).values():
        p.data.normal_(0, 0.1)
    batch = tiny_batch(tokenizer, instance_dir)
    losses = losses_for(models, batch, alpha=0.0, seed=5)
    # The plain LoRA step, written out independently: each row draws from a generator seeded by its noise seed.
    from diffusers.utils.torch_utils import randn_tensor

    generators = [torch.Generator().manual_seed(int(s)) for s in batch["noise_seeds"]]
    latents = vae.encode(batch["pixel_values"]).latent_dist.sample(generators) * vae.config.scaling_factor
    noise = randn_tensor(latents.shape, generator=generators)
    t = torch.cat([torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g) for g in generators])
    pred = unet(scheduler.add_noise(latents, noise, t), t, text_encoder(batch["input_ids"])[0]).sample
    assert losses["cat"].item() == 0.0
    assert torch.equal(losses["loss"].detach(), F.mse_loss(pred, noise).detach())


def plain_lora_step(batch, unet, text_encoder, vae, noise_scheduler, *, weight_dtype, backward, **unused) -> dict:
    """A plain LoRA step written without any CAT code: one U-Net pass on y_T, the MSE to the target, backward."""
    import torch.nn.functional as F

    z = T.noisy_latents_for(batch, vae, noise_scheduler, 0.0, weight_dtype)
    pred = unet(z["noisy_latents"], z["timesteps"], text_encoder(batch["input_ids"], return_dict=False)[0]).sample
    loss = F.mse_loss(pred, z["target"])
    backward(loss)
    zero = torch.zeros(())
    return {"loss": loss.detach(), "diffusion": loss.detach(), "prior": zero, "cat": zero}


def test_alpha_zero_run_is_exactly_plain_lora(tiny_pipeline, instance_dir, tmp_path, run_training, monkeypatch):
    """--cat_alpha 0 with a trigger and a CAT prompt mode: one U-Net pass per step, never the frozen pass, and
    bit-identical weights to a plain LoRA run (no --trigger_token, the step replaced by ``plain_lora_step``)."""
    common = ("--cat_alpha", "0", "--random_flip", "--train_text_encoder")
    unet_calls, calls_per_step, frozen_calls = [], [], []
    original_prepare, original_step = T.prepare_models, T.training_step

    def prepare_and_count(*args, **kwargs):
        models = original_prepare(*args, **kwargs)
        models["unet"].register_forward_pre_hook(lambda *_: unet_calls.append(1))
        return models

    def counted_step(*args, **kwargs):
        before = len(unet_calls)
        losses = original_step(*args, **kwargs)
        calls_per_step.append(len(unet_calls) - before)
        return losses

    monkeypatch.setattr(T, "prepare_models", prepare_and_count)
    monkeypatch.setattr(T, "training_step", counted_step)
    monkeypatch.setattr(T, "frozen_prediction", lambda *a, **k: frozen_calls.append(1))
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "zero", *common, "--cat_prompt", "class",
                            "--cat_class_word", "teapot", steps=3))
    assert calls_per_step == [1, 1, 1] and frozen_calls == []

    monkeypatch.setattr(T, "training_step", plain_lora_step)
    plain = train_args(tiny_pipeline, instance_dir, tmp_path / "plain", *common, steps=3)
    plain.remove("--trigger_token"); plain.remove("sks")
    run_training(plain)
    a = load_file(tmp_path / "plain" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "zero" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k or "lora.up" in k)


def test_training_leaves_base_weights_bit_identical(tiny_pipeline, instance_dir, tmp_path, run_training, monkeypatch):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    trained = {}
    original_save = T.save_final_weights

    def capture(accelerator, args, unet, text_encoder, *rest):
        trained["unet"], trained["text_encoder"] = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
        return original_save(accelerator, args, unet, text_encoder, *rest)

    monkeypatch.setattr(T, "save_final_weights", capture)
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "out", "--train_text_encoder", steps=3))
    for name, base in (("unet", UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet")),
                       ("text_encoder", CLIPTextModel.from_pretrained(tiny_pipeline, subfolder="text_encoder"))):
        trained_state = {k.replace(".base_layer", ""): v for k, v in trained[name].state_dict().items()
                         if "lora_" not in k}
        base_state = base.state_dict()
        assert trained_state.keys() == base_state.keys()
        assert all(torch.equal(trained_state[k], base_state[k]) for k in base_state), name


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory) -> Path:
    """Two class images (a blue subject) for prior preservation."""
    folder = tmp_path_factory.mktemp("class")
    for i in range(2):
        draw_subject(folder / f"{i}.png", shift=i, color=(30, 30, 200))
    return folder


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("prior", [False, True], ids=["no-prior", "prior"])
def test_lean_and_batched_modes_give_the_same_gradients(tiny_pipeline, instance_dir, class_dir,
                                                         gradient_checkpointing, prior):
    grads = {}
    for mode in ("lean", "batched"):
        models = tiny_models(tiny_pipeline, train_text_encoder=True)
        if gradient_checkpointing:  # active in training mode only
            models[4].enable_gradient_checkpointing()
            models[2].gradient_checkpointing_enable()
            models[4].train(), models[2].train()
        torch.manual_seed(6)
        for model in (models[2], models[4]):
            for p in lora_parameters(model).values():
                p.data.normal_(0, 0.1)
        backward_calls = []
        batch = tiny_batch(models[0], instance_dir, class_dir if prior else None)
        losses = losses_for(models, batch, alpha=2.0, cat_mode=mode, seed=7,
                            backward=lambda loss: (backward_calls.append(1), loss.backward()))
        assert len(backward_calls) == (2 if mode == "lean" else 1)
        assert (losses["prior"].item() > 0) == prior
        grads[mode] = {f"{i}.{k}": p.grad.clone() for i, m in ((2, models[2]), (4, models[4]))
                       for k, p in lora_parameters(m).items()}
        grads[mode + "_losses"] = losses
    for key in grads["lean"]:
        torch.testing.assert_close(grads["lean"][key], grads["batched"][key], rtol=1e-4, atol=1e-7)
    for part in ("loss", "diffusion", "prior", "cat"):
        torch.testing.assert_close(grads["lean_losses"][part], grads["batched_losses"][part])


def _image_output(pipe, prompt="a photo of teapot"):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, height=32, width=32, generator=generator, output_type="np").images


def test_saved_weights_load_in_diffusers_and_kohya_file_matches(tiny_pipeline, instance_dir, tmp_path, run_training):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    written = run_training(train_args(tiny_pipeline, instance_dir, out, "--train_text_encoder", "--rank", "4",
                                      "--lora_alpha", "8", "--output_kohya_format", "--learning_rate", "1e-2",
                                      steps=3))
    assert out / "pytorch_lora_weights.safetensors" in written
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None)
    base = _image_output(pipe, "a photo of sks teapot")
    pipe.load_lora_weights(out)
    with_lora = _image_output(pipe, "a photo of sks teapot")
    assert abs(with_lora - base).max() > 1e-3
    pipe.unload_lora_weights()
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights_kohya.safetensors")
    with_kohya = _image_output(pipe, "a photo of sks teapot")
    assert abs(with_kohya - with_lora).max() < 1e-5
    kohya = load_file(out / "pytorch_lora_weights_kohya.safetensors")
    assert any(k.startswith("lora_unet_") for k in kohya) and any(k.startswith("lora_te_text_model_") for k in kohya)
    assert all(v.item() == 8.0 for k, v in kohya.items() if k.endswith(".alpha"))
    # ComfyUI reads every key (issue 11: it dropped the text-encoder half); see test_kohya_export.py for more
    key_map = {**comfy_unet_key_map(comfy_unet_config(pipe.unet.config)),
               **comfy_clip_key_map({"clip_l": pipe.text_encoder.config.num_hidden_layers})}
    assert comfy_load(kohya, key_map)[1] == []


@pytest.mark.parametrize("schedule", [
    (),
    # batch 1 x 2 accumulated batches: still 2 steps per epoch, and the lr changes at every step.
    ("--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--gradient_accumulation_steps", "2",
     "--train_batch_size", "1"),
], ids=["constant", "cosine-accumulation"])
def test_resume_mid_epoch_reaches_the_same_final_weights(tiny_pipeline, instance_dir, tmp_path, run_training,
                                                         schedule):
    common = ("--random_flip", "--checkpointing_steps", "3", "--checkpoints_total_limit", "2", *schedule)
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "full", *common, steps=6))
    # 4 images, 2 steps per epoch, so checkpoint-3 sits in the middle of the second epoch.
    assert sorted(p.name for p in T.checkpoint_folders(tmp_path / "full")) == ["checkpoint-3"]
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "resumed", *common,
                            "--resume_from_checkpoint", "latest", steps=6))
    a = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_total_limit_prunes_oldest(tiny_pipeline, instance_dir, tmp_path, run_training):
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "out", "--checkpointing_steps", "1",
                            "--checkpoints_total_limit", "2", "--cat_alpha", "0", steps=5))
    assert [p.name for p in T.checkpoint_folders(tmp_path / "out")] == ["checkpoint-3", "checkpoint-4"]
    assert not list((tmp_path / "out").glob(".checkpoint-*"))


def test_cat_drifts_less_than_plain_lora_on_trigger_less_prompts(tiny_pipeline, instance_dir, tmp_path, run_training):
    drift = {}
    for alpha in ("0", "1"):
        out = tmp_path / f"alpha{alpha}"
        run_training(train_args(tiny_pipeline, instance_dir, out, "--cat_alpha", alpha, "--learning_rate", "5e-3",
                                "--train_text_encoder", steps=12))
        drift[alpha] = drift_on_trigger_less_prompts(tiny_pipeline, out, ["a photo of teapot", "a teapot"])
    print(f"drift on trigger-less prompts: LoRA {drift['0']:.3e}, CAT {drift['1']:.3e}, "
          f"ratio CAT/LoRA {drift['1'] / drift['0']:.3f}")
    assert drift["0"] > 0 and drift["1"] < drift["0"]


def test_validation_kps_is_logged_with_the_evaluation_definition(tiny_pipeline, instance_dir, tmp_path, run_training,
                                                                  tiny_clip, monkeypatch):
    """--validation_kps logs 1 - H(s_prev) over the grid's with/without-trigger images, as evaluate_kps computes it."""
    import evaluate_kps

    assert evaluate_kps.knowledge_preservation_score is T.knowledge_preservation_score  # one definition
    logged, grids = {}, {}
    original_make_grid = T.make_grid

    def keep_rows(rows):
        grids["rows"] = rows
        return original_make_grid(rows)

    monkeypatch.setattr(T, "make_grid", keep_rows)
    monkeypatch.setattr("accelerate.Accelerator.log", lambda self, values, step=None, **kw: logged.update(
        {k: v for k, v in values.items() if k.startswith("validation/")}))
    config, checkpoint = tiny_clip
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "out", "--validation_prompt", "a sks teapot",
                            "--validation_steps", "2", "--num_validation_images", "2",
                            "--num_validation_inference_steps", "2", "--validation_kps",
                            "--validation_clip_model", str(config), "--validation_clip_pretrained",
                            str(checkpoint), steps=2))
    clip = T.load_clip(str(config), str(checkpoint))
    with_trigger = T.clip_image_embeddings(clip, grids["rows"][0])
    without_trigger = T.clip_image_embeddings(clip, grids["rows"][1])
    s_prev = torch.nn.functional.cosine_similarity(with_trigger, without_trigger).clamp(min=1e-6)
    expected = 1 - len(s_prev) / (1 / s_prev).sum().item()
    assert logged["validation/kps"] == pytest.approx(expected, abs=1e-6)
    assert logged["validation/s_prev_harmonic_mean"] == pytest.approx(1 - expected, abs=1e-6)


def test_validation_kps_rejects_a_bad_clip_choice_before_training(tiny_pipeline, instance_dir, tmp_path):
    with pytest.raises(T.InputError, match="--validation_clip_model ViT-L-14 --validation_clip_pretrained openai"):
        T.main(train_args(tiny_pipeline, instance_dir, tmp_path / "out", "--validation_prompt", "a sks teapot",
                          "--validation_kps", "--validation_clip_model", "ViT-L-14"))
    assert not (tmp_path / "out").exists()
