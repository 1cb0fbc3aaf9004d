"""The kohya-format export (``train_cat_lora.kohya_state_dict``) for SD 1.x/2.x, SDXL and Flux.1.

Each family is checked two ways on tiny random models with random LoRA weights (alpha != rank, so a lost alpha
shows): against ComfyUI's key map rebuilt in client_key_maps.py (every key of the file is read, none would be
logged as "lora key not loaded", and each trained layer changes the weight peft changes), and by loading both the
diffusers-format and the kohya file with the family's pipeline ``load_lora_weights`` (same outputs as the peft
model, and different from the base model, so layers were really loaded).
"""

import copy
import re
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import _collate_lora_metadata
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import client_key_maps as clients
import train_cat_lora as T

# Each family's own layout, by its short name (the layouts are declared by the families).
LAYOUTS = {family.kohya_layout.name: family.kohya_layout for family in T.FAMILIES.values() if family.kohya_layout}

RANK, ALPHA = 4, 8.0
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# diffusers' examples/dreambooth/train_dreambooth_lora_flux.py default (commit 58eb52c). "attn.to_q/k/v" also
# match the single blocks' attention, so their fused linear1 gets q, k, v but no proj_mlp part.
FLUX_DEFAULT_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                        "ff_context.net.2"]
# Every Flux layer with a BFL name: full linear1 groups, linear2, modulations, embedders, final projection.
FLUX_ALL_TARGETS = FLUX_DEFAULT_TARGETS + ["proj_mlp", "proj_out", "norm1.linear", "norm1_context.linear",
                                           "norm.linear", "x_embedder", "context_embedder"]
# What diffusers' kohya Flux converter (0.42.1) loads back: the blocks' layers except the single blocks' q, k, v and
# proj_mlp (BFL's linear1), which it splits at Flux.1's fixed widths (3072 x 3 + 12288) that a tiny model does not
# have, and no top-level layers (it drops final_layer.linear and leaves img_in/txt_in unloaded). ComfyUI reads all.
FLUX_DIFFUSERS_READABLE_TARGETS = (r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)"
                                   r"|ff(_context)?\.net\.(0\.proj|2)|norm1(_context)?\.linear)"
                                   r"|single_transformer_blocks\.\d+\.(proj_out|norm\.linear)")


# ----------------------------------------------------------------------------------------------------------
# Tiny models with random LoRA weights
# ----------------------------------------------------------------------------------------------------------


def clip_text_model(width: int, with_projection: bool = False):
    config = CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
                            bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def sd_unet():
    # Two layers per block, as in SD 1.x/2.x.
    return UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32).eval()


def sdxl_unet():
    # SDXL's block layout (no attention at the highest resolution, deeper transformers lower down), shrunk. The
    # cross-attention width is the two encoders' widths (32 + 64); the added condition is text_encoder_2's
    # projection (32) plus 6 time ids of 8.
    return UNet2DConditionModel(sample_size=8, block_out_channels=(32, 32, 64), layers_per_block=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                                cross_attention_dim=96, norm_num_groups=32).eval()


def flux_transformer():
    # diffusers' fast-test Flux config with two blocks of each kind (hidden width 2 x 16 = 32).
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()


def add_random_lora(model, targets: list[str], alpha: float = ALPHA) -> dict:
    """Attach a LoRA with random (not zero-initialised) weights; return its peft state dict."""
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=alpha, target_modules=targets))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return get_peft_model_state_dict(model)


def with_lora(base: dict, targets: dict, alpha: float = ALPHA) -> tuple[dict, dict]:
    """Copies of the ``base`` models with random LoRAs, and their peft state dicts."""
    adapted = {name: copy.deepcopy(model) for name, model in base.items()}
    return adapted, {name: add_random_lora(adapted[name], targets[name], alpha) for name in adapted}


def sd_models():
    torch.manual_seed(0)
    base = {"unet": sd_unet(), "text_encoder": clip_text_model(32)}
    return (base, *with_lora(base, {"unet": UNET_TARGETS, "text_encoder": TEXT_TARGETS}))


def sdxl_models():
    torch.manual_seed(0)
    base = {"unet": sdxl_unet(), "text_encoder": clip_text_model(32),
            "text_encoder_2": clip_text_model(64, with_projection=True)}
    return (base, *with_lora(base, {"unet": UNET_TARGETS, "text_encoder": TEXT_TARGETS,
                                    "text_encoder_2": TEXT_TARGETS}))


def flux_models(targets: list[str]):
    torch.manual_seed(0)
    # with Flux's CLIP-L text encoder, which diffusers' Flux script can train too
    base = {"transformer": flux_transformer(), "text_encoder": clip_text_model(32)}
    return (base, *with_lora(base, {"transformer": targets, "text_encoder": TEXT_TARGETS}))


def sd3_transformer():
    # Two joint blocks, the second context_pre_only as in every SD3; 2 heads x 64 = 128 = 64 x depth, the width
    # ComfyUI assumes when it splits the fused qkv (true of the released SD3 and SD3.5 models).
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32,
                                 caption_projection_dim=128, pooled_projection_dim=96, pos_embed_max_size=16).eval()


def sd3_models(alpha: float):
    torch.manual_seed(0)
    # CLIP-L and CLIP-G, the encoders diffusers' SD3 script (and ours) can train; T5 stays frozen
    base = {"transformer": sd3_transformer(), "text_encoder": clip_text_model(32, with_projection=True),
            "text_encoder_2": clip_text_model(64, with_projection=True)}
    return with_lora(base, {"transformer": T.SD3_TRANSFORMER_TARGETS, "text_encoder": TEXT_TARGETS,
                            "text_encoder_2": TEXT_TARGETS}, alpha)


def peft_weight_changes(model) -> dict:
    """``{layer path: weight change}`` as peft applies it (B @ A * alpha / rank), read from the model's layers."""
    return {name: sum(module.get_delta_weight(adapter).detach() for adapter in module.lora_A)
            for name, module in model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)}


# ----------------------------------------------------------------------------------------------------------
# Checks against ComfyUI's key map
# ----------------------------------------------------------------------------------------------------------


def clip_weight(slot: str, layer_path: str) -> str:
    layer, part = re.fullmatch(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)", layer_path).groups()
    return clients.comfy_clip_weight(slot, int(layer), part)


def assert_comfy_reads(kohya: dict, key_map: dict, expected: dict) -> None:
    """Every key of ``kohya`` is read and the changed weights are exactly ``expected`` ({target: change})."""
    changes, not_loaded = clients.comfy_load(kohya, key_map)
    assert not_loaded == [], f"ComfyUI would log 'lora key not loaded' for {len(not_loaded)} keys: {not_loaded[:4]}"
    assert sorted(changes) == sorted(expected)
    for target, change in expected.items():
        torch.testing.assert_close(changes[target].reshape(change.shape), change, rtol=1e-4, atol=1e-6,
                                   msg=lambda text: f"{target}: {text}")


def test_sd_kohya_file_is_read_whole_by_comfyui_with_peft_weight_changes():
    _, adapted, states = sd_models()
    kohya = T.kohya_state_dict(states, ALPHA, LAYOUTS["sd"])
    unet_config = clients.comfy_unet_config(adapted["unet"].config)
    key_map = {**clients.comfy_unet_key_map(unet_config), **clients.comfy_clip_key_map({"clip_l": 2})}
    expected = {clients.comfy_unet_weight(unet_config, layer): change
                for layer, change in peft_weight_changes(adapted["unet"]).items()}
    expected.update({clip_weight("clip_l", layer): change
                     for layer, change in peft_weight_changes(adapted["text_encoder"]).items()})
    # (2 down + 1 mid + 3 up) transformers x 2 attentions x 4 layers, and 2 CLIP layers x 4
    assert len(expected) == 6 * 2 * 4 + 2 * 4
    assert_comfy_reads(kohya, key_map, expected)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya
    assert all(value.item() == ALPHA for key, value in kohya.items() if key.endswith(".alpha"))


def test_comfyui_check_rejects_the_text_encoder_names_of_issue_11():
    # Before the fix the exporter ran diffusers' converter on transformers 5's flattened CLIPTextModel names:
    # lora_te_encoder_layers_..., which ComfyUI and A1111 do not know.
    _, _, states = sd_models()
    old = {key.replace("lora_te1_", "lora_te_"): value for key, value in convert_state_dict_to_kohya(
        {f"text_encoder.{key}": value for key, value in states["text_encoder"].items()}).items()}
    assert next(iter(old)).startswith("lora_te_encoder_layers_")
    _, not_loaded = clients.comfy_load(old, clients.comfy_clip_key_map({"clip_l": 2}))
    assert sorted(not_loaded) == sorted(old)


def test_sdxl_kohya_file_uses_sgm_unet_names_and_is_read_whole_by_comfyui():
    _, adapted, states = sdxl_models()
    kohya = T.kohya_state_dict(states, ALPHA, LAYOUTS["sdxl"], {"layers_per_block": 2})
    unet_config = clients.comfy_unet_config(adapted["unet"].config)
    key_map = {**clients.comfy_unet_key_map(unet_config),
               **clients.comfy_clip_key_map({"clip_l": 2, "clip_g": 2})}
    expected = {clients.comfy_unet_weight(unet_config, layer): change
                for layer, change in peft_weight_changes(adapted["unet"]).items()}
    for component, slot in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        expected.update({clip_weight(slot, layer): change
                         for layer, change in peft_weight_changes(adapted[component]).items()})
    assert_comfy_reads(kohya, key_map, expected)
    # SGM names, which A1111 and Forge read as they are and kohya's sd-scripts writes for SDXL
    unet_layers = {key.split(".")[0] for key in kohya if key.startswith("lora_unet_")}
    assert all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d", key) for key in unet_layers)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in unet_layers
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in kohya


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_sd_and_sdxl_kohya_files_match_automatic1111_layers(family):
    _, adapted, states = sd_models() if family == "sd" else sdxl_models()
    kohya = T.kohya_state_dict(states, ALPHA, LAYOUTS[family], {"layers_per_block": 2})
    unet_config = clients.comfy_unet_config(adapted["unet"].config)
    names = clients.a1111_layer_names(unet_config, clip_layers=2, family=family)
    expected = {"diffusion_model_" + clients.underscored(clients.comfy_unet_weight(unet_config, layer)[
        len("diffusion_model."):-len(".weight")]) for layer in peft_weight_changes(adapted["unet"])}
    first_clip = "transformer_text_model" if family == "sd" else "0_transformer_text_model"
    expected |= {f"{first_clip}_{clients.underscored(layer.removeprefix('text_model.'))}"
                 for layer in peft_weight_changes(adapted["text_encoder"])}
    if family == "sdxl":  # OpenCLIP: q, k, v filed under the fused attention, with all four present per layer
        expected |= {f"1_model_transformer_resblocks_{index}_attn_{part}_proj"
                     for index in range(2) for part in ("q", "k", "v", "out")}
    layers = {key.split(".")[0] for key in kohya}
    matched = {layer: clients.a1111_layer(layer, names) for layer in layers}
    assert [layer for layer, name in matched.items() if name is None] == []
    assert sorted(matched.values()) == sorted(expected)


@pytest.mark.parametrize("config", [
    (dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, transformer_layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)),
    (dict(block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))),
], ids=["sd15", "sdxl"])
def test_sgm_names_match_comfyui_for_every_layer_of_the_real_unets(config):
    # The full-size block layouts (config values of the released models), every Linear/Conv layer of their res
    # blocks and transformers, not only those a tiny test model has.
    mapping = clients.comfy_unet_to_diffusers(clients.comfy_unet_config(SimpleNamespace(**config)))
    layers = {diffusers[:-len(".weight")]: sgm[:-len(".weight")] for diffusers, sgm in mapping.items()
              if not re.search(r"(^|\.)norm\d?\.weight$", diffusers)}
    assert len(layers) > 100
    for diffusers_layer, sgm_layer in layers.items():
        assert T.sgm_unet_layer(diffusers_layer, config["layers_per_block"]) == sgm_layer, diffusers_layer


@pytest.mark.parametrize("targets", [FLUX_DEFAULT_TARGETS, FLUX_ALL_TARGETS], ids=["diffusers-default", "all"])
def test_flux_kohya_file_uses_bfl_names_and_is_read_whole_by_comfyui(targets):
    _, adapted, states = flux_models(targets)
    kohya = T.kohya_state_dict(states, ALPHA, LAYOUTS["flux"])
    transformer = adapted["transformer"]
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    mapping = clients.comfy_flux_to_diffusers(transformer.config.num_layers, transformer.config.num_single_layers,
                                              hidden)
    key_map = {**clients.comfy_flux_key_map(transformer.config.num_layers, transformer.config.num_single_layers,
                                            hidden), **clients.comfy_clip_key_map({"clip_l": 2})}
    changes, not_loaded = clients.comfy_load(kohya, key_map)
    assert not_loaded == [], f"ComfyUI would log 'lora key not loaded' for {not_loaded[:4]}"
    assert all(key.startswith(("lora_unet_", "lora_te1_text_model_")) for key in kohya)
    # The text encoder: each CLIP layer changed as peft changes it
    clip_changes = {target: change for target, change in changes.items() if isinstance(target, str)}
    expected_clip = {clip_weight("clip_l", layer): change
                     for layer, change in peft_weight_changes(adapted["text_encoder"]).items()}
    assert sorted(clip_changes) == sorted(expected_clip)
    for target, change in expected_clip.items():
        torch.testing.assert_close(clip_changes[target], change, rtol=1e-4, atol=1e-6)
    changes = {target: change for target, change in changes.items() if not isinstance(target, str)}
    # Each trained layer's change sits in its BFL weight (in its rows, for the fused qkv / linear1) ...
    covered = {}
    for layer, change in peft_weight_changes(transformer).items():
        bfl_weight, rows = mapping[f"{layer}.weight"]
        target = f"diffusion_model.{bfl_weight}"
        assert (target, None) in changes, f"{layer} ({bfl_weight}) is missing from the kohya file"
        first, count = rows if rows else (0, change.shape[0])
        torch.testing.assert_close(changes[(target, None)][first:first + count], change, rtol=1e-4, atol=1e-6,
                                   msg=lambda text: f"{layer}: {text}")
        covered.setdefault(target, []).append((first, count))
    # ... and nothing else changes: no other weights, and zero in rows of fused layers that had no LoRA.
    assert sorted(target for target, _ in changes) == sorted(covered)
    for target, ranges in covered.items():
        untouched = torch.ones(changes[(target, None)].shape[0], dtype=torch.bool)
        for first, count in ranges:
            untouched[first:first + count] = False
        assert torch.count_nonzero(changes[(target, None)][untouched]) == 0, target
    assert all(value.item() == ALPHA for key, value in kohya.items() if key.endswith(".alpha"))
    if targets is FLUX_DEFAULT_TARGETS:  # q, k, v of the single blocks fused without proj_mlp
        assert kohya["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (3 * hidden + 4 * hidden, 3 * RANK)


@pytest.mark.parametrize("alpha", [RANK, ALPHA], ids=["alpha=rank", "alpha!=rank"])
def test_sd3_diffusers_file_is_read_whole_by_comfyui(tmp_path, alpha):
    """SD3 has no kohya layout: ComfyUI reads the diffusers-format file the script writes (transformer.<diffusers
    name>, lora_A/lora_B). Every key is read, every trained layer lands in its SAI weight (q, k, v in their rows of the
    fused qkv), and nothing else changes. The file carries alpha only in diffusers' metadata, which ComfyUI does not
    read: its change is B @ A, right when --lora_alpha is the rank (the default) and off by rank/alpha otherwise,
    which the script warns about."""
    adapted, _ = sd3_models(alpha)
    accelerator = SimpleNamespace(unwrap_model=lambda model: model, distributed_type=T.DistributedType.NO)
    peft_states = T.peft_state_dicts(accelerator, T.StableDiffusion3Family, adapted, train_text_encoder=True)
    StableDiffusion3Pipeline.save_lora_weights(tmp_path, **T.lora_save_arguments(
        accelerator, T.StableDiffusion3Family, adapted, peft_states))
    saved = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    depth = adapted["transformer"].config.num_layers
    key_map = {**clients.comfy_sd3_key_map(depth), **clients.comfy_clip_key_map({"clip_l": 2, "clip_g": 2})}
    changes, not_loaded = clients.comfy_load(saved, key_map)
    assert not_loaded == [], f"ComfyUI would log 'lora key not loaded' for {not_loaded[:4]}"
    comfy_scale = RANK / alpha  # ComfyUI's B @ A against peft's B @ A * alpha / rank
    expected = {clip_weight(slot, layer): change * comfy_scale
                for slot, component in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"))
                for layer, change in peft_weight_changes(adapted[component]).items()}
    width = 64 * depth
    for layer, change in peft_weight_changes(adapted["transformer"]).items():
        target = clients.comfy_sd3_key_map(depth)[f"transformer.{layer}"]
        assert target[1] is None or target[1][1] == width == change.shape[0]
        expected[target] = change * comfy_scale
    assert sorted(changes, key=str) == sorted(expected, key=str)
    for target, change in expected.items():
        torch.testing.assert_close(changes[target], change, rtol=1e-4, atol=1e-6, msg=lambda text: f"{target}: {text}")


def test_kohya_state_dict_rejects_what_it_cannot_name():
    _, _, states = sd_models()
    with pytest.raises(ValueError, match="must be a KohyaLayout"):
        T.kohya_state_dict(states, ALPHA, "sd")  # a layout's name is not a layout
    with pytest.raises(ValueError, match="text_encoder_2"):
        T.kohya_state_dict({"text_encoder_2": states["text_encoder"]}, ALPHA, LAYOUTS["sd"])
    with pytest.raises(ValueError, match="conv_in"):
        T.kohya_state_dict({"unet": {"conv_in.lora_A.weight": torch.zeros(1), "conv_in.lora_B.weight":
                                     torch.zeros(1)}}, ALPHA, LAYOUTS["sdxl"])


# ----------------------------------------------------------------------------------------------------------
# Both files in diffusers
# ----------------------------------------------------------------------------------------------------------


def sd_outputs(models: dict) -> dict:
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    ids = torch.randint(3, 1000, (2, 12), generator=generator)
    with torch.no_grad():
        outputs = {"text_encoder": models["text_encoder"](ids).last_hidden_state}
        context = torch.randn(2, 12, 32, generator=generator)
        outputs["unet"] = models["unet"](latents, torch.tensor([10, 500]), context).sample
    return outputs


def sdxl_outputs(models: dict) -> dict:
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    ids = torch.randint(3, 1000, (2, 12), generator=generator)
    with torch.no_grad():
        outputs = {"text_encoder": models["text_encoder"](ids).last_hidden_state,
                   "text_encoder_2": models["text_encoder_2"](ids).text_embeds}
        context = torch.randn(2, 12, 96, generator=generator)
        added = {"text_embeds": torch.randn(2, 32, generator=generator),
                 "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
        outputs["unet"] = models["unet"](latents, torch.tensor([10, 500]), context, added_cond_kwargs=added).sample
    return outputs


def flux_outputs(models: dict) -> dict:
    generator = torch.Generator().manual_seed(2)
    image_tokens, text_tokens = 16, 6
    with torch.no_grad():
        sample = models["transformer"](
            hidden_states=torch.randn(1, image_tokens, 4, generator=generator),
            encoder_hidden_states=torch.randn(1, text_tokens, 32, generator=generator),
            pooled_projections=torch.randn(1, 32, generator=generator),
            timestep=torch.tensor([0.5]),
            img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                               indexing="ij"), dim=-1).reshape(-1, 3),
            txt_ids=torch.zeros(text_tokens, 3),
        ).sample
        ids = torch.randint(3, 1000, (2, 12), generator=generator)
        return {"transformer": sample, "text_encoder": models["text_encoder"](ids).last_hidden_state}


def sd_pipeline(models):
    return StableDiffusionPipeline(vae=None, tokenizer=None, scheduler=None, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False, **models)


def sdxl_pipeline(models):
    return StableDiffusionXLPipeline(vae=None, tokenizer=None, tokenizer_2=None, scheduler=None,
                                     add_watermarker=False, **models)


def flux_pipeline(models):
    return FluxPipeline(**{"scheduler": None, "vae": None, "text_encoder": None, "tokenizer": None,
                           "text_encoder_2": None, "tokenizer_2": None, **models})


@pytest.mark.parametrize("family, make_models, make_pipeline, outputs", [
    ("sd", sd_models, sd_pipeline, sd_outputs),
    ("sdxl", sdxl_models, sdxl_pipeline, sdxl_outputs),
    ("flux", lambda: flux_models(FLUX_DIFFUSERS_READABLE_TARGETS), flux_pipeline, flux_outputs),
], ids=["sd", "sdxl", "flux"])
def test_diffusers_and_kohya_files_load_in_diffusers_like_the_peft_model(tmp_path, family, make_models,
                                                                         make_pipeline, outputs):
    base, adapted, states = make_models()
    pipeline_class = type(make_pipeline({name: None for name in base}))
    # As diffusers' training scripts save: UNet and CLIP layers in diffusers naming, Flux's in peft naming (the
    # converted names lose Flux's attention layers in FluxPipeline.load_lora_weights).
    convert = (lambda state: state) if family == "flux" else convert_state_dict_to_diffusers
    pipeline_class.save_lora_weights(
        tmp_path, **{f"{name}_lora_layers": convert(state) for name, state in states.items()},
        **_collate_lora_metadata(adapted))
    layers_per_block = base["unet"].config.layers_per_block if "unet" in base else 2
    T.save_kohya_weights(tmp_path, states, ALPHA, LAYOUTS[family], {"layers_per_block": layers_per_block})
    assert set(load_file(tmp_path / "pytorch_lora_weights_kohya.safetensors")) == set(
        T.kohya_state_dict(states, ALPHA, LAYOUTS[family], {"layers_per_block": layers_per_block}))
    before, expected = outputs(base), outputs(adapted)
    for part in expected:  # every component's LoRA visibly changes its output
        assert (expected[part] - before[part]).abs().max() > 1e-2, part
    for weight_name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        models = {name: copy.deepcopy(model) for name, model in base.items()}
        make_pipeline(models).load_lora_weights(tmp_path, weight_name=weight_name)
        loaded = outputs(models)
        for part in expected:
            torch.testing.assert_close(loaded[part], expected[part], rtol=1e-4, atol=1e-5,
                                       msg=lambda text: f"{weight_name}, {part}: {text}")
