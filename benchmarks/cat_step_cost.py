#!/usr/bin/env python
"""What one CAT training step costs next to a plain LoRA step: time, FLOPs and memory, side by side.

Eq. 3 of CAT (arXiv 2404.07554, §2.2) needs per step an adapted denoiser forward on y_T and one on y (both with
gradient) and a frozen forward on y (no gradient). This script prepares the models with the training script's
own code (``model_family``, ``prepare_models``, ``PromptEncoder``) and runs ``train_cat_lora.training_step`` for

    lora          the plain LoRA objective (cat_alpha 0)
    lora+prior    plain LoRA with DreamBooth prior preservation (the diffusion batch doubles)
    cat-lean      CAT, diffusion term backwarded before the CAT passes (``--cat_mode lean``)
    cat-batched   CAT, both adapted passes in one denoiser call (``--cat_mode batched``)

on the same batch and seeds and reports, per configuration and as a ratio to ``lora``:

- step time: the full optimizer step users pay (VAE encode, text encode, denoiser passes, backward, gradient
  clipping, AdamW, zero_grad); median over ``--steps`` rounds after ``--warmup``. The configurations run
  interleaved, round by round with the same seed per round, and the time ratio is the median of the per-round
  ratios, so load from other processes on a shared machine hits all configurations alike.
- FLOPs per step (``torch.utils.flop_counter``, forward and backward), in total and by model.
- bytes saved for backward at their peak, counted exactly with ``torch.autograd.graph.saved_tensors_hooks``
  (storage bytes, deduplicated by storage, frozen weights excluded); on CUDA also ``max_memory_allocated``.
- process peak RSS and the step's RSS increment over the RSS after setup, each configuration in a fresh
  subprocess by default (``--rss subprocess``) so that peaks do not mix.
- the denoiser calls of a step, seen by forward hooks on the denoiser (not by replacing any function of the
  training script): whether autograd was on (``torch.is_grad_enabled()``; the frozen pass is the call without
  it), how many rows, and how many LoRA-layer calls ran inside each (the frozen pass must run none: with
  adapters disabled peft skips the low-rank matmuls).

It also prints the denoiser FLOP ratio to LoRA that the FLOP counter measured next to two floors, from counting
denoiser work per step (a LoRA step: one adapted forward and its backward; prior preservation: the same on
twice the batch; CAT: two adapted forwards with their backwards and one frozen forward):

- forward 1, backward 2 (the issue's counting, right when the base weights get gradients): LoRA 3, CAT 7,
  floor 7/3 = 2.33x;
- frozen base, backward 1 (a LoRA backward computes input gradients only, about one forward; the LoRA weight
  gradients are negligible): LoRA 2, CAT 5, floor 5/2 = 2.50x. This is the floor for LoRA training.

``--model``:

    tiny        the tests' tiny SD 1.x pipeline (examples/tiny_pipeline.py), built into a temporary folder
    small       tiny with a (64, 128, 128) U-Net
    tiny-sdxl   the tests' tiny SDXL pipeline (two CLIP encoders of different widths)
    tiny-flux   the tests' tiny Flux.1 pipeline (one double- and one single-stream block, CLIP and a tiny T5)
    tiny-sd3, tiny-qwenimage, tiny-zimage, tiny-flux2-klein, tiny-flux2
                the tests' tiny SD3, Qwen-Image, Z-Image, FLUX.2 [klein] and FLUX.2 [dev] pipelines
    flux-dev    the real Flux.1-dev architecture (transformer 11.9 B parameters, T5-XXL encoder 4.8 B, CLIP-L,
                16-channel VAE) from its configs with random weights; needs a GPU with room for it (bf16: about
                33 GB for the random weights alone; run with --mixed_precision bf16 --max_sequence_length 512)
    toy         the committed toy-world base model, examples/toyworld/models/toy-sd (32x32 images)
    sd15        the real Stable Diffusion 1.5 architecture (U-Net 859.5 M parameters, CLIP ViT-L/14 text
                encoder, VAE) built from its configs with random weights: nothing is downloaded, and speed and
                memory do not depend on the weights. Latents are 1/8 of --resolution; use a multiple of 64.
    sdxl        the real SDXL base 1.0 architecture (U-Net 2.567 B, CLIP ViT-L/14 + OpenCLIP ViT-bigG/14, VAE),
                the same way. About 14 GB of float32 weights (7 GB with --mixed_precision bf16).
    sd35-medium, sd35-large, qwen-image, z-image, flux2-klein-4b, flux2-dev
                the newer families' real architectures (``SPECS``: every component's published config, its source
                cited next to it), the same way: SD3.5 medium (transformer 2.24 B) and large (8.06 B) with CLIP-L,
                bigG and T5-XXL; Qwen-Image (20.4 B, Qwen2.5-VL-7B text encoder 8.29 B); Z-Image (6.15 B, Qwen3-4B);
                FLUX.2 [klein] 4B (3.88 B, Qwen3-4B) and [dev] (32.2 B, Mistral Small 3.x 24.0 B). Too large for
                this machine's memory; ``benchmarks/meta_cost.py`` counts their parameters, FLOPs and saved bytes on
                the meta device, and ``benchmarks/gpu_check.sh`` runs them on a GPU.
    a folder    any local diffusers pipeline folder (or hub id) of a family train_cat_lora.py trains

On a GPU, ``--model sd15 --resolution 512`` and ``--model sdxl --resolution 1024 --mixed_precision bf16`` measure
the real ratios in one command. On a CPU they are slow (on the project's shared 2-core machine, building the
random SD 1.5 U-Net took 24 s and one SD 1.5 LoRA step at 64x64, batch 1, most of a minute or more under load):
use a small ``--resolution``, ``--batch_size 1``, few ``--steps`` and ``--rss off``, and read the result as CPU
figures.

Adding a family (e.g. Flux, whose denoiser is ``transformer``): everything here goes through ``family.denoiser``,
``family.text_encoders`` and the training script's step, so a new family needs only a ``MODELS`` entry that
builds its pipeline folder (a tiny one like ``tiny-sdxl``, or a config-only folder like ``sd15`` for the real
architecture with random weights).

Flux.1's 24 GB recipe: ``--bnb_quantization_config_path nf4.json`` loads the base transformer through diffusers'
quantized loader as train_cat_lora.py does (a GPU is needed; with ``--model flux-dev`` the random weights are
saved into the temporary pipeline folder first, about 24 GB of disk), and ``--pre_compute_text_embeddings``
encodes the prompts once and drops the text encoders (T5-XXL). ``benchmarks/gpu_check.sh`` runs the real
architectures this way on a GPU, within a time budget.

Example: ``python benchmarks/cat_step_cost.py --model tiny-sdxl --resolution 32 --steps 20 --output table.md``.
``--mixed_precision bf16`` runs the frozen base in bfloat16 with float32 LoRA weights under autocast, as
``train_cat_lora.py --mixed_precision bf16`` does.
"""

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import import_module
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import diffusers
import torch
import transformers
from diffusers import ModelMixin, UNet2DConditionModel
from PIL import Image, ImageDraw
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, T5Config

import train_cat_lora as T
from flux_memory_budget import FLUX_DEV
from tiny_pipeline import (
    BUILDERS,
    build_clip_tokenizer,
    build_mistral_processor,
    build_qwen_tokenizer,
    build_t5_tokenizer,
    build_tiny_flux_pipeline,
    build_tiny_pipeline,
    build_tiny_sdxl_pipeline,
)

ROOT = Path(__file__).resolve().parents[1]

TOY_MODEL = ROOT / "examples" / "toyworld" / "models" / "toy-sd"

CONFIGS = {
    "lora": {"cat_alpha": 0.0, "cat_mode": "lean", "prior": False},
    "lora+prior": {"cat_alpha": 0.0, "cat_mode": "lean", "prior": True},
    "cat-lean": {"cat_alpha": 1.0, "cat_mode": "lean", "prior": False},
    "cat-batched": {"cat_alpha": 1.0, "cat_mode": "batched", "prior": False},
    # --cat_prompts: a bank prompt y' per row, in CAT's adapted and frozen passes (more rows, no more calls)
    "cat-bank-lean": {"cat_alpha": 1.0, "cat_mode": "lean", "prior": False, "bank": True},
    "cat-bank-batched": {"cat_alpha": 1.0, "cat_mode": "batched", "prior": False, "bank": True},
}
MIB = 1024 * 1024
PHASES = ["VAE encode", "text encode", "denoiser fwd (grad)", "denoiser fwd (frozen)", "backward", "clip + AdamW"]

# Denoiser work per step, in passes over the instance batch: (adapted passes with gradient, frozen passes).
# Prior preservation runs the adapted denoiser on twice the batch: 2 passes' worth.
DENOISER_PASSES = {"lora": (1, 0), "lora+prior": (2, 0), "cat-lean": (2, 1), "cat-batched": (2, 1),
                   "cat-bank-lean": (3, 2), "cat-bank-batched": (3, 2)}
# Cost of a backward in forwards: 2 when the base weights get gradients (the counting), 1 with a frozen
# base (a LoRA backward computes input gradients only).
BACKWARD_UNITS = {"issue": 2, "frozen base": 1}


def denoiser_units(config: str, backward_units: int) -> int:
    """Denoiser work of one step of ``config``, counting a forward as 1 and a backward as ``backward_units``."""
    adapted, frozen = DENOISER_PASSES[config]
    return adapted * (1 + backward_units) + frozen


def denoiser_floor_ratio(config: str, backward_units: int) -> float:
    """The denoiser work of ``config`` over a plain LoRA step's: 7/3 for CAT with backward 2, 5/2 with 1."""
    return denoiser_units(config, backward_units) / denoiser_units("lora", backward_units)


def fail(message: str):
    """Bad input: one line naming the flag, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------------------
# The real architectures, as configs (built with random weights: nothing is downloaded)
#
# Sources: the original training configs, converted the way diffusers converts them
# (diffusers/loaders/single_file_utils.py: create_unet_diffusers_config_from_ldm, 0.42.1):
# - SD 1.5: CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml (the config of the v1 checkpoints):
#   model_channels 320, channel_mult [1, 2, 4, 4], attention_resolutions [4, 2, 1], num_res_blocks 2, num_heads 8,
#   transformer_depth 1, context_dim 768; VAE ch 128, ch_mult [1, 2, 4, 4], num_res_blocks 2, z_channels 4;
#   scale_factor 0.18215; betas 0.00085-0.012 over 1000 steps; text encoder FrozenCLIPEmbedder = OpenAI CLIP
#   ViT-L/14's text tower.
# - SDXL base 1.0: Stability-AI/generative-models configs/inference/sd_xl_base.yaml: model_channels 320,
#   channel_mult [1, 2, 4], attention_resolutions [4, 2], num_head_channels 64, use_linear_in_transformer,
#   transformer_depth [1, 2, 10], context_dim 2048, adm_in_channels 2816 (= 1280 pooled + 6 x 256 size/crop
#   embeddings); VAE as SD 1.5's, scale_factor 0.13025; text encoders CLIP ViT-L/14 and OpenCLIP ViT-bigG-14.
# - Text towers: open_clip's model_configs ViT-L-14.json (width 768, heads 12, layers 12, embed 768) and
#   ViT-bigG-14.json (width 1280, heads 20, layers 32, embed 1280), MLP ratio 4; OpenAI CLIP uses QuickGELU.
# Parameter counts these give (checked by tests/test_cat_step_cost.py on the meta device): SD 1.5 U-Net
# 859,520,964; SDXL U-Net 2,567,463,684; VAE 83,653,863; CLIP ViT-L/14 text 123,060,480; bigG text with
# projection 694,659,840.
# ---------------------------------------------------------------------------------------------------------

SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon", "steps_offset": 1}

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8,  # diffusers' name for the number of heads (num_heads 8)
    "cross_attention_dim": 768,
}

SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [5, 10, 20],  # heads: channels / 64
    "use_linear_projection": True,
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,  # 768 (CLIP-L) + 1280 (bigG) penultimate hidden states, concatenated
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


def sd_vae(sample_size: int, scaling_factor: float) -> dict:
    return {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32, "sample_size": sample_size,
            "scaling_factor": scaling_factor}


def clip_text(width: int, heads: int, layers: int, activation: str) -> dict:
    return {"vocab_size": 49408, "max_position_embeddings": 77, "hidden_size": width, "intermediate_size": 4 * width,
            "num_attention_heads": heads, "num_hidden_layers": layers, "projection_dim": width,
            "hidden_act": activation, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}


CLIP_VIT_L_TEXT = clip_text(768, 12, 12, "quick_gelu")
OPENCLIP_BIGG_TEXT = clip_text(1280, 20, 32, "gelu")


@dataclass(frozen=True)
class Architecture:
    """A pipeline as configs: what ``write_config_pipeline`` turns into a folder without weights."""

    pipeline_class: str
    scheduler_class: str
    diffusers_models: dict  # component -> (class name, config)
    text_encoders: dict  # component -> (transformers class name, CLIPTextConfig kwargs)


ARCHITECTURES = {
    "sd15": Architecture(
        "StableDiffusionPipeline", "PNDMScheduler",
        {"unet": ("UNet2DConditionModel", SD15_UNET), "vae": ("AutoencoderKL", sd_vae(512, 0.18215))},
        {"text_encoder": ("CLIPTextModel", CLIP_VIT_L_TEXT)}),
    "sdxl": Architecture(
        "StableDiffusionXLPipeline", "EulerDiscreteScheduler",
        {"unet": ("UNet2DConditionModel", SDXL_UNET), "vae": ("AutoencoderKL", sd_vae(1024, 0.13025))},
        {"text_encoder": ("CLIPTextModel", CLIP_VIT_L_TEXT),
         "text_encoder_2": ("CLIPTextModelWithProjection", OPENCLIP_BIGG_TEXT)}),
}


def write_config_pipeline(architecture: Architecture, out_dir: Path) -> str:
    """A pipeline folder with configs, tokenizers and a scheduler but no weights (see ``RandomWeights``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": architecture.pipeline_class, "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", architecture.scheduler_class]}
    for component, (class_name, config) in architecture.diffusers_models.items():
        (out_dir / component).mkdir(exist_ok=True)
        (out_dir / component / "config.json").write_text(json.dumps({"_class_name": class_name, **config}, indent=1))
        index[component] = ["diffusers", class_name]
    tokenizer = build_clip_tokenizer(out_dir / "_tokenizer_source")
    for number, (component, (class_name, config)) in enumerate(architecture.text_encoders.items()):
        CLIPTextConfig(**config).save_pretrained(out_dir / component)
        index[component] = ["transformers", class_name]
        tokenizer_name = "tokenizer" if number == 0 else f"tokenizer_{number + 1}"
        tokenizer.save_pretrained(out_dir / tokenizer_name)
        index[tokenizer_name] = ["transformers", "CLIPTokenizer"]
    shutil.rmtree(out_dir / "_tokenizer_source")
    scheduler_class = getattr(diffusers, architecture.scheduler_class)
    scheduler_class.from_config(SD_BETAS).save_config(out_dir / "scheduler")
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=1))
    return str(out_dir)


# Flux.1-dev as published (black-forest-labs/FLUX.1-dev's component configs): the transformer of
# benchmarks/flux_memory_budget.py, T5-XXL v1.1's encoder, CLIP ViT-L/14's text tower, the 16-channel VAE, and the
# flow-matching scheduler with resolution-dependent shift. The T5 tokenizer is a small offline one (ids < 32128):
# speed and memory do not depend on the vocabulary's words.
FLUX_DEV_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
                "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
                "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32, "sample_size": 1024,
                "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
                "use_post_quant_conv": False}
T5_XXL_ENCODER = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
                  "num_heads": 64, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False}
FLUX_DEV_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                      "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def write_flux_dev_pipeline(out_dir: Path) -> str:
    """Flux.1-dev as a folder of configs and tokenizers, without weights (see ``RandomWeights``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for component, class_name, config in (("transformer", "FluxTransformer2DModel", FLUX_DEV),
                                          ("vae", "AutoencoderKL", FLUX_DEV_VAE)):
        (out_dir / component).mkdir(exist_ok=True)
        (out_dir / component / "config.json").write_text(json.dumps({"_class_name": class_name, **config}, indent=1))
    CLIPTextConfig(**CLIP_VIT_L_TEXT).save_pretrained(out_dir / "text_encoder")
    T5Config(**T5_XXL_ENCODER).save_pretrained(out_dir / "text_encoder_2")
    build_clip_tokenizer(out_dir / "_tokenizer_source").save_pretrained(out_dir / "tokenizer")
    shutil.rmtree(out_dir / "_tokenizer_source")
    build_t5_tokenizer(max_length=512).save_pretrained(out_dir / "tokenizer_2")
    diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV_SCHEDULER).save_config(out_dir / "scheduler")
    index = {"_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"]}
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=1))
    return str(out_dir)


# ---------------------------------------------------------------------------------------------------------
# The newer families' real architectures: SD3.5, Qwen-Image, Z-Image, FLUX.2 [klein] and [dev]
#
# Every value below is that of the component's published hub config (``<repo>/<component>/config.json``, or the
# scheduler's ``scheduler_config.json``); the comment next to each config says where it was read. Without access to
# the hub, the configs were read from public copies: repositories duplicated from the official ones, or pipelines
# saved from them (their ``_name_or_path`` names the official snapshot), cross-checked where diffusers' conversion
# scripts or model defaults state the same dimensions (diffusers 0.42.1). Values a config leaves out are the
# classes' defaults, as when the hub's config is loaded. The tokenizers are small offline ones (ids below each
# vocabulary's size, see examples/tiny_pipeline.py): only their token counts reach the models' shapes.
# ---------------------------------------------------------------------------------------------------------

def clip_tokenizer_padding_with_bang(source: Path):
    """SD3's second CLIP tokenizer (OpenCLIP bigG's): the CLIP vocabulary, padding with "!" (id 0)."""
    from transformers import CLIPTokenizer

    build_clip_tokenizer(source)
    return CLIPTokenizer(str(source / "vocab.json"), str(source / "merges.txt"), pad_token="!", model_max_length=77)


TOKENIZER_BUILDERS = {
    "clip": build_clip_tokenizer,
    "clip-bang": clip_tokenizer_padding_with_bang,
    "t5": lambda source: build_t5_tokenizer(max_length=512),
    "qwen": lambda source: build_qwen_tokenizer(chat_template=False),  # Qwen2.5-VL's, under Qwen-Image's template
    "qwen-chat": lambda source: build_qwen_tokenizer(chat_template=True),  # Qwen3's chat template
    "mistral": lambda source: build_mistral_processor(),  # FLUX.2 [dev]'s PixtralProcessor
}


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline of any family as configs: what ``write_spec_pipeline`` turns into a folder without weights."""

    pipeline_class: str
    models: dict  # component -> (library, class name, config): diffusers models and transformers text encoders
    tokenizers: dict  # component -> a key of TOKENIZER_BUILDERS
    scheduler: dict  # FlowMatchEulerDiscreteScheduler's config
    extra: dict = field(default_factory=dict)  # other model_index.json entries (FLUX.2 [klein]: is_distilled)


def write_spec_pipeline(spec: PipelineSpec, out_dir: Path) -> str:
    """A pipeline folder with configs, tokenizers and a scheduler but no weights (see ``RandomWeights``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": spec.pipeline_class, "_diffusers_version": diffusers.__version__, **spec.extra,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    for component, (library, class_name, config) in spec.models.items():
        if library == "diffusers":
            (out_dir / component).mkdir(exist_ok=True)
            (out_dir / component / "config.json").write_text(
                json.dumps({"_class_name": class_name, **config}, indent=1))
        else:
            getattr(transformers, class_name).config_class(**config).save_pretrained(out_dir / component)
        index[component] = [library, class_name]
    for component, kind in spec.tokenizers.items():
        source = out_dir / f"_{component}_source"
        tokenizer = TOKENIZER_BUILDERS[kind](source)
        tokenizer.save_pretrained(out_dir / component)
        shutil.rmtree(source, ignore_errors=True)
        index[component] = ["transformers", type(tokenizer).__name__]
    diffusers.FlowMatchEulerDiscreteScheduler.from_config(spec.scheduler).save_config(out_dir / "scheduler")
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=1))
    return str(out_dir)


# Stable Diffusion 3.5 (stabilityai/stable-diffusion-3.5-medium and -large; the repositories are gated, their files
# were read from copies):
# - medium transformer:
#   https://huggingface.co/frankjoshua/stable-diffusion-3.5-medium/blame/b8c39704c0c57074d3d5e942f48c5972be19cab5/transformer/config.json
#   (a copy of the official "SD3.5 Medium Public Release" commit 94b13cc); the same values in
#   https://huggingface.co/Prgckwb/trpfrog-sd3.5-medium/blob/afb7aebc8f5fe41e8700e7b173bd28daf7a56fa7/transformer/config.json
#   (_name_or_path: the official snapshot b940f670). MMDiT-X: dual attention in blocks 0-12, RMS QK norm.
SD35_MEDIUM_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}
# - large transformer: https://huggingface.co/frankjoshua/stable-diffusion-3.5-large/blob/main/transformer/config.json
#   (a copy of the official "SD3.5 Large Public Release" commit 4c4df3f): 38 blocks of 38 heads, no dual attention.
SD35_LARGE_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 38,
    "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096, "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "qk_norm": "rms_norm",
}
# - VAE (medium and large alike):
#   https://huggingface.co/Prgckwb/trpfrog-sd3.5-medium/blame/12d3330e1fee7529a7a1134c2b0869ffcc57dd7d/vae/config.json
#   (_name_or_path: the official medium snapshot b940f670) and
#   https://huggingface.co/ariG23498/sd-3.5-merged/blame/main/vae/config.json
#   (_name_or_path: the official large snapshot ceddf0a7): Flux.1's VAE layout with SD3's scale and shift.
SD35_VAE = {**FLUX_DEV_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
# - text encoders (the same three in medium and large): CLIP-L with projection,
#   https://huggingface.co/Prgckwb/trpfrog-sd3.5-medium/blob/f0df68cf79542fe766c03b5755bce69d135f34ef/text_encoder/config.json;
#   OpenCLIP bigG with projection,
#   https://huggingface.co/Kolyadual/MicroMacro-GenImage-v1-medium/blob/main/text_encoder_2/config.json
#   (both _name_or_path: the official medium snapshot b940f670; large:
#   https://huggingface.co/ariG23498/sd-3.5-merged/blob/main/text_encoder_2/config.json);
#   T5-XXL v1.1's encoder,
#   https://huggingface.co/yandex/stable-diffusion-3.5-medium-alchemist/blob/main/text_encoder_3/config.json
#   (_name_or_path: the official medium snapshot; the values of T5_XXL_ENCODER above).
SD35_CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
               "num_hidden_layers": 12, "max_position_embeddings": 77, "projection_dim": 768,
               "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2,
               "pad_token_id": 1}
SD35_CLIP_G = {**SD35_CLIP_L, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
               "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu"}
# - scheduler:
#   https://huggingface.co/frankjoshua/stable-diffusion-3.5-medium/blob/9e00742220210d11327d9ecb970f8b0b2b69fb7d/scheduler/scheduler_config.json
SD35_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}


def sd35_spec(transformer: dict) -> PipelineSpec:
    return PipelineSpec(
        "StableDiffusion3Pipeline",
        {"transformer": ("diffusers", "SD3Transformer2DModel", transformer),
         "vae": ("diffusers", "AutoencoderKL", SD35_VAE),
         "text_encoder": ("transformers", "CLIPTextModelWithProjection", SD35_CLIP_L),
         "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", SD35_CLIP_G),
         "text_encoder_3": ("transformers", "T5EncoderModel", T5_XXL_ENCODER)},
        {"tokenizer": "clip", "tokenizer_2": "clip-bang", "tokenizer_3": "t5"}, SD35_SCHEDULER)


# Qwen-Image (Qwen/Qwen-Image):
# - transformer: Qwen-Image's transformer/config.json as copied in
#   https://huggingface.co/callgg/qi-decoder/blob/main/transformer/config.json
#   and https://huggingface.co/craftcore/image/blob/main/transformer/config.json; the same values are the defaults
#   of diffusers' QwenImageTransformer2DModel (
#   https://huggingface.co/docs/diffusers/api/models/qwenimage_transformer2d).
QWEN_IMAGE_TRANSFORMER = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60,
                          "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
                          "guidance_embeds": False, "axes_dims_rope": [16, 56, 56]}
# - VAE: https://huggingface.co/wavespeed/Qwen-Image-e4m3/blob/refs%2Fpr%2F2/vae/config.json (_name_or_path: the
#   official snapshot 9e31a1d4): Wan 2.1's causal 3-D VAE (
#   https://huggingface.co/diffusers/Wan2.1-VAE/blob/main/config.json
#   has the same values), 16 channels, normalized per channel.
QWEN_IMAGE_VAE = {
    "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
    "temperal_downsample": [False, True, True], "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                     -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                    1.6382, 1.1253, 2.8251, 1.916],
}
# - text encoder: Qwen2.5-VL-7B-Instruct, https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blame/main/config.json
#   (Qwen-Image's text_encoder/config.json is it re-saved:
#   https://huggingface.co/hfpox/qfn/blob/main/text_encoder/config.json,
#   _name_or_path the official Qwen-Image snapshot 75e0b4be); the vision tower's tokens_per_second and
#   temporal_patch_size, cut off in that view, from the same file's copy
#   https://huggingface.co/Icey444/Ground-R1_orig_1050/blob/main/config.json.
#   Written in transformers 5's nested form (text_config, vision_config).
QWEN25_VL_7B = {
    "text_config": {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": {"rope_type": "default",
                                                                         "mrope_section": [16, 24, 24]},
        "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 28, "attention_dropout": 0.0,
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645},
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_channels": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "tie_word_embeddings": False,
}
# - scheduler: Qwen-Image's scheduler_config.json as copied in https://huggingface.co/FireRedTeam/FireRed-Image-Edit-1.0
#   (a Qwen-Image-Edit fine-tune:
#   https://huggingface.co/devsquad8338/FireRed-Image-Edit-1.0/blob/main/scheduler/scheduler_config.json);
#   the constants of https://docs.rs/crate/mold-ai-inference/0.2.0/source/src/qwen_image/sampling.rs, read from
#   Qwen-Image's, are the same. (Training draws its timesteps by --weighting_scheme: this only sets the table.)
QWEN_IMAGE_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                        "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192,
                        "shift_terminal": 0.02, "time_shift_type": "exponential"}
QWEN_IMAGE = PipelineSpec(
    "QwenImagePipeline",
    {"transformer": ("diffusers", "QwenImageTransformer2DModel", QWEN_IMAGE_TRANSFORMER),
     "vae": ("diffusers", "AutoencoderKLQwenImage", QWEN_IMAGE_VAE),
     "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration", QWEN25_VL_7B)},
    {"tokenizer": "qwen"}, QWEN_IMAGE_SCHEDULER)

# Z-Image (Tongyi-MAI/Z-Image-Turbo; Tongyi-MAI/Z-Image has the same architecture):
# - transformer: https://huggingface.co/srcphag/Z-Image-Turbo/blob/main/transformer/config.json, the official file as
#   added in https://huggingface.co/rootlocalghost/Z-Image-Turbo/commit/ecfd2134ca2e8fb171e635158972414f5f53ac0d
#   (and https://huggingface.co/TheCodingBug/Z-Image-Turbo-int8/blob/main/transformer/config.json, _name_or_path
#   Tongyi-MAI/Z-Image-Turbo): 30 main and 2 + 2 refiner blocks of width 3840.
Z_IMAGE_TRANSFORMER = {"all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
                       "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
                       "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
                       "axes_lens": [1536, 512, 512]}
# - VAE: Flux.1's (FLUX_DEV_VAE), as
#   https://huggingface.co/hsuwill000/Z-Image-Turbo-ov/blob/main/vae_decoder/config.json
#   (_name_or_path: the official snapshot 0e36c2b3) shows.
# - text encoder: Qwen3-4B loaded as Qwen3Model (model_index.json:
#   https://huggingface.co/trialwayneforfun/Z-Image-Turbo/blob/main/model_index.json,
#   duplicated from Tongyi-MAI/Z-Image-Turbo), its config
#   https://huggingface.co/smartdigitalnetworks/Z-Image-Turbo/blob/main/text_encoder/config.json
#   (duplicated from Tongyi-MAI/Z-Image-Turbo), the same as Qwen/Qwen3-4B's.
QWEN3_4B = {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
            "max_position_embeddings": 40960, "max_window_layers": 36, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
            "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False,
            "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645}
# - scheduler: https://huggingface.co/TensorStack/Z-Image-Turbo-ts/blob/main/scheduler/scheduler_config.json (shift 3,
#   no dynamic shift).
Z_IMAGE = PipelineSpec(
    "ZImagePipeline",
    {"transformer": ("diffusers", "ZImageTransformer2DModel", Z_IMAGE_TRANSFORMER),
     "vae": ("diffusers", "AutoencoderKL", FLUX_DEV_VAE),
     "text_encoder": ("transformers", "Qwen3Model", QWEN3_4B)},
    {"tokenizer": "qwen-chat"}, {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False})

# FLUX.2 (black-forest-labs/FLUX.2-klein-4B and FLUX.2-dev):
# - [klein] 4B transformer:
#   https://huggingface.co/YuCollection/FLUX.2-klein-base-4B-Diffusers/blob/main/transformer/config.json
#   (the [klein] base 4B: the distilled 4B has the same architecture), the values of diffusers'
#   scripts/convert_flux2_to_diffusers.py (get_flux2_transformer_config("klein-4b")): 5 double- and 20 single-stream
#   blocks, joint_attention_dim 7680 = 3 x Qwen3-4B's 2560, no guidance embedding.
FLUX2_KLEIN_4B_TRANSFORMER = {"patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20,
                              "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 7680,
                              "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32],
                              "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False}
# - [dev] transformer: diffusers' scripts/convert_flux2_to_diffusers.py, get_flux2_transformer_config("flux2-dev")
#   (model_id black-forest-labs/FLUX.2-dev; guidance_embeds unset there: the class default, True, as FLUX.2 [dev] is
#   guidance-distilled); the values are also Flux2Transformer2DModel's defaults. No copy of the hub file was found.
FLUX2_DEV_TRANSFORMER = {"patch_size": 1, "in_channels": 128, "num_layers": 8, "num_single_layers": 48,
                         "attention_head_dim": 128, "num_attention_heads": 48, "joint_attention_dim": 15360,
                         "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32],
                         "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": True}
# - VAE ([klein] and [dev] share it): https://huggingface.co/codeShare/Flux-Klein-SDNQ-4bit/blob/main/vae/config.json
#   (_name_or_path: the official FLUX.2-klein-4B snapshot e7b7dc27) and
#   https://huggingface.co/kaiyuyue/FLUX.2-dev-vae/blob/main/config.json:
#   32 latent channels, patchified 2 x 2 and normalized by a batch norm.
FLUX2_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
             "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
             "layers_per_block": 2, "act_fn": "silu", "latent_channels": 32, "norm_num_groups": 32,
             "sample_size": 1024, "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True,
             "mid_block_add_attention": True, "batch_norm_eps": 1e-4, "batch_norm_momentum": 0.1,
             "patch_size": [2, 2]}
# - [klein] 4B text encoder: Qwen3-4B as Qwen3ForCausalLM (model_index.json:
#   https://huggingface.co/black-forest-labs/FLUX.2-klein-4B/blob/main/model_index.json;
#   "Qwen3-4B text encoder + tokenizer (as shipped inside FLUX.2-klein-4B)",
#   https://huggingface.co/moonbox-dev/flux2_klein),
#   QWEN3_4B above. The [dev] text encoder: Mistral-Small-3.x 24B as Mistral3ForConditionalGeneration, the config of
#   FLUX.2-dev's text_encoder as written out in
#   https://github.com/modelscope/DiffSynth-Studio/blob/main/diffsynth/models/flux2_text_encoder.py
#   (transformers 4.57.1); the same text and vision towers in
#   https://huggingface.co/DmitriyYurckML/IoV/blob/main/config.json.
MISTRAL_SMALL_3_24B = {
    "text_config": {"model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 32768,
                    "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                    "rope_theta": 1000000000.0, "sliding_window": None, "attention_dropout": 0.0},
    "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "head_dim": 64, "hidden_act": "silu", "image_size": 1540,
                      "patch_size": 14, "num_channels": 3, "rope_theta": 10000.0, "attention_dropout": 0.0},
    "image_token_index": 10, "multimodal_projector_bias": False, "projector_hidden_act": "gelu",
    "spatial_merge_size": 2, "vision_feature_layer": -1,
    # The checkpoint has its own lm_head (24.0 B parameters in all); transformers 5 would tie it to the input
    # embeddings by default (its top-level default is True; the text model's own, which 4.x read, is False).
    "tie_word_embeddings": False,
}
# - scheduler: FLUX.2 [dev]'s,
#   https://huggingface.co/diffusers/FLUX.2-dev-bnb-4bit/blob/main/scheduler/scheduler_config.json
#   (Hugging Face's own copy of black-forest-labs/FLUX.2-dev). [klein]'s own scheduler_config.json was not found: the
#   [klein] folder uses [dev]'s. (Training draws its timesteps by --weighting_scheme: the table does not change
#   FLOPs, bytes or parameters.)
FLUX2_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                   "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
                   "time_shift_type": "exponential"}
FLUX2_KLEIN_4B = PipelineSpec(
    "Flux2KleinPipeline",
    {"transformer": ("diffusers", "Flux2Transformer2DModel", FLUX2_KLEIN_4B_TRANSFORMER),
     "vae": ("diffusers", "AutoencoderKLFlux2", FLUX2_VAE),
     "text_encoder": ("transformers", "Qwen3ForCausalLM", QWEN3_4B)},
    {"tokenizer": "qwen-chat"}, FLUX2_SCHEDULER, extra={"is_distilled": True})
FLUX2_DEV = PipelineSpec(
    "Flux2Pipeline",
    {"transformer": ("diffusers", "Flux2Transformer2DModel", FLUX2_DEV_TRANSFORMER),
     "vae": ("diffusers", "AutoencoderKLFlux2", FLUX2_VAE),
     "text_encoder": ("transformers", "Mistral3ForConditionalGeneration", MISTRAL_SMALL_3_24B)},
    {"tokenizer": "mistral"}, FLUX2_SCHEDULER)

SPECS = {"sd35-medium": sd35_spec(SD35_MEDIUM_TRANSFORMER), "sd35-large": sd35_spec(SD35_LARGE_TRANSFORMER),
         "qwen-image": QWEN_IMAGE, "z-image": Z_IMAGE, "flux2-klein-4b": FLUX2_KLEIN_4B, "flux2-dev": FLUX2_DEV}


class RandomWeights:
    """Mixin for a model family: build its denoiser, text encoders and VAE from the configs of the pipeline folder
    (the classes named in ``model_index.json``), with the models' own random initialisation, instead of loading
    weights. Generic over families: it only reads ``denoiser`` and ``text_encoders``.

    ``init_device``: where the random weights are created (``Bench`` sets its device: on a GPU, initialising
    billions of parameters there takes seconds, on the CPU minutes); the CPU when the device has no room.

    A quantized base (``--bnb_quantization_config_path``, Flux.1): diffusers' quantized loader reads weights from
    disk only, so the random denoiser is saved into the pipeline folder once (a later Bench on the same folder
    reuses it) and loaded through the family's own ``load_denoiser``, as train_cat_lora.py loads it.
    """

    init_device = None
    SAVED_MARK = ".random-weights-saved"

    def random_model(self, component: str):
        folder = Path(self.config.pretrained_model_name_or_path)
        library, class_name = json.loads((folder / "model_index.json").read_text())[component]
        model_class = getattr(import_module(library), class_name)

        def build():
            if issubclass(model_class, ModelMixin):
                return model_class.from_config(model_class.load_config(folder / component))
            return model_class(model_class.config_class.from_pretrained(folder / component))

        if self.init_device is None or torch.device(self.init_device).type == "cpu":
            return build()
        try:
            with torch.device(self.init_device):
                return build()
        except torch.OutOfMemoryError:  # no room on the device: build on the CPU (prepare_models moves it)
            gc.collect()
            torch.cuda.empty_cache()
            return build()

    def load_text_encoders(self) -> dict:
        return {name: self.random_model(name) for name in self.text_encoders}

    def load_denoiser(self, weight_dtype=None):
        if getattr(self, "quantization", None) is None:
            return self.random_model(self.denoiser)
        folder = Path(self.config.pretrained_model_name_or_path) / self.denoiser
        if not (folder / self.SAVED_MARK).exists():
            model = self.random_model(self.denoiser)
            model.save_pretrained(folder, safe_serialization=True)
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            (folder / self.SAVED_MARK).touch()  # written last: a save cut short is redone
        return super().load_denoiser(weight_dtype)

    def load_vae(self):
        return self.random_model("vae")


def with_random_weights(family):
    """The same family, building its models with random weights (see ``RandomWeights``)."""
    family_class = type(family)
    random_class = type(f"RandomWeights{family_class.__name__}", (RandomWeights, family_class), {})
    return random_class(family.config)


# ---------------------------------------------------------------------------------------------------------
# Model choices
# ---------------------------------------------------------------------------------------------------------


def build_small_pipeline(out_dir: Path) -> str:
    """The tiny pipeline with a wider U-Net: block_out_channels (64, 128, 128), cross-attention 32."""
    path = Path(build_tiny_pipeline(out_dir))
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    unet.save_pretrained(path / "unet", safe_serialization=True)
    return str(path)


def committed_toy_model(_scratch: Path) -> str:
    if not (TOY_MODEL / "model_index.json").is_file():
        fail(f"--model toy: {TOY_MODEL} has no model_index.json")
    return str(TOY_MODEL)


@dataclass(frozen=True)
class ModelChoice:
    build: Callable[[Path], str]  # scratch folder -> pipeline folder
    random_weights: bool = False  # the folder holds configs only: build the models with random weights


MODELS = {
    "tiny": ModelChoice(lambda scratch: build_tiny_pipeline(scratch / "tiny-sd")),
    "small": ModelChoice(lambda scratch: build_small_pipeline(scratch / "small-sd")),
    "tiny-sdxl": ModelChoice(lambda scratch: build_tiny_sdxl_pipeline(scratch / "tiny-sdxl")),
    "tiny-flux": ModelChoice(lambda scratch: build_tiny_flux_pipeline(scratch / "tiny-flux")),
    # The newer families' tiny pipelines (examples/tiny_pipeline.py), as the tests build them.
    **{f"tiny-{key.replace('_', '-')}": ModelChoice(lambda scratch, key=key: BUILDERS[key](scratch / f"tiny-{key}"))
       for key in ("sd3", "qwenimage", "zimage", "flux2_klein", "flux2")},
    "toy": ModelChoice(committed_toy_model),
    "sd15": ModelChoice(lambda scratch: write_config_pipeline(ARCHITECTURES["sd15"], scratch / "sd15"), True),
    "sdxl": ModelChoice(lambda scratch: write_config_pipeline(ARCHITECTURES["sdxl"], scratch / "sdxl"), True),
    "flux-dev": ModelChoice(lambda scratch: write_flux_dev_pipeline(scratch / "flux-dev"), True),
    # The newer families' real architectures (SPECS: SD3.5 medium and large, Qwen-Image, Z-Image, FLUX.2).
    **{name: ModelChoice(lambda scratch, name=name: write_spec_pipeline(SPECS[name], scratch / name), True)
       for name in SPECS},
}
# Real architectures of MODELS measured at other than their VAE's native resolution (Qwen-Image's VAE config names
# none): the resolutions their families train at. Here, beside MODELS, because gpu_check and meta_cost both read
# them and meta_cost must not import gpu_check (which imports meta_cost).
RESOLUTIONS = {"flux-dev": (512, 1024), "sd35-medium": (1024,), "sd35-large": (1024,), "qwen-image": (1024,),
               "z-image": (1024,), "flux2-klein-4b": (1024,), "flux2-dev": (1024,)}


def native_resolution(path: str) -> int:
    """The sample size of the pipeline folder's VAE config (512 where it names none)."""
    vae_config = Path(path) / "vae" / "config.json"
    return json.loads(vae_config.read_text()).get("sample_size", 512) if vae_config.is_file() else 512


def resolve_model(model: str, scratch: Path) -> tuple[str, bool]:
    """(pipeline folder or hub id, random weights?) for ``--model``: a named choice is built into ``scratch``."""
    if model in MODELS:
        return MODELS[model].build(scratch), MODELS[model].random_weights
    return model, False


def family_for(model_path: str, args, random_weights: bool = False):
    """The training script's family object for the pipeline at ``model_path`` (bad input: exit 2)."""
    options = Namespace(pretrained_model_name_or_path=model_path, revision=args.revision, variant=args.variant,
                        resolution=args.resolution, max_sequence_length=args.max_sequence_length,
                        bnb_quantization_config_path=getattr(args, "bnb_quantization_config_path", None))
    try:
        family = T.model_family(options)
    except T.InputError as error:
        fail(str(error).replace("--pretrained_model_name_or_path", "--model", 1))
    return with_random_weights(family) if random_weights else family


def base_parameter_counts(models: dict) -> dict:
    """Parameters of the frozen base models by pipeline component (trainable LoRA weights not included)."""
    return {name: sum(p.numel() for p in model.parameters() if not p.requires_grad) for name, model in models.items()
            if isinstance(model, torch.nn.Module)}


def synthetic_image(index: int, size: int, subject: bool):
    """A deterministic RGB picture: a red 'teapot' for the subject, grey boxes for the class."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    s, shift = size / 48, index % 5
    if subject:
        draw.ellipse([(6 + shift) * s, 10 * s, (36 + shift) * s, 40 * s], fill=(200, 30, 30))
        draw.rectangle([(16 + shift) * s, 20 * s, (24 + shift) * s, 28 * s], fill="white")
    else:
        draw.rectangle([(8 + shift) * s, 8 * s, (38 + shift) * s, 38 * s], fill=(90 + 20 * shift, 90, 90))
    return image


BANK = ("a busy street market at dusk", "a cup of coffee on a saucer", "a watercolor painting of a harbor")


def make_batches(resolution: int, batch_size: int) -> dict:
    """One instance batch, the same with class rows (prior preservation) and with --cat_prompts rows ("bank"),
    through the script's data path."""
    instance = [T.Example(synthetic_image(i, resolution, True), "a photo of sks teapot", "a photo of teapot",
                          f"instance-{i}") for i in range(batch_size)]
    classes = [T.Example(synthetic_image(i, resolution, False), "a photo of teapot", "a photo of teapot",
                         f"class-{i}") for i in range(batch_size)]
    plain = T.make_dataset(instance, [], resolution, True, False, 0)
    prior = T.make_dataset(instance, classes, resolution, True, False, 0)
    bank = T.make_dataset(T.with_prompt_bank(instance, [BANK]), [], resolution, True, False, 0)
    return {False: T.collate_examples([plain[i] for i in range(batch_size)]),
            True: T.collate_examples([prior[i] for i in range(batch_size)]),
            "bank": T.collate_examples([bank[i] for i in range(batch_size)])}


@contextmanager
def default_dtype(dtype):
    """torch's default floating dtype set to ``dtype`` inside the block."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def first_tensor(args: tuple, kwargs: dict):
    return next((value for value in (*args, *kwargs.values()) if torch.is_tensor(value)), None)


class Bench:
    """The training script's models with LoRA adapters, the two batches, and one AdamW per configuration."""

    def __init__(self, model_path: str, args, random_weights: bool = False):
        self.args, self.device = args, torch.device(args.device)
        self.family = family_for(model_path, args, random_weights)
        if random_weights:
            self.family.init_device = self.device
        # As train_cat_lora.py: the frozen base in the mixed-precision dtype, the LoRA weights in float32.
        self.weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16}[args.mixed_precision]
        # The training script's own defaults for every option prepare_models reads, with this benchmark's choices.
        options = T.build_parser().parse_args(["--pretrained_model_name_or_path", model_path])
        options.rank, options.lora_alpha = args.rank, float(args.rank)
        options.train_text_encoder, options.gradient_checkpointing = args.train_text_encoder, args.gradient_checkpointing
        torch.manual_seed(0)
        # Random weights are created directly in the weight dtype: with bf16, SDXL's 14 GB float32 copy never exists.
        # prepare_models reads only the accelerator's device and whether it shards: no Accelerator (and its global
        # state) is needed.
        one_process = SimpleNamespace(device=self.device, distributed_type=T.DistributedType.NO)
        with default_dtype(self.weight_dtype if random_weights else torch.get_default_dtype()):
            self.models = T.prepare_models(options, self.family, one_process, self.weight_dtype)
        self.denoiser = self.models[self.family.denoiser]
        self.text_encoders = {name: self.models[name] for name in self.family.text_encoders}
        self.encode_prompts = T.PromptEncoder(self.family, self.text_encoders)
        adapted = [self.models[name] for name in T.adapted_components(self.family, args.train_text_encoder)]
        for model in adapted:
            model.train()
        self.trainable = [p for model in adapted for p in model.parameters() if p.requires_grad]
        # Give the adapters non-zero up-projections, as after some training (at step 0 they are zero).
        with torch.no_grad():
            for p in self.trainable:
                p.normal_(0, 0.02)
        self.batches = make_batches(args.resolution, args.batch_size)
        if getattr(args, "pre_compute_text_embeddings", False):
            # As train_cat_lora.py --pre_compute_text_embeddings: every prompt encoded once by the frozen text
            # encoders, which then leave memory (T5-XXL alone is ~9.5 GB in bf16).
            prompts = [p for batch in self.batches.values()
                       for p in batch["prompts"] + batch["cat_prompts"] + batch["bank_prompts"]]
            self.encode_prompts = T.CachedPromptEncoder(self.encode_prompts, prompts)
            for name in self.family.text_encoders:
                del self.models[name]
            self.text_encoders = {}
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.optimizers = {}
        self.lora_layers = [m for name, m in self.denoiser.named_modules() if name.endswith("lora_A.default")]
        # FLOP-counter names of top-level modules (their class names) -> the model they belong to.
        self.model_labels = {type(model).__name__: "text encoders" for model in self.text_encoders.values()}
        self.model_labels[type(self.denoiser).__name__] = "denoiser"

    def set_resolution(self, resolution: int) -> None:
        """Train on ``resolution`` from now on: new batches (same prompts), and the family's configured size."""
        self.args.resolution = resolution
        self.family.config = replace(self.family.config, resolution=resolution)
        self.batches = make_batches(resolution, self.args.batch_size)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn gradient checkpointing on or off on the adapted models, as prepare_models turns it on."""
        self.args.gradient_checkpointing = enabled
        for name in T.adapted_components(self.family, self.args.train_text_encoder):
            model = self.models[name]
            if name == self.family.denoiser:
                model.enable_gradient_checkpointing() if enabled else model.disable_gradient_checkpointing()
            else:
                model.gradient_checkpointing_enable() if enabled else model.gradient_checkpointing_disable()

    @property
    def torch_models(self) -> list:
        return [model for model in self.models.values() if isinstance(model, torch.nn.Module)]

    def optimizer(self, config: str):
        if config not in self.optimizers:
            self.optimizers[config] = torch.optim.AdamW(self.trainable, lr=1e-4, weight_decay=1e-2)
        return self.optimizers[config]

    def step(self, config: str, seed: int, backward=None, on_optimizer=None) -> dict:
        """One full optimizer step of ``config`` with the global seed ``seed``."""
        spec = CONFIGS[config]
        step_config = T.StepConfig(cat_alpha=spec["cat_alpha"], cat_mode=spec["cat_mode"],
                                   prior_loss_weight=1.0 if spec["prior"] else 0.0, weight_dtype=self.weight_dtype,
                                   cat_bank_alpha=1.0 if spec.get("bank") else 0.0)
        torch.manual_seed(seed)
        # bf16: autocast around the step, as accelerate does around the prepared models' forward. The meta device
        # (benchmarks/meta_cost.py) has no autocast: the CPU's is named, which leaves meta tensors as they are.
        device_type = "cpu" if self.device.type == "meta" else self.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.weight_dtype == torch.bfloat16):
            batch = self.batches["bank" if spec.get("bank") else spec["prior"]]
            losses = T.training_step(batch, self.family, self.models, self.encode_prompts,
                                     step_config, backward or (lambda loss: loss.backward()))
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        optimizer = self.optimizer(config)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_optimizer is not None:
            self.synchronize()
            on_optimizer(time.perf_counter() - start)
        return losses

    def phase_times(self, config: str, seed: int) -> dict:
        """Wall time of one step split by phase: VAE encode, text encode, denoiser forward with and without
        gradient, backward, clip + AdamW, and the rest (loss arithmetic, noise, Python glue)."""
        spent = dict.fromkeys(PHASES, 0.0)
        started = {}

        def phase_of(module):
            if module is self.denoiser:
                return "denoiser fwd (grad)" if torch.is_grad_enabled() else "denoiser fwd (frozen)"
            return "VAE encode" if module in self.vae_encode_modules else "text encode"

        def pre(module, *_):
            self.synchronize()
            started[id(module)] = time.perf_counter()

        def post(module, *_):
            self.synchronize()
            spent[phase_of(module)] += time.perf_counter() - started.pop(id(module))

        def backward(loss):
            self.synchronize()
            start = time.perf_counter()
            loss.backward()
            self.synchronize()
            spent["backward"] += time.perf_counter() - start

        def on_optimizer(elapsed):
            spent["clip + AdamW"] += elapsed

        modules = [self.denoiser, *self.text_encoders.values(), *self.vae_encode_modules]
        hooks = [h for m in modules for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
        try:
            self.synchronize()
            start = time.perf_counter()
            self.step(config, seed, backward=backward, on_optimizer=on_optimizer)
            self.synchronize()
            total = time.perf_counter() - start
        finally:
            for hook in hooks:
                hook.remove()
        spent["other"] = total - sum(spent.values())
        spent["total"] = total
        return spent

    @property
    def vae_encode_modules(self) -> list:
        vae = self.models["vae"]
        return [m for m in (getattr(vae, "encoder", None), getattr(vae, "quant_conv", None)) if m is not None]

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed_step(self, config: str, seed: int) -> float:
        self.synchronize()
        start = time.perf_counter()
        self.step(config, seed)
        self.synchronize()
        return time.perf_counter() - start

    def watch_denoiser(self) -> tuple[list, list]:
        """Forward hooks on the denoiser and on its LoRA layers.

        Returns (calls, handles): ``calls`` gets one record per top-level denoiser call: autograd on or off
        (``torch.is_grad_enabled()`` as the call starts: the frozen pass is the call made without it), the rows
        of its first tensor input, and the LoRA-layer calls that ran inside it. LoRA calls outside a denoiser
        call (gradient-checkpointing recomputation during backward) are not attributed to any pass.
        """
        calls, open_calls = [], []

        def before(module, args, kwargs):
            rows = first_tensor(args, kwargs)
            open_calls.append({"grad": torch.is_grad_enabled(), "rows": None if rows is None else rows.shape[0],
                               "lora_calls": 0})

        def after(module, args, kwargs, output):
            calls.append(open_calls.pop())

        def lora_call(module, inputs):
            if open_calls:
                open_calls[-1]["lora_calls"] += 1

        handles = [self.denoiser.register_forward_pre_hook(before, with_kwargs=True),
                   self.denoiser.register_forward_hook(after, with_kwargs=True)]
        handles += [layer.register_forward_pre_hook(lora_call) for layer in self.lora_layers]
        return calls, handles

    def measure_counts(self, config: str, seed: int) -> dict:
        """FLOPs, bytes saved for backward at their peak, and the denoiser calls of one step (untimed)."""
        calls, handles = self.watch_denoiser()
        flops = FlopCounterMode(display=False)
        meter = SavedTensorMeter(exclude=weight_storage_keys(*self.torch_models))
        cuda = self.device.type == "cuda"
        if cuda:
            self.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_base = torch.cuda.memory_allocated()
        try:
            # One step under both counters (one step of a real architecture on a CPU takes long): the FLOP
            # counter holds no tensor, and the meter's hooks run no counted operation.
            with flops, meter:
                self.step(config, seed)
        finally:
            for handle in handles:
                handle.remove()
        denoiser_calls = list(calls)
        by_model = {}
        for name, counts in flops.get_flop_counts().items():
            if name != "Global" and "." not in name:  # top-level modules: the models, and the VAE encoder's parts
                label = self.model_labels.get(name, "VAE encode")
                by_model[label] = by_model.get(label, 0) + sum(counts.values())
        frozen = [call for call in denoiser_calls if not call["grad"]]
        result = {"flops": flops.get_total_flops(), "flops_by_model": by_model, "saved_peak": meter.peak,
                  "saved_left": meter.current, "denoiser_calls": denoiser_calls,
                  "lora_passes": sum(1 for call in denoiser_calls if call["lora_calls"]),
                  "frozen_passes": len(frozen), "lora_calls_in_frozen": sum(call["lora_calls"] for call in frozen)}
        if cuda:
            self.synchronize()
            result["cuda_peak"] = torch.cuda.max_memory_allocated() - cuda_base
            # The whole process's peak (weights, optimizer state, activations: what a card must hold, the CUDA
            # context aside), and the bytes of the other configurations' AdamW state in it (a training run has one).
            result["cuda_peak_total"] = torch.cuda.max_memory_allocated()
            result["cuda_other_optimizers"] = sum(
                value.untyped_storage().nbytes() for name, optimizer in self.optimizers.items() if name != config
                for state in optimizer.state.values() for value in state.values()
                if torch.is_tensor(value) and value.device.type == "cuda")
        return result


# ---------------------------------------------------------------------------------------------------------
# Exact accounting of the bytes autograd keeps for backward
# ---------------------------------------------------------------------------------------------------------


class _Held:
    """A saved tensor as autograd stores it while the meter is on; its destruction is the 'free'."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor, key, meter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Bytes held for backward, exactly: current and peak.

    Inside ``with SavedTensorMeter() as meter:`` every tensor autograd saves goes through a pack hook that adds
    the bytes of the tensor's storage (once per storage: views and repeated saves of one storage count once)
    and wraps it; when autograd releases it (backward ran, or the graph was dropped) the wrapper dies and the
    bytes are subtracted once the storage's last saved reference is gone. ``peak`` is the maximum of the
    running total. Storages listed in ``exclude`` (e.g. frozen model weights, which exist anyway) are not
    counted. Tensors saved while the meter is off are not seen.
    """

    def __init__(self, exclude=()):
        self.exclude = set(exclude)
        self.live = {}  # storage key -> [saved references, bytes]
        self.current = 0
        self.peak = 0
        self.saves = 0
        self._hooks = None

    @staticmethod
    def storage_key(tensor):
        storage = tensor.untyped_storage()
        # Meta storages (benchmarks/meta_cost.py) have no data: their data pointers are all 0, so the storage
        # object's own address tells them apart (views share it; a held storage is not freed, so not reused).
        address = storage._cdata if tensor.device.type == "meta" else storage.data_ptr()
        return (str(tensor.device), address), storage.nbytes()

    def reset_peak(self) -> None:
        self.peak = self.current

    def _pack(self, tensor):
        try:
            key, nbytes = self.storage_key(tensor)
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage: not counted
            return tensor
        if key in self.exclude:
            return tensor
        self.saves += 1
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [1, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1
        # Hold a detached alias (same storage, no grad_fn): a saved *output* held with its grad_fn would form a
        # tensor -> node -> saved tensor cycle through C++ that Python's gc cannot break if no backward runs.
        return _Held(tensor.detach(), key, self)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Held) else packed

    def _release(self, key) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._hooks = None


def weight_storage_keys(*models) -> set:
    """Storage keys of every parameter and buffer of ``models`` (to exclude weights from activation bytes)."""
    keys = set()
    for model in models:
        for tensor in list(model.parameters()) + list(model.buffers()):
            keys.add(SavedTensorMeter.storage_key(tensor)[0])
    return keys


# ---------------------------------------------------------------------------------------------------------
# Resident memory
# ---------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    """A memory field of /proc/self/status in KiB (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_of_steps(bench: Bench, config: str, steps: int, seed: int) -> dict:
    """Peak RSS of this process over ``steps`` steps of ``config``, and its rise over the RSS before them."""
    import gc

    gc.collect()
    base = _status_kib("VmRSS")
    fresh_mark = reset_peak_rss()
    for i in range(steps):
        bench.step(config, seed + i)
    peak = _status_kib("VmHWM") if fresh_mark else None
    if peak is None:  # getrusage: the peak of the whole process so far (KiB on Linux)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rss_peak": peak * 1024, "rss_step": (peak - base) * 1024 if base is not None else None,
            "rss_exact": fresh_mark}


def rss_in_subprocess(args, model_path: str, random_weights: bool, config: str, steps: int) -> dict:
    """Run :func:`rss_of_steps` for ``config`` in a fresh Python so that no other configuration's peak mixes in."""
    command = [sys.executable, str(Path(__file__).resolve()), "--model", model_path, "--_rss_worker", config,
               "--_rss_steps", str(steps), *worker_flags(args)]
    if random_weights:
        command.append("--_random_weights")
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"RSS worker for {config} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker_flags(args) -> list[str]:
    flags = ["--device", args.device, "--resolution", str(args.resolution), "--batch_size", str(args.batch_size),
             "--rank", str(args.rank), "--mixed_precision", args.mixed_precision,
             "--max_sequence_length", str(args.max_sequence_length)]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    for name in ("revision", "variant"):
        if getattr(args, name):
            flags += [f"--{name}", getattr(args, name)]
    if args.gradient_checkpointing:
        flags.append("--gradient_checkpointing")
    if args.train_text_encoder:
        flags.append("--train_text_encoder")
    if args.pre_compute_text_embeddings:
        flags.append("--pre_compute_text_embeddings")
    if args.bnb_quantization_config_path:
        flags += ["--bnb_quantization_config_path", args.bnb_quantization_config_path]
    return flags


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratio(value, reference) -> str:
    if value is None or not reference:
        return "n/a"
    return f"{value / reference:.2f}x"


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def denoiser_calls_cell(calls: list) -> str:
    """The denoiser calls of a step, in order: rows, and 'grad' or 'no grad' (e.g. '4 grad, 4 grad, 4 no grad')."""
    return ", ".join(f"{call['rows']} {'grad' if call['grad'] else 'no grad'}" for call in calls)


def format_table(results: dict, meta: dict) -> str:
    """The markdown report: a header of run facts, then one row per configuration."""
    base = results["lora"]
    parameters = ", ".join(f"{name} {count / 1e6:.1f} M" for name, count in meta["parameters"].items())
    lines = [
        f"## CAT step cost: {meta['model']}",
        "",
        f"- Machine: {meta['cpu']} ({meta['cores']} logical CPUs), torch {meta['torch']}, "
        f"{meta['threads']} torch threads, device {meta['device']}",
        f"- Models ({meta['family']}{', random weights' if meta['random_weights'] else ''}): base parameters "
        f"{parameters}; "
        f"LoRA on {', '.join(meta['adapted'])}: {meta['trainable'] / 1e6:.3f} M trainable",
        f"- Resolution {meta['resolution']}, batch {meta['batch_size']} instance images, LoRA rank {meta['rank']}, "
        f"gradient checkpointing {meta['gradient_checkpointing']}, text-encoder LoRA {meta['train_text_encoder']}, "
        f"mixed precision {meta['mixed_precision']}"
        + (f", base quantized ({meta['quantization']})" if meta.get("quantization") else "")
        + (", text embeddings pre-computed (text encoders dropped)" if meta.get("pre_compute_text_embeddings") else ""),
        f"- Time: full optimizer step (VAE encode, text encode, denoiser passes, backward, grad clip, AdamW), "
        f"median of {meta['steps']} interleaved rounds after {meta['warmup']} warm-up rounds, same seed per round; "
        f"'x LoRA' is the median of per-round ratios",
        f"- Denoiser floors, CAT / LoRA: {denoiser_floor_ratio('cat-lean', BACKWARD_UNITS['issue']):.2f}x counting "
        f"a forward 1 and a backward 2 (LoRA {denoiser_units('lora', 2)}, CAT {denoiser_units('cat-lean', 2)}); "
        f"{denoiser_floor_ratio('cat-lean', BACKWARD_UNITS['frozen base']):.2f}x with the base frozen, where a "
        f"LoRA backward computes input gradients only, about 1 forward (LoRA {denoiser_units('lora', 1)}, "
        f"CAT {denoiser_units('cat-lean', 1)}). The FLOP table below gives the measured denoiser ratio",
        f"- Saved for backward: exact bytes of tensors autograd holds (saved_tensors_hooks, frozen weights "
        f"excluded), peak within the step; RSS: {meta['rss_method']}",
        f"- Denoiser calls: seen by forward hooks on the denoiser ({meta['denoiser']}), with autograd on ('grad') or "
        f"off ('no grad': the frozen pass); LoRA calls counted by hooks on every LoRA layer of the denoiser",
        "",
        "| config | step ms (median) | x LoRA | time IQR ms | GFLOP/step | x LoRA | saved for backward MiB | x LoRA "
        "| peak RSS MiB | x LoRA | step RSS rise MiB | x LoRA | denoiser calls (rows, autograd) "
        "| LoRA calls in frozen pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if "cuda_peak" in base:
        lines[-2] = lines[-2][:-1] + " CUDA peak MiB | x LoRA |"
        lines[-1] += "---|---|"
    for name, r in results.items():
        row = [name, f"{r['time_ms']:.1f}", f"{r['time_ratio']:.2f}x", f"{r['time_q1_ms']:.1f}-{r['time_q3_ms']:.1f}",
               f"{r['flops'] / 1e9:.3f}", _ratio(r["flops"], base["flops"]), _mib(r["saved_peak"]),
               _ratio(r["saved_peak"], base["saved_peak"]), _mib(r.get("rss_peak")),
               _ratio(r.get("rss_peak"), base.get("rss_peak")), _mib(r.get("rss_step")),
               _ratio(r.get("rss_step"), base.get("rss_step")), denoiser_calls_cell(r["denoiser_calls"]),
               str(r["lora_calls_in_frozen"]) if CONFIGS[name]["cat_alpha"] else "-"]
        if "cuda_peak" in r:
            row += [_mib(r["cuda_peak"]), _ratio(r["cuda_peak"], base["cuda_peak"])]
        lines.append("| " + " | ".join(row) + " |")
    models = [m for m in ("denoiser", "VAE encode", "text encoders")
              if any(m in r.get("flops_by_model", {}) for r in results.values())]
    if models:
        floors = ["denoiser x LoRA, measured", "floor: fwd 1, bwd 2", "floor: frozen base, bwd 1"]
        lines += ["", "GFLOP per step by model (forward and backward), the denoiser FLOP ratio to LoRA measured by "
                  "the FLOP counter, and the two floors of that ratio:", "",
                  "| config | " + " | ".join(models + floors) + " |", "|---|" + "---|" * (len(models) + len(floors))]
        for name, r in results.items():
            cells = [f"{r['flops_by_model'].get(m, 0) / 1e9:.3f}" for m in models]
            cells += [_ratio(r["flops_by_model"].get("denoiser"), base["flops_by_model"].get("denoiser")),
                      f"{denoiser_floor_ratio(name, BACKWARD_UNITS['issue']):.2f}x",
                      f"{denoiser_floor_ratio(name, BACKWARD_UNITS['frozen base']):.2f}x"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cat_lean = results.get("cat-lean")
    if cat_lean is not None and "time_ratio" in cat_lean:
        # A --cat_every N run is N - 1 plain LoRA steps (the alpha = 0 path: one denoiser pass) and one CAT step, so
        # its cost per step follows from the two measured steps above; the FLOP floor is 1 + 1.5 / N.
        lines += ["", "--cat_every N (lean): cost per optimizer step, averaged over the N steps of a cycle, from the "
                  "measured lora and cat-lean steps:", "",
                  "| N | time x LoRA | denoiser FLOPs x LoRA | floor: frozen base |", "|---|---|---|---|"]
        denoiser_ratio = None
        if cat_lean.get("flops_by_model", {}).get("denoiser") and base.get("flops_by_model", {}).get("denoiser"):
            denoiser_ratio = cat_lean["flops_by_model"]["denoiser"] / base["flops_by_model"]["denoiser"]
        for every in (1, 2, 4):
            flops = "n/a" if denoiser_ratio is None else f"{(every - 1 + denoiser_ratio) / every:.2f}x"
            lines.append(f"| {every} | {(every - 1 + cat_lean['time_ratio']) / every:.2f}x | {flops} | "
                         f"{1 + 1.5 / every:.2f}x |")
    if "phases_ms" in base:
        columns = PHASES + ["other", "total"]
        lines += ["", f"Where the time goes: ms per step by phase (median over {meta['phase_steps']} separate "
                  "instrumented steps per configuration, so totals differ from the table above):", "",
                  "| config | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for name, r in results.items():
            lines.append(f"| {name} | " + " | ".join(f"{r['phases_ms'][c]:.1f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="tiny",
                        help=f"one of {', '.join(MODELS)} (see the module docstring; sd15 and the names after it "
                             "are the real architectures with random weights), a local diffusers pipeline folder, or "
                             "a hub id")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--variant", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=4, help="Instance images per step (prior adds as many).")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--max_sequence_length", type=int, default=16,
                        help="Flux: T5 prompt tokens (the tiny Flux's T5 reads 16; Flux.1-dev trains with 512).")
    parser.add_argument("--steps", type=int, default=20, help="Timed rounds (each runs every configuration once).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed rounds first.")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--mixed_precision", choices=["no", "bf16"], default="no",
                        help="bf16: frozen base in bfloat16, LoRA weights float32, step under autocast.")
    parser.add_argument("--train_text_encoder", action="store_true", help="Also put a LoRA on the text encoders.")
    parser.add_argument("--bnb_quantization_config_path", default=None,
                        help="As train_cat_lora.py (Flux.1): the base transformer loaded quantized by diffusers' "
                             "bitsandbytes loader (needs a GPU; with a real architecture, the random weights are "
                             "saved into the temporary pipeline folder first).")
    parser.add_argument("--pre_compute_text_embeddings", action="store_true",
                        help="As train_cat_lora.py: encode the prompts once, then drop the text encoders.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="Comma-separated subset of " + ", ".join(CONFIGS) + " (lora is always included).")
    parser.add_argument("--rss", choices=["subprocess", "inprocess", "off"], default="subprocess",
                        help="Measure peak RSS per configuration in a fresh subprocess, in this process, or not.")
    parser.add_argument("--phase_steps", type=int, default=5,
                        help="Instrumented steps per configuration for the time-by-phase table (0: skip it).")
    parser.add_argument("--output", default=None, help="Also write the markdown table to this file.")
    parser.add_argument("--_rss_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_rss_steps", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--_random_weights", action="store_true", help=argparse.SUPPRESS)
    return parser


def check_args(args) -> list[str]:
    """The configurations to run; bad input exits 2 with one line naming the flag."""
    configs = ["lora"] + [c for c in args.configs.split(",") if c and c != "lora"]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        fail(f"--configs: unknown {', '.join(unknown)} (choose from {', '.join(CONFIGS)})")
    for flag in ("resolution", "batch_size", "rank", "steps"):
        if getattr(args, flag) < 1:
            fail(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    if args.warmup < 0 or args.phase_steps < 0:
        fail(f"--{'warmup' if args.warmup < 0 else 'phase_steps'} must not be negative")
    if args.resolution % 8:
        fail(f"--resolution {args.resolution} is not divisible by 8 (the VAE downsamples by 8)")
    if args.threads is not None and args.threads < 1:
        fail(f"--threads must be at least 1 (got {args.threads})")
    if args.pre_compute_text_embeddings and args.train_text_encoder:
        fail("--pre_compute_text_embeddings: the text encoders are dropped, so --train_text_encoder cannot adapt them")
    return configs


def quiet_logging() -> None:
    """Keep the report readable: no per-model dtype warnings or weight-loading progress bars."""
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def make_bench(model_path: str, args, random_weights: bool = False) -> Bench:
    """``Bench``, with the training script's refusals (e.g. the quantized loader without a GPU) as one line, exit 2."""
    try:
        return Bench(model_path, args, random_weights)
    except T.InputError as error:
        fail(str(error))


def measure(bench: Bench, configs: list[str], steps: int, warmup: int, phase_steps: int) -> dict:
    """{config: results} on ``bench``: one counted step per configuration (FLOPs, saved bytes, denoiser calls, CUDA
    peak), then ``warmup`` + ``steps`` interleaved timed rounds, then ``phase_steps`` instrumented steps."""
    results = {name: {} for name in configs}
    for name in configs:
        results[name].update(bench.measure_counts(name, seed=1000))
    times = {name: [] for name in configs}
    for round_number in range(warmup + steps):
        # Rotate the order each round so no configuration always runs first (cache, allocator, load).
        shift = round_number % len(configs)
        for name in configs[shift:] + configs[:shift]:
            elapsed = bench.timed_step(name, seed=2000 + round_number)
            if round_number >= warmup:
                times[name].append(elapsed)
    for name in configs:
        ratios = [t / b for t, b in zip(times[name], times["lora"])]
        q = statistics.quantiles(times[name], n=4) if len(times[name]) > 1 else times[name] * 3
        results[name].update(time_ms=statistics.median(times[name]) * 1e3, time_ratio=statistics.median(ratios),
                             time_q1_ms=q[0] * 1e3, time_q3_ms=q[-1] * 1e3, times_ms=[t * 1e3 for t in times[name]])
    if phase_steps > 0:
        runs = {name: [] for name in configs}
        for round_number in range(phase_steps):
            for name in configs:
                runs[name].append(bench.phase_times(name, seed=4000 + round_number))
        for name in configs:
            results[name]["phases_ms"] = {key: statistics.median(run[key] for run in runs[name]) * 1e3
                                          for key in runs[name][0]}
    return results


def main(argv=None) -> dict:
    """Run the benchmark; print (and with --output, save) the table; return the per-configuration results."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_logging()
    args = build_parser().parse_args(argv)
    configs = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args._rss_worker:  # child process of --rss subprocess
        bench = make_bench(args.model, args, args._random_weights)
        print(json.dumps(rss_of_steps(bench, args._rss_worker, args._rss_steps, seed=1000)))
        return {}

    with tempfile.TemporaryDirectory(prefix="cat-step-cost-") as scratch:
        model_path, random_weights = resolve_model(args.model, Path(scratch))
        bench = make_bench(model_path, args, random_weights)
        meta = {"model": args.model, "family": type(bench.family).__name__.removeprefix("RandomWeights"),
                "random_weights": random_weights, "denoiser": bench.family.denoiser,
                "parameters": base_parameter_counts(bench.models),
                "adapted": T.adapted_components(bench.family, args.train_text_encoder),
                "trainable": sum(p.numel() for p in bench.trainable),
                "quantization": getattr(bench.family, "quantization", None)}
        results = measure(bench, configs, args.steps, args.warmup, args.phase_steps)
        rss_steps = max(2, min(args.steps, 3))
        if args.rss == "inprocess":
            for name in configs:
                results[name].update(rss_of_steps(bench, name, rss_steps, seed=3000))
        elif args.rss == "subprocess":
            del bench
            for name in configs:
                results[name].update(rss_in_subprocess(args, model_path, random_weights, name, rss_steps))
        meta["rss_method"] = {
            "subprocess": f"each configuration in a fresh process, {rss_steps} steps; rise = peak (VmHWM) - RSS "
                          "after loading the models",
            "inprocess": f"in this process, peak mark (VmHWM) reset before each configuration's {rss_steps} steps; "
                         "rise = peak - RSS before them",
            "off": "not measured",
        }[args.rss]
    meta.update(cpu=cpu_model(), cores=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(),
                device=args.device, resolution=args.resolution, batch_size=args.batch_size, rank=args.rank,
                gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision,
                train_text_encoder=args.train_text_encoder, steps=args.steps, warmup=args.warmup,
                pre_compute_text_embeddings=args.pre_compute_text_embeddings,
                phase_steps=args.phase_steps)
    table = format_table(results, meta)
    print(table)
    if args.output:
        Path(args.output).write_text(table, encoding="utf-8")
    return {"results": results, "meta": meta, "table": table}


if __name__ == "__main__":
    main()
