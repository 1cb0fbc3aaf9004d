"""Flux.1: conditioning, noisy input and target as diffusers' Flux LoRA script, the per-sample random stream, LoRA
targets, bad Flux input, freeing the text encoders after caching, and a step on a bitsandbytes-quantized base.
The guarantees shared with the other families (alpha = 0, frozen pass, lean = batched, resume, 2 processes, drift)
run for Flux through the ``family_pipeline`` fixture."""

import weakref
from argparse import Namespace

import pytest
import torch
from conftest import sequence_length, train_args, watch_forward
from diffusers import FluxPipeline, FluxTransformer2DModel

import train_cat_lora as T


def flux_models(pipeline: str, train_text_encoder: bool = False, **config):
    config.setdefault("max_sequence_length", sequence_length(pipeline))
    family = T.model_family(Namespace(pretrained_model_name_or_path=pipeline, resolution=32, **config))
    models = family.load_models()
    T.add_lora_adapters(family, models, 4, 4.0, train_text_encoder)
    return family, models


def flux_batch(rows: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.rand(rows, 3, 32, 32, generator=generator) * 2 - 1,
            "noise_seeds": torch.randint(0, 2**62, (rows,), generator=generator)}


def test_flux_conditioning_is_the_pipelines_own(tiny_flux_pipeline):
    """CLIP's pooled embedding and T5's sequence (--max_sequence_length tokens), as FluxPipeline.encode_prompt."""
    family, models = flux_models(tiny_flux_pipeline, max_sequence_length=24)
    pipe = FluxPipeline.from_pretrained(tiny_flux_pipeline, transformer=None, vae=None)
    prompts = ["a photo of teapot", "a red dog on the table"]
    cond = T.PromptEncoder(family, {name: models[name] for name in family.text_encoders})(prompts)
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, max_sequence_length=24)
    assert cond["encoder_hidden_states"].shape == (2, 24, 48) and cond["pooled_projections"].shape == (2, 32)
    torch.testing.assert_close(cond["encoder_hidden_states"], prompt_embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=0)


def test_flux_noisy_input_target_and_prediction_follow_the_flow_matching_recipe(tiny_flux_pipeline):
    family, models = flux_models(tiny_flux_pipeline)
    vae, scheduler, transformer = models["vae"], models["noise_scheduler"], models["transformer"]
    batch = flux_batch()
    z = family.noisy_latents(batch, vae, scheduler, torch.float32)

    # Written out: each row's generator gives its latent sample, then its noise, then its timestep density.
    rows = []
    for row, seed in enumerate(batch["noise_seeds"]):
        generator = torch.Generator().manual_seed(int(seed))
        posterior = vae.encode(batch["pixel_values"][row:row + 1]).latent_dist
        latents = (posterior.sample(generator) - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        index = int(torch.rand(1, generator=generator).item() * scheduler.config.num_train_timesteps)
        sigma = scheduler.sigmas[index]
        rows.append(((1 - sigma) * latents + sigma * noise, noise - latents, scheduler.timesteps[index]))
    torch.testing.assert_close(z["noisy"], torch.cat([r[0] for r in rows]))
    torch.testing.assert_close(z["target"], torch.cat([r[1] for r in rows]))
    assert z["timesteps"].tolist() == [float(r[2]) for r in rows]
    assert z["noisy"].shape == (2, 4, 16, 16)  # the VAE's scale factor is 2: 32 px -> 16 latents
    assert torch.equal(z["loss_weights"], torch.ones(2))  # --weighting_scheme none

    # The prediction: 2x2 patches in row-major token order, the timestep as sigma, the guidance value 3.5.
    cond = T.PromptEncoder(family, {name: models[name] for name in family.text_encoders})(["a photo of teapot"] * 2)
    seen = {}
    handle = transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        pred = family.predict(transformer, z, cond)
        patches = z["noisy"].reshape(2, 4, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 64, 16)
        ids = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).reshape(64, 2)
        direct = transformer(hidden_states=patches, timestep=z["timesteps"] / 1000, guidance=torch.full((2,), 3.5),
                             pooled_projections=cond["pooled_projections"],
                             encoder_hidden_states=cond["encoder_hidden_states"],
                             txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3),
                             img_ids=torch.cat([torch.zeros(64, 1), ids], dim=1), return_dict=False)[0]
    handle.remove()
    assert pred.shape == z["target"].shape
    torch.testing.assert_close(pred, direct.reshape(2, 8, 8, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 4, 16, 16))
    assert seen["guidance"].tolist() == [3.5, 3.5]
    assert torch.all((seen["timestep"] >= 0) & (seen["timestep"] <= 1))


def test_flux_rows_draw_from_their_own_generators(tiny_flux_pipeline):
    """A sample gets the same latents, noise, timestep and weight alone or in a batch (resume and 2 processes)."""
    family, models = flux_models(tiny_flux_pipeline, weighting_scheme="logit_normal", logit_mean=0.3)
    batch = flux_batch(rows=3, seed=1)
    together = family.noisy_latents(batch, models["vae"], models["noise_scheduler"], torch.float32)
    for row in range(3):
        alone = family.noisy_latents({key: value[row:row + 1] for key, value in batch.items()}, models["vae"],
                                     models["noise_scheduler"], torch.float32)
        for key in ("noisy", "target", "timesteps", "loss_weights"):
            # The VAE encodes 1 row or 3: its convolutions sum in another order by batch size (seen: 3.2e-5 relative
            # on 1 element of 1024 under load). A row drawing from another generator differs by O(1).
            torch.testing.assert_close(alone[key], together[key][row:row + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "logit_normal", "mode"])
def test_flux_weighting_schemes_come_from_diffusers(tiny_flux_pipeline, scheme):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    family, models = flux_models(tiny_flux_pipeline, weighting_scheme=scheme)
    scheduler = models["noise_scheduler"]
    z = family.noisy_latents(flux_batch(rows=4, seed=2), models["vae"], scheduler, torch.float32)
    indices = [int((scheduler.timesteps == t).nonzero()) for t in z["timesteps"]]
    expected = compute_loss_weighting_for_sd3(scheme, scheduler.sigmas[indices])
    torch.testing.assert_close(z["loss_weights"], expected)
    uniform, _ = flux_models(tiny_flux_pipeline)
    plain = uniform.noisy_latents(flux_batch(rows=4, seed=2), models["vae"], scheduler, torch.float32)
    if scheme in ("logit_normal", "mode"):  # another timestep density, the same noise
        assert not torch.equal(plain["timesteps"], z["timesteps"])


def test_flux_lora_targets_default_to_diffusers_list_and_follow_lora_layers(tiny_flux_pipeline):
    family, models = flux_models(tiny_flux_pipeline, train_text_encoder=True)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in models["transformer"].named_modules()
               if name.endswith("lora_A")}
    assert "transformer_blocks.0.ff_context.net.2" in adapted and "transformer_blocks.0.attn.add_q_proj" in adapted
    assert "single_transformer_blocks.0.attn.to_q" in adapted
    assert not any("lora_A" in name for name, _ in models["text_encoder_2"].named_modules())  # T5 stays frozen
    assert any("lora_A" in name for name, _ in models["text_encoder"].named_modules())
    _, models = flux_models(tiny_flux_pipeline, lora_layers="to_q, to_k")
    names = {name.rsplit(".", 2)[-2] for name, _ in models["transformer"].named_modules() if name.endswith("lora_A")}
    assert names == {"to_q", "to_k"}


@pytest.mark.parametrize("flags, message", [
    (("--snr_gamma", "5"), "--snr_gamma is for Stable Diffusion's noise schedules"),
    (("--noise_offset", "0.1"), "--noise_offset is for Stable Diffusion's noise schedules"),
    (("--bnb_quantization_config_path", "missing.json"), "--bnb_quantization_config_path missing.json: cannot read"),
    (("--bnb_quantization_config_path", "{bad"), "not valid JSON"),
    (("--bnb_quantization_config_path", '{"load_in_4bit": false}'), 'expected a JSON object with "load_in_8bit"'),
], ids=["snr_gamma", "noise_offset", "missing-json", "bad-json", "no-quantization"])
def test_bad_flux_input_is_one_line_and_exit_2(tiny_flux_pipeline, instance_dir, tmp_path, capsys, flags, message):
    flags = list(flags)
    if flags[-1].startswith("{"):
        (tmp_path / "q.json").write_text(flags[-1])
        flags[-1] = str(tmp_path / "q.json")
    status = T.cli(train_args(tiny_flux_pipeline, instance_dir, tmp_path / "out", *flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_quantization_flag_is_refused_for_other_families(tiny_pipeline, instance_dir, tmp_path, capsys):
    (tmp_path / "q.json").write_text('{"load_in_8bit": true}')
    status = T.cli(train_args(tiny_pipeline, instance_dir, tmp_path / "out", "--bnb_quantization_config_path",
                              str(tmp_path / "q.json")))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "is supported for Flux.1" in err[0] and "only, not SD 1.x/2.x (StableDiffusionPipeline)" in err[0]


def test_t5_caption_limit_is_max_sequence_length(tiny_flux_pipeline, tmp_path):
    """A trigger past --max_sequence_length T5 tokens would be cut off: refused, naming the image."""
    family = T.model_family(Namespace(pretrained_model_name_or_path=tiny_flux_pipeline, max_sequence_length=8))
    caption = "a photo of a red teapot on the table with a blue ball and sks"
    example = T.Example(tmp_path / "0.png", caption, caption, "0.png", "sks")
    with pytest.raises(T.InputError, match="0.png: the trigger 'sks' falls after the text encoder's 6-token limit"):
        T.check_caption_lengths(family.load_tokenizers()["tokenizer_2"], [example], {})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only outcome of diffusers' bitsandbytes loader")
def test_bnb_config_reaches_diffusers_quantized_loader(tiny_flux_pipeline, instance_dir, tmp_path, capsys):
    """--bnb_quantization_config_path builds a BitsAndBytesConfig and loads the transformer with it. diffusers'
    bitsandbytes loader refuses to run without a GPU; on this CPU-only machine that refusal is the observable end
    of the wiring: one line naming the flag, exit 2, before anything is written."""
    config = tmp_path / "nf4.json"
    config.write_text('{"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}')
    status = T.cli(train_args(tiny_flux_pipeline, instance_dir, tmp_path / "out",
                              "--bnb_quantization_config_path", str(config)))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert f"--bnb_quantization_config_path {config}: No GPU found. A GPU is needed for quantization." in err[0]
    assert not (tmp_path / "out").exists()


def quantize_linear_layers(model, options: dict):
    """Replace every linear layer of the transformer blocks by the bitsandbytes layer diffusers' loader would
    create for ``options``, holding the same (now quantized) weights. Test scaffolding: diffusers' loader itself
    needs a GPU, bitsandbytes' layers do not."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or "transformer_blocks" not in name:
            continue
        has_bias = module.bias is not None
        if options.get("load_in_8bit"):
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, has_bias, has_fp16_weights=False,
                                        threshold=6.0)
            layer.weight = bnb.nn.Int8Params(module.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            # BitsAndBytesConfig's defaults: no double quantization of the block statistics
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, has_bias, compute_dtype=torch.float32,
                                      quant_type=options["bnb_4bit_quant_type"], compress_statistics=False)
            layer.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False,
                                             quant_type=options["bnb_4bit_quant_type"], compress_statistics=False)
        if has_bias:
            layer.bias = torch.nn.Parameter(module.bias.data.clone(), requires_grad=False)
        model.set_submodule(name, layer.to("cpu"))  # moving to a device quantizes the weights
    return model


@pytest.mark.parametrize("options", [{"load_in_8bit": True}, {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}],
                         ids=["int8", "nf4"])
def test_a_step_trains_on_a_quantized_base_and_the_frozen_pass_reuses_it(tiny_flux_pipeline, instance_dir, options):
    """bitsandbytes layers run on this CPU: the transformer's blocks quantized (8-bit or NF4), prepared as the
    script prepares a quantized base, LoRA on top; one CAT step trains the adapter, the frozen pass runs the
    same quantized layers with no LoRA branch, and the quantized weights do not change."""
    import bitsandbytes as bnb
    from test_train_cat_lora import record_lora_calls, tiny_batch

    family = T.model_family(Namespace(pretrained_model_name_or_path=tiny_flux_pipeline, resolution=32,
                                      max_sequence_length=sequence_length(tiny_flux_pipeline)))
    models = family.load_models()
    transformer = family.prepare_quantized(quantize_linear_layers(models["transformer"], options))
    T.add_lora_adapters(family, models, 4, 4.0, False)
    quantized_kind = bnb.nn.Linear8bitLt if options.get("load_in_8bit") else bnb.nn.Linear4bit
    quantized = [m for m in transformer.modules() if isinstance(m, quantized_kind)]
    assert len(quantized) > 10
    wrapped = [m for m in transformer.modules() if getattr(m, "base_layer", None) in quantized]
    assert len(wrapped) > 10  # peft put its LoRA layers around the quantized ones
    lora = record_lora_calls(transformer)  # autograd on or off at each LoRA call
    weights_before = {id(m): m.weight.data.clone() for m in quantized}
    calls = []  # (grad enabled, quantized layer id) for every quantized layer call
    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-2)
    lora_before = {k: p.detach().clone() for k, p in transformer.named_parameters() if p.requires_grad}
    assert lora_before and all("lora_" in k for k in lora_before)
    transformer.train()
    marks = []

    def before_transformer(module):
        marks.append((torch.is_grad_enabled(), len(lora), len(calls)))

    with watch_forward(quantized_kind, lambda m: calls.append((torch.is_grad_enabled(), id(m)))), \
            watch_forward(FluxTransformer2DModel, before_transformer):
        losses = T.training_step(tiny_batch(instance_dir), family, models,
                                 T.PromptEncoder(family, {n: models[n] for n in family.text_encoders}),
                                 T.StepConfig(cat_alpha=1.0), lambda loss: loss.backward())
    optimizer.step()
    assert torch.isfinite(losses["loss"]) and losses["diffusion"] > 0
    assert [grad for grad, _, _ in marks] == [True, True, False]  # lean: y_T, y, then the frozen pass
    _, lora_at_frozen, calls_at_frozen = marks[-1]
    assert len(lora) == lora_at_frozen and all(lora)  # the frozen pass ran no LoRA branch ...
    frozen_layers = {layer for _, layer in calls[calls_at_frozen:]}
    adapted_layers = {layer for grad, layer in calls[:calls_at_frozen] if grad}
    assert frozen_layers == adapted_layers == {id(m) for m in quantized}  # ... but the same quantized layers
    assert all(torch.equal(m.weight.data, weights_before[id(m)]) for m in quantized)
    changed = [k for k, p in transformer.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[k])]
    assert any("lora_B" in k for k in changed)


def test_precomputed_text_embeddings_free_the_text_encoders(tiny_flux_pipeline, instance_dir, tmp_path):
    args = T.parse_args(train_args(tiny_flux_pipeline, instance_dir, tmp_path / "out", "--pre_compute_text_embeddings"))
    family = T.model_family(args)
    models = family.load_models()
    alive = {name: weakref.ref(models[name]) for name in family.text_encoders}
    examples = [T.Example(p, "a photo of sks teapot", "a photo of teapot", str(p)) for p in T.list_images(instance_dir)]
    _, _, cached = T.make_dataloader(args, family, models, examples, [], seed=0)
    assert not any(name in models for name in family.text_encoders)
    assert all(ref() is None for ref in alive.values())  # nothing holds them: their memory is released
    assert cached(["a photo of teapot"])["encoder_hidden_states"].shape == (1, 16, 48)


def test_flux_validation_after_freeing_the_text_encoders(tiny_flux_pipeline, instance_dir, tmp_path, run_training):
    """Validation reloads the freed text encoders and samples with the pipeline's own flow-matching scheduler."""
    out = tmp_path / "out"
    run_training(train_args(tiny_flux_pipeline, instance_dir, out, "--pre_compute_text_embeddings",
                            "--validation_prompt", "a photo of sks teapot",
                            "--num_validation_images", "1", "--num_validation_inference_steps", "2",
                            "--validation_steps", "2", steps=2))
    from PIL import Image

    assert Image.open(out / "validation" / "step-2.png").size == (32, 64)
