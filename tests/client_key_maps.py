"""The LoRA key names real clients read, rebuilt from their source, to check exported files against.

The rules below were read (with the search tools) from these files and written here from that reading; none of
the clients' code is copied:

- ComfyUI, comfy/lora.py at ee9834b8ca0d339c2bc0be3cf6ea8db02bc698df: ``load_lora`` (the keys of a file it
  consumes; every other key is logged as "lora key not loaded"), ``model_lora_keys_clip``, ``model_lora_keys_unet``.
- ComfyUI, comfy/weight_adapter/lora.py at 6fd406fb14ca663225b88c6f75d7a7f2b997e5a0: layer ``x`` is read from
  ``x.lora_up.weight`` and ``x.lora_down.weight`` (``x.alpha`` in ``load_lora``), and the weight changes by
  ``up @ down * alpha / rank``, rank being the rows of ``down``.
- ComfyUI, comfy/utils.py at 2ba5cc8b867bc1aabe59fdaf0a8489e65012d603: ``unet_to_diffusers``.
- ``flux_to_diffusers``: the stored comfy/utils.py versions predate Flux, so it was read from ComfyUI's code as
  Forge vendors it, lllyasviel/stable-diffusion-webui-forge packages_3rdparty/comfyui_lora_collection/utils.py at
  00f1cd36bd25431445eb67425ad39434c68c8665. Forge's loader (backend/patcher/lora.py at
  cea9f37fa5fd5b4c372b95bd46635f4241f60d26) uses that vendored ``model_lora_keys_unet``/``model_lora_keys_clip``
  (packages_3rdparty/comfyui_lora_collection/lora.py at 5e1dcd35a8535564884a4116f6bbb37dbb8dfc46), which have the
  same rules for the names checked here, so Forge reads what ComfyUI reads.

- AUTOMATIC1111 stable-diffusion-webui, extensions-builtin/Lora/networks.py at
  873edba44bedf0086d52343f282552b3601baeb8 (SD 1.x/2.x and SDXL; A1111 has no Flux): see a1111_layer below.

Only the names our exporter could write are rebuilt (kohya ``lora_unet_``/``lora_te*_`` names, and for Flux also
the diffusers forms ComfyUI maps with row offsets); ComfyUI accepts further formats that are left out.
"""

import re

# ComfyUI's LORA_CLIP_MAP: the CLIP layers a text-encoder LoRA may patch, and their underscored kohya spelling.
CLIP_LORA_LAYERS = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj",
                    "self_attn.out_proj")


def underscored(path: str) -> str:
    return path.replace(".", "_")


# ----------------------------------------------------------------------------------------------------------
# Text encoders (model_lora_keys_clip). ComfyUI holds each CLIP as "<slot>.transformer.text_model.…", with slot
# clip_l (SD 1.x, SDXL's first encoder, Flux), clip_h (SD 2.x) or clip_g (SDXL's second encoder).
# ----------------------------------------------------------------------------------------------------------


def comfy_clip_weight(slot: str, layer: int, part: str) -> str:
    return f"{slot}.transformer.text_model.encoder.layers.{layer}.{part}.weight"


def comfy_clip_key_map(slots: dict) -> dict:
    """``{LoRA layer name: CLIP weight}`` ComfyUI builds for a model with ``slots`` = ``{slot: number of layers}``."""
    key_map = {}
    has_clip_l = "clip_l" in slots
    for slot, layers in slots.items():
        for layer in range(min(layers, 32)):  # ComfyUI looks at layers 0..31 only
            for part in CLIP_LORA_LAYERS:
                weight = comfy_clip_weight(slot, layer, part)
                kohya_tail = f"text_model_encoder_layers_{layer}_{underscored(part)}"
                diffusers_tail = f"text_model.encoder.layers.{layer}.{part}"
                if slot in ("clip_l", "clip_h"):
                    names = [f"lora_te_{kohya_tail}", f"lora_te1_{kohya_tail}", f"text_encoder.{diffusers_tail}"]
                elif has_clip_l:  # clip_g next to clip_l: SDXL's second encoder
                    names = [f"lora_te2_{kohya_tail}", f"text_encoder_2.{diffusers_tail}"]
                else:  # clip_g alone (SDXL refiner, Stable Cascade)
                    names = [f"lora_te_{kohya_tail}", f"text_encoder.{diffusers_tail}",
                             f"lora_prior_te_{kohya_tail}"]
                key_map.update(dict.fromkeys(names, weight))
    return key_map


# ----------------------------------------------------------------------------------------------------------
# SD 1.x/2.x and SDXL UNets (model_lora_keys_unet + unet_to_diffusers). ComfyUI holds the UNet in SGM/LDM
# naming under "diffusion_model."; it accepts lora_unet_<SGM name> for each of its weights and lora_unet_<diffusers
# name> for each weight unet_to_diffusers maps.
# ----------------------------------------------------------------------------------------------------------

RESNET_LAYERS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
ATTENTION_LAYERS = ("proj_in", "proj_out", "norm")
TRANSFORMER_BLOCK_LAYERS = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                            "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def comfy_unet_config(config) -> dict:
    """The UNet description ComfyUI's model detection derives from the SGM checkpoint equivalent to a diffusers
    ``UNet2DConditionModel`` config: per-level res blocks, and transformer depth per input / output res block
    (output list ordered from the highest resolution, as unet_to_diffusers pops it from the end)."""
    levels = len(config.block_out_channels)
    per_level = config.layers_per_block
    per_level = list(per_level) if isinstance(per_level, (list, tuple)) else [per_level] * levels
    depth = config.transformer_layers_per_block
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * levels
    input_depth, output_depth = [], []
    for level in range(levels):
        has_attention = "CrossAttn" in config.down_block_types[level]
        input_depth += [depth[level] if has_attention else 0] * per_level[level]
        up_has_attention = "CrossAttn" in config.up_block_types[levels - 1 - level]
        output_depth += [depth[level] if up_has_attention else 0] * (per_level[level] + 1)
    return {"num_res_blocks": per_level, "transformer_depth": input_depth, "transformer_depth_output": output_depth,
            "transformer_depth_middle": depth[-1]}


def comfy_unet_to_diffusers(unet_config: dict) -> dict:
    """``{diffusers weight: SGM weight}`` for the res blocks and transformers, following unet_to_diffusers."""
    res_blocks = unet_config["num_res_blocks"]
    input_depth = list(unet_config["transformer_depth"])
    output_depth = list(unet_config["transformer_depth_output"])
    mapping = {}

    def add_resnet(diffusers_prefix, sgm_prefix):
        for diffusers_name, sgm_name in RESNET_LAYERS.items():
            mapping[f"{diffusers_prefix}.{diffusers_name}.weight"] = f"{sgm_prefix}.{sgm_name}.weight"

    def add_attention(diffusers_prefix, sgm_prefix, transformers):
        for name in ATTENTION_LAYERS:
            mapping[f"{diffusers_prefix}.{name}.weight"] = f"{sgm_prefix}.{name}.weight"
        for block in range(transformers):
            for name in TRANSFORMER_BLOCK_LAYERS:
                mapping[f"{diffusers_prefix}.transformer_blocks.{block}.{name}.weight"] = (
                    f"{sgm_prefix}.transformer_blocks.{block}.{name}.weight")

    for level, count in enumerate(res_blocks):
        first = 1 + (count + 1) * level  # input_blocks.0 is conv_in; each level ends with its downsampler
        for index in range(count):
            add_resnet(f"down_blocks.{level}.resnets.{index}", f"input_blocks.{first + index}.0")
            transformers = input_depth.pop(0)
            if transformers:
                add_attention(f"down_blocks.{level}.attentions.{index}", f"input_blocks.{first + index}.1",
                              transformers)
    add_attention("mid_block.attentions.0", "middle_block.1", unet_config["transformer_depth_middle"])
    for index, block in enumerate((0, 2)):
        add_resnet(f"mid_block.resnets.{index}", f"middle_block.{block}")
    for level, count in enumerate(reversed(res_blocks)):  # up_blocks.0 is the lowest resolution
        first = (count + 1) * level
        for index in range(count + 1):
            add_resnet(f"up_blocks.{level}.resnets.{index}", f"output_blocks.{first + index}.0")
            transformers = output_depth.pop()
            if transformers:
                add_attention(f"up_blocks.{level}.attentions.{index}", f"output_blocks.{first + index}.1",
                              transformers)
    return mapping


def comfy_unet_key_map(unet_config: dict) -> dict:
    """``{LoRA layer name: UNet weight}`` ComfyUI builds: both the SGM and the diffusers spelling after lora_unet_."""
    key_map = {}
    for diffusers_weight, sgm_weight in comfy_unet_to_diffusers(unet_config).items():
        target = f"diffusion_model.{sgm_weight}"
        key_map[f"lora_unet_{underscored(sgm_weight[:-len('.weight')])}"] = target
        key_map[f"lora_unet_{underscored(diffusers_weight[:-len('.weight')])}"] = target
    return key_map


def comfy_unet_weight(unet_config: dict, diffusers_layer: str) -> str:
    """The ComfyUI weight a trained diffusers UNet layer lives in."""
    return "diffusion_model." + comfy_unet_to_diffusers(unet_config)[f"{diffusers_layer}.weight"]


# ----------------------------------------------------------------------------------------------------------
# Flux (model_lora_keys_unet's Flux branch + flux_to_diffusers). ComfyUI holds Flux in Black Forest Labs naming:
# one Linear for q, k, v (double blocks' img_attn.qkv / txt_attn.qkv) and for q, k, v, mlp (single blocks'
# linear1). It accepts lora_unet_<BFL name> for every weight, and transformer.<diffusers name> /
# lora_transformer_<diffusers name> for a row range of the BFL weight.
# ----------------------------------------------------------------------------------------------------------


def comfy_flux_to_diffusers(depth: int, depth_single_blocks: int, hidden_size: int) -> dict:
    """``{diffusers Linear weight: (BFL weight, (first row, rows) or None)}``, following flux_to_diffusers."""
    mapping = {}
    for block in range(depth):
        diffusers, bfl = f"transformer_blocks.{block}", f"double_blocks.{block}"
        for stream, names in (("img_attn", ("to_q", "to_k", "to_v")), ("txt_attn", ("add_q_proj", "add_k_proj",
                                                                                      "add_v_proj"))):
            for part, name in enumerate(names):
                mapping[f"{diffusers}.attn.{name}.weight"] = (f"{bfl}.{stream}.qkv.weight",
                                                              (part * hidden_size, hidden_size))
        for diffusers_name, bfl_name in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                                         ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                                         ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                                         ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
            mapping[f"{diffusers}.{diffusers_name}.weight"] = (f"{bfl}.{bfl_name}.weight", None)
    for block in range(depth_single_blocks):
        diffusers, bfl = f"single_transformer_blocks.{block}", f"single_blocks.{block}"
        for part, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            mapping[f"{diffusers}.{name}.weight"] = (f"{bfl}.linear1.weight", (part * hidden_size, hidden_size))
        mapping[f"{diffusers}.proj_mlp.weight"] = (f"{bfl}.linear1.weight", (3 * hidden_size, 4 * hidden_size))
        mapping[f"{diffusers}.proj_out.weight"] = (f"{bfl}.linear2.weight", None)
        mapping[f"{diffusers}.norm.linear.weight"] = (f"{bfl}.modulation.lin.weight", None)
    for diffusers_name, bfl_name in (("proj_out", "final_layer.linear"), ("x_embedder", "img_in"),
                                     ("context_embedder", "txt_in"),
                                     ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                                     ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
                                     ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
                                     ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
                                     ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                                     ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")):
        mapping[f"{diffusers_name}.weight"] = (f"{bfl_name}.weight", None)
    return mapping


def comfy_flux_key_map(depth: int, depth_single_blocks: int, hidden_size: int) -> dict:
    """``{LoRA layer name: (Flux weight, row range or None)}`` ComfyUI builds for a Flux model."""
    key_map = {}
    for diffusers_weight, (bfl_weight, rows) in comfy_flux_to_diffusers(depth, depth_single_blocks,
                                                                        hidden_size).items():
        target = (f"diffusion_model.{bfl_weight}", rows)
        diffusers_layer = diffusers_weight[:-len(".weight")]
        key_map[f"transformer.{diffusers_layer}"] = target
        key_map[f"lora_transformer_{underscored(diffusers_layer)}"] = target
        # the generic rule: every model weight under its own (BFL) name
        key_map[f"lora_unet_{underscored(bfl_weight[:-len('.weight')])}"] = (f"diffusion_model.{bfl_weight}", None)
    return key_map


# ----------------------------------------------------------------------------------------------------------
# SD3 / SD3.5 (model_lora_keys_unet's SD3 branch with comfy/utils.py mmdit_to_diffusers): ComfyUI holds the MMDiT
# under its SAI names (joint_blocks.N.x_block / context_block, fused qkv) and reads a diffusers file's
# transformer.<diffusers name> layers into them; q, k, v land in rows of the fused qkv at ComfyUI's width,
# 64 x depth (true of SD3 medium, SD3.5 medium and large).
# ----------------------------------------------------------------------------------------------------------

MMDIT_BLOCK_LAYERS = (("attn.to_out.0", "x_block.attn.proj"), ("attn.to_add_out", "context_block.attn.proj"),
                      ("ff.net.0.proj", "x_block.mlp.fc1"), ("ff.net.2", "x_block.mlp.fc2"),
                      ("ff_context.net.0.proj", "context_block.mlp.fc1"), ("ff_context.net.2", "context_block.mlp.fc2"),
                      ("norm1.linear", "x_block.adaLN_modulation.1"),
                      ("norm1_context.linear", "context_block.adaLN_modulation.1"))


def comfy_sd3_key_map(depth: int) -> dict:
    """``{LoRA layer name: (MMDiT weight, row range or None)}`` ComfyUI builds for SD3's diffusers-format LoRAs."""
    key_map, width = {}, 64 * depth
    for block in range(depth):
        diffusers, sai = f"transformer.transformer_blocks.{block}", f"diffusion_model.joint_blocks.{block}"
        for stream, names in (("x_block", ("to_q", "to_k", "to_v")),
                              ("context_block", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for part, name in enumerate(names):
                key_map[f"{diffusers}.attn.{name}"] = (f"{sai}.{stream}.attn.qkv.weight", (part * width, width))
        for diffusers_name, sai_name in MMDIT_BLOCK_LAYERS:
            key_map[f"{diffusers}.{diffusers_name}"] = (f"{sai}.{sai_name}.weight", None)
    return key_map


# ----------------------------------------------------------------------------------------------------------
# Loading (load_lora + the LoRA weight adapter)
# ----------------------------------------------------------------------------------------------------------


def comfy_load(lora: dict, key_map: dict) -> tuple[dict, list]:
    """What ComfyUI makes of a LoRA file: ``{target: weight change}`` and the keys it reports as "lora key not
    loaded". A target is a weight name, or for Flux and SD3 ``(weight name, row range or None)``. Layers are read in
    kohya's ``lora_up``/``lora_down`` form or diffusers' ``lora_B``/``lora_A`` form (comfy/weight_adapter/lora.py,
    ``diffusers2_lora``); without an ``alpha`` key the change is ``up @ down`` unscaled."""
    loaded, changes = set(), {}
    for name, target in key_map.items():
        alpha = lora.get(f"{name}.alpha")
        if alpha is not None:
            loaded.add(f"{name}.alpha")
        for up_key, down_key in ((f"{name}.lora_up.weight", f"{name}.lora_down.weight"),  # kohya
                                 (f"{name}.lora_B.weight", f"{name}.lora_A.weight")):  # diffusers/peft
            up, down = lora.get(up_key), lora.get(down_key)
            if up is not None:
                break
        if up is None:
            continue
        loaded.update((up_key, down_key))
        rank = down.shape[0]
        scale = alpha.item() / rank if alpha is not None else 1.0
        changes[target] = (up.flatten(1).float() @ down.flatten(1).float()) * scale
    return changes, [key for key in lora if key not in loaded]


# ----------------------------------------------------------------------------------------------------------
# AUTOMATIC1111 (stable-diffusion-webui, extensions-builtin/Lora/networks.py at
# 873edba44bedf0086d52343f282552b3601baeb8: convert_diffusers_name_to_compvis, assign_network_names_to_compvis_modules,
# load_network, network_apply_weights). A1111 names every module of its SGM model with dots made underscores:
# the UNet under diffusion_model_, SD 1.x's CLIP under transformer_text_model_, SDXL's first CLIP under
# 0_transformer_text_model_ and its second (OpenCLIP, fused in_proj) under 1_model_transformer_resblocks_.
# ----------------------------------------------------------------------------------------------------------

A1111_RESNET_LAYERS = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                       "conv_shortcut": "skip_connection"}
OPENCLIP_LAYERS = {"self_attn_q_proj": "attn_q_proj", "self_attn_k_proj": "attn_k_proj",
                   "self_attn_v_proj": "attn_v_proj", "self_attn_out_proj": "attn_out_proj", "mlp_fc1": "mlp_c_fc",
                   "mlp_fc2": "mlp_c_proj"}


def a1111_layer_names(unet_config: dict, clip_layers: int, family: str) -> set:
    """The module names A1111 gives an SD 1.x (``family="sd"``) or SDXL model, for the layers a LoRA may patch."""
    names = {f"diffusion_model_{underscored(sgm[:-len('.weight')])}"
             for sgm in comfy_unet_to_diffusers(unet_config).values()}
    for layer in range(clip_layers):
        for part in CLIP_LORA_LAYERS:
            prefix = "transformer" if family == "sd" else "0_transformer"
            names.add(f"{prefix}_text_model_encoder_layers_{layer}_{underscored(part)}")
        if family == "sdxl":
            names.update(f"1_model_transformer_resblocks_{layer}_{name}"
                         for name in ("attn", "attn_out_proj", "mlp_c_fc", "mlp_c_proj"))
    return names


def a1111_compvis_name(layer: str, is_sd2: bool = False) -> str:
    """convert_diffusers_name_to_compvis for the names a LoRA of attention and res-block layers can have."""
    def resnet_suffix(kind, rest):
        return A1111_RESNET_LAYERS.get(rest, rest) if kind == "resnets" else rest

    # A1111 assumes 3 input blocks and 3 output blocks per level (SD 1.x/2.x and SDXL: 2 res blocks + 1)
    if match := re.fullmatch(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", layer):
        level, kind, index, rest = match.groups()
        return (f"diffusion_model_input_blocks_{1 + int(level) * 3 + int(index)}_{1 if kind == 'attentions' else 0}_"
                f"{resnet_suffix(kind, rest)}")
    if match := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", layer):
        kind, index, rest = match.groups()
        return (f"diffusion_model_middle_block_{1 if kind == 'attentions' else int(index) * 2}_"
                f"{resnet_suffix(kind, rest)}")
    if match := re.fullmatch(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", layer):
        level, kind, index, rest = match.groups()
        return (f"diffusion_model_output_blocks_{int(level) * 3 + int(index)}_{1 if kind == 'attentions' else 0}_"
                f"{resnet_suffix(kind, rest)}")
    if match := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", layer):
        index, rest = match.groups()
        if is_sd2:
            return f"model_transformer_resblocks_{index}_{OPENCLIP_LAYERS.get(rest, rest)}"
        return f"transformer_text_model_encoder_layers_{index}_{rest}"
    if match := re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", layer):
        index, rest = match.groups()
        return f"1_model_transformer_resblocks_{index}_{OPENCLIP_LAYERS.get(rest, rest)}"
    return layer


def a1111_layer(layer: str, layer_names: set, is_sd2: bool = False) -> str | None:
    """The name load_network files a LoRA layer under, or None where it reports "Failed to match keys".

    q/k/v of an OpenCLIP attention keep their suffix (``..._attn_q_proj``) and find the MultiheadAttention
    ``..._attn``; network_apply_weights then changes its in_proj only when q, k, v and out_proj are all there.
    """
    name = a1111_compvis_name(layer, is_sd2)
    if name in layer_names:
        return name
    match = re.fullmatch(r"(.*)_([qkv]_proj)", name)
    if match and match.group(1) in layer_names:
        return name
    if "lora_unet" in layer:
        name = layer.replace("lora_unet", "diffusion_model")
        return name if name in layer_names else None
    if "lora_te1_text_model" in layer:
        for prefix in ("0_transformer_text_model", "transformer_text_model"):
            name = layer.replace("lora_te1_text_model", prefix)
            if name in layer_names:
                return name
    return None
