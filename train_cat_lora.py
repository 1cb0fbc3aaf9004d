#!/usr/bin/env python
# Copyright 2026 The CAT-LoRA authors. Licensed under the Apache License, Version 2.0.
"""Train a LoRA with Contrastive Adapter Training (CAT) on Stable Diffusion 1.x/2.x, SDXL, Flux.1, SD3/3.5,
Qwen-Image, Z-Image or FLUX.2 [klein]/[dev].

CAT (Park et al., "Contrastive Adapter Training for Personalized Image Generation", arXiv 2404.07554,
§2.2 Eq. 3) adds one term to the usual LoRA objective:

    L = ||eps - eps_lora(z_t, t, y_T)||^2 + alpha * ||eps_frozen(z_t, t, y) - eps_lora(z_t, t, y)||^2

y_T is the training caption with its trigger token ("a photo of sks teapot"), y the same caption without it
("a photo of teapot"), and eps_frozen the base model (adapters disabled, no gradient) on the same noisy
latents and timesteps. The second term keeps the adapter from changing what the model draws for prompts that
do not name the subject, so the subject is bound to its trigger instead of leaking into the class.

The script follows diffusers' ``train_dreambooth_lora.py``: same flag names where the meaning is the same,
run as ``accelerate launch train_cat_lora.py ...`` (plain ``python`` works too; ``pip install .`` also gives the
``train-cat-lora`` command). It reads top to bottom in the order the data flows: arguments -> trigger handling ->
data -> models (one class per family) -> adapters (one class per kind) -> prompt conditioning -> loss -> training
state -> validation -> training loop -> save -> main.
"""

import argparse
import gc
import importlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import warnings
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

# peft and diffusers import bitsandbytes when it is installed; its CPU build warns at import that an optional
# kernel package is missing (harmless: the kernel is for 4-bit matmuls on the CPU). Keep bad-input errors one line.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, LoggerType, ProjectConfiguration, parse_flag_from_env, set_seed
from diffusers import (
    AutoencoderKL,
    BitsAndBytesConfig,
    DiffusionPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    FluxPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    ZImagePipeline,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE as FLUX2_SYSTEM_MESSAGE
from diffusers.pipelines.flux2.pipeline_flux2 import format_input as flux2_format_input
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.training_utils import (
    _collate_lora_metadata,
    cast_training_params,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
    compute_snr,
)
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from diffusers.utils.state_dict_utils import convert_state_dict
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo, upload_folder
from peft import LoraConfig, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from torchvision.transforms import functional as TF
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm.auto import tqdm
from transformers import AutoTokenizer
from transformers.models.clip.modeling_clip import CLIPAttention

# --cat_alpha auto: the defaults of the drift budget and of the multiplier's step (see DriftBudget).
DEFAULT_DRIFT_BUDGET = 0.03  # where the paper's alpha = 1 left the drift in the toy world (benchmarks/drift_budget.py)
DEFAULT_DUAL_LR = 0.05
# --cat_prompts: the weight of the prompt-bank term (docs/cat.md, "A prompt bank"; measured in the toy world)
DEFAULT_BANK_ALPHA = 1.0
BANK_CLASS = "{class}"  # in a --cat_prompts line: the sample's concept's class word
# Single-token triggers with an id below this are among CLIP BPE's earliest (most frequent) merges.
COMMON_TOKEN_ID_LIMIT = 20000
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


logger = logging.getLogger("train_cat_lora")


class InputError(Exception):
    """Bad input from the user: reported as one line naming the flag or file, with exit status 2."""


# ---------------------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------------------


# diffusers flags this script refuses, with the reason. They stay in the parser so that --help lists them and
# using one stops with one line naming it, instead of argparse's "unrecognized arguments".
# flag -> (nargs as diffusers declares it, reason)
REFUSED_FLAGS = {
    "--do_edm_style_training": (0, "EDM-style training (the EDM preconditioning of Playground v2.5) is not "
                                   "implemented; the CAT term is defined on the epsilon/v-prediction objective "
                                   "this script trains"),
    "--use_dora": (0, "DoRA adapters are not implemented; saving, kohya export and resuming are built for LoRA"),
    "--text_encoder_use_attention_mask": (0, "it is for DeepFloyd IF's T5 text encoder; the text encoders trained "
                                             "here run without an attention mask, as their pipelines run them"),
    "--validation_images": ("+", "it feeds images to image-conditioned pipelines (DeepFloyd IF stage II); this "
                                 "script trains and validates text-to-image models"),
    "--class_labels_conditioning": (None, "it passes class labels to DeepFloyd IF stage II's UNet; the models "
                                          "trained here take no class labels"),
    "--enable_npu_flash_attention": (0, "Ascend NPUs are not supported"),
    "--do_fp8_training": (0, "float8 training (torchao) is not implemented; use --mixed_precision bf16, or a quantized "
                             "frozen base with --bnb_quantization_config_path"),
    "--remote_text_encoder": (0, "prompts are encoded by the local text encoder; this script makes no network calls"),
    "--offload": (0, "model offloading is not implemented; --cache_latents and --pre_compute_text_embeddings free "
                     "the VAE's and the text encoders' work from the training steps"),
    "--use_aspect_ratio_buckets": (0, "aspect-ratio bucketing is not implemented; images are resized and cropped to "
                                      "--resolution squares"),
    "--aspect_ratio_buckets": (None, "aspect-ratio bucketing is not implemented; images are resized and cropped to "
                                     "--resolution squares"),
    "--caption_dropout": (None, "caption dropout is not implemented"),
    "--final_validation_prompt": (None, "there is no final inference pass; validation draws --validation_prompt "
                                        "every --validation_steps"),
    "--pretrained_tokenizer_4_name_or_path": (None, "it names HiDream's fourth text encoder, which diffusers' "
                                                    "Qwen-Image script parses and never reads"),
    "--pretrained_text_encoder_4_name_or_path": (None, "it names HiDream's fourth text encoder, which diffusers' "
                                                       "Qwen-Image script parses and never reads"),
}

# Flags of diffusers' scripts for one family or a few (SDXL's VAE, the flow-matching families' timestep densities,
# T5's sequence length, ...), parsed here with diffusers' names, types and defaults. Each family says which it reads
# (ModelFamily.flags and its objective's); any other is accepted, as diffusers' other scripts accept it, with a
# warning that it is ignored.
FAMILY_FLAGS = ("pretrained_vae_model_name_or_path", "max_sequence_length", "guidance_scale", "weighting_scheme",
                "logit_mean", "logit_std", "mode_scale", "lora_layers", "upcast_before_saving", "precondition_outputs",
                "lora_blocks", "text_encoder_out_layers")

# diffusers' schedules that need nothing beyond the --lr_* flags (piecewise_constant needs step rules).
LR_SCHEDULERS = [kind.value for kind in SchedulerType if kind != SchedulerType.PIECEWISE_CONSTANT]
TRACKERS = [kind.value for kind in LoggerType] + ["none"]  # accelerate's trackers; each needs its package
# torchvision's InterpolationMode names, lowercased (diffusers' choices); a test checks them against torchvision,
# which is not imported here to keep --help and bad-input errors fast.
INTERPOLATION_MODES = ["bicubic", "bilinear", "box", "hamming", "lanczos", "nearest", "nearest_exact"]
DEFAULT_VALIDATION_STEPS = 100


class RefusedFlag(argparse.Action):
    """A diffusers flag this script does not support: using it raises InputError naming it and saying why."""

    def __init__(self, option_strings, dest, reason: str, nargs=None, **kwargs):
        self.reason = reason
        super().__init__(option_strings, dest, nargs=nargs, default=argparse.SUPPRESS,
                         help=f"[not supported] {reason}.", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        raise InputError(f"{self.option_strings[0]} is not supported: {self.reason}")


def parse_bool(text: str) -> bool:
    """true/false, yes/no or 1/0, any case.

    diffusers declares its Prodigy switches ``type=bool``, under which every non-empty string, "False" included,
    means True; here "False" means False.
    """
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a value of the wrong type) are one line, like every other bad input
    here; its default prints the whole usage first, about 90 lines with this many flags."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        description="Train a LoRA with Contrastive Adapter Training (CAT, arXiv 2404.07554, Eq. 3).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("base model")
    model.add_argument("--pretrained_model_name_or_path", required=True,
                       help="Hub id or local folder of a diffusers pipeline of a family this script trains (SD 1.x/2.x, "
                            "SDXL, Flux.1, SD3/3.5, Qwen-Image, Z-Image, FLUX.2 [klein]/[dev]; read from its "
                            "model_index.json).")
    model.add_argument("--revision", default=None, help="Revision of the pretrained model on the hub.")
    model.add_argument("--variant", default=None, help="Weight variant to load, e.g. fp16.")
    model.add_argument("--tokenizer_name", default=None,
                       help="Tokenizer (hub id or folder) to use instead of the pipeline's own.")
    model.add_argument("--tokenizer_max_length", type=int, default=None,
                       help="Pad and truncate prompts to this many tokens instead of the tokenizer's own limit "
                            "(which it may not exceed).")

    data = parser.add_argument_group("data")
    data.add_argument("--instance_data_dir", default=None,
                      help="Folder of subject images; captions from metadata.jsonl, <image>.txt or --instance_prompt.")
    data.add_argument("--instance_prompt", default=None, help="Caption for images without one, e.g. 'a photo of sks dog'.")
    data.add_argument("--dataset_name", default=None,
                      help="A datasets source (hub id or local folder) instead of --instance_data_dir.")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--cache_dir", default=None, help="Where datasets caches what it loads for --dataset_name.")
    data.add_argument("--image_column", default="image")
    data.add_argument("--caption_column", default=None,
                      help="Column of --dataset_name holding each image's caption; without it every image is "
                           "captioned --instance_prompt.")
    data.add_argument("--repeats", type=int, default=1, help="Use each instance image this many times per epoch.")
    data.add_argument("--concepts_list", default=None,
                      help="JSON list of {instance_data_dir, instance_prompt, trigger_token, class_word?}: "
                           "several concepts in one adapter, each with its own trigger.")
    data.add_argument("--class_data_dir", default=None, help="Folder of class images for prior preservation.")
    data.add_argument("--class_prompt", default=None, help="Prompt of the class images, e.g. 'a photo of dog'.")
    data.add_argument("--with_prior_preservation", action="store_true", help="Add DreamBooth's prior loss.")
    data.add_argument("--prior_loss_weight", type=float, default=1.0)
    data.add_argument("--num_class_images", type=int, default=100,
                      help="Class images wanted; missing ones are generated with the base model.")
    data.add_argument("--sample_batch_size", type=int, default=4, help="Batch size for generating class images.")
    data.add_argument("--prior_generation_precision", choices=["no", "fp32", "fp16", "bf16"], default=None,
                      help="Precision of the base model while it generates missing class images ('no' is fp32); "
                           "default: the training precision.")
    data.add_argument("--resolution", type=int, default=512, help="Training resolution (divisible by 8).")
    data.add_argument("--center_crop", action="store_true", help="Center-crop instead of random-crop.")
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    data.add_argument("--image_interpolation_mode", choices=INTERPOLATION_MODES, default="lanczos",
                      help="Filter used to resize images to --resolution.")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    cat = parser.add_argument_group("CAT (Contrastive Adapter Training)")
    cat.add_argument("--cat_alpha", type=alpha_value, default=1.0,
                     help="Weight alpha of the CAT term (Eq. 3). 0 turns it off: a plain LoRA run. 'auto': alpha "
                          "becomes a Lagrange multiplier that holds each concept's drift under --cat_drift_budget.")
    cat.add_argument("--cat_drift_budget", type=float, default=DEFAULT_DRIFT_BUDGET,
                     help="With --cat_alpha auto: the largest drift allowed on trigger-less prompts, as the CAT term "
                          "relative to the mean square of the base model's own prediction on y (0.03 = 3%%).")
    cat.add_argument("--cat_dual_lr", type=float, default=DEFAULT_DUAL_LR,
                     help="With --cat_alpha auto: how fast alpha moves: per optimizer step that runs the CAT passes "
                          "(all its accumulation micro-batches together), by this times log(drift / budget), from 0, "
                          "never below 0.")
    cat.add_argument("--cat_every", type=int, default=1,
                     help="Run the CAT passes on every N-th optimizer step only, with the term weighted by N (same "
                          "expected gradient, more variance). 1 is Eq. 3 exactly.")
    cat.add_argument("--trigger_token", default=None,
                     help="The rare word that names the subject, e.g. 'sks'. Required when --cat_alpha > 0 "
                          "(unless the concepts list gives one per concept).")
    cat.add_argument("--cat_prompt", choices=["strip", "class", "empty"], default="strip",
                     help="The prompt y of the CAT term: 'strip' removes the trigger from the caption (the "
                          "paper), 'class' replaces it with --cat_class_word, 'empty' uses ''.")
    cat.add_argument("--cat_class_word", default=None, help="Replacement word for --cat_prompt class, e.g. 'dog'.")
    cat.add_argument("--cat_swap_alpha", type=float, default=0.0,
                     help="Several concepts (--concepts_list): also weigh beta * ||eps_frozen(z_t, t, y) - "
                          "eps_lora(z_t, t, y_swap)||^2, where y_swap is the sample's caption with its trigger "
                          "replaced by another concept's (drawn per sample), so that no other trigger draws this "
                          "concept. 0 (the default) turns it off; needs --cat_alpha > 0.")
    cat.add_argument("--cat_prompts", default=None, metavar="FILE",
                     help="A bank of trigger-less prompts, one a line ('{class}' stands for the concept's class "
                          "word): each CAT step also weighs --cat_prompts_alpha * ||eps_frozen(z_t, t, y') - "
                          "eps_lora(z_t, t, y')||^2, y' drawn per sample from the bank, on the sample's own z_t and t.")
    cat.add_argument("--cat_prompts_alpha", type=float, default=DEFAULT_BANK_ALPHA,
                     help="Weight of the --cat_prompts term (with --cat_alpha auto, times each concept's multiplier).")
    cat.add_argument("--cat_prompts_latents", choices=["sample", "noise", "base"], default="sample",
                     help="The noisy input z' of the --cat_prompts term: 'sample', the training sample's own z_t at "
                          "its t (the default); 'noise', pure noise at the schedule's last timestep (no image in it, "
                          "so y' alone decides what the model draws); 'base', the base model's own image of y' "
                          "(--cat_prompts_base_images per prompt, generated once before training and kept in "
                          "<output_dir>/cat_bank_base_images.pt, never as image files), noised at its own t'.")
    cat.add_argument("--cat_prompts_base_images", type=int, default=2, metavar="N",
                     help="With --cat_prompts_latents base: the base model's images per bank prompt.")
    cat.add_argument("--cat_mode", choices=["lean", "batched"], default="lean",
                     help="'lean': backward the diffusion term before the CAT passes (lower peak memory); "
                          "'batched': both adapted passes in one denoiser call. Same gradients.")

    adapter = parser.add_argument_group("adapter")
    adapter.add_argument("--adapter", choices=["lora", "catversion"], default="lora",
                         help="'lora': LoRA layers (peft) on the denoiser; 'catversion': CatVersion (arXiv 2311.14631), "
                              "learned key/value tokens in the last 3 self-attention layers of the text encoder, "
                              "nothing else trains (SD 1.x/2.x only).")
    adapter.add_argument("--catversion_tokens", type=int, default=1,
                         help="CatVersion: learned key/value tokens per layer (the paper's 1).")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    lora.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (scale alpha/rank); default: rank.")
    lora.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout probability on the LoRA branch.")
    lora.add_argument("--train_text_encoder", action="store_true", help="Also train a LoRA on the text encoder.")

    # Names, types and defaults of diffusers' advanced scripts (train_dreambooth_lora_{sd15,sdxl,flux}_advanced.py).
    pivotal = parser.add_argument_group(
        "pivotal tuning and textual inversion", "New tokens learned in every CLIP text encoder, with the LoRA "
        "(pivotal tuning) or alone (textual inversion); flags of diffusers' advanced DreamBooth-LoRA scripts.")
    pivotal.add_argument("--train_text_encoder_ti", action="store_true",
                         help="Pivotal tuning: each --token_abstraction in captions and prompts becomes new tokens "
                              "<s0><s1>... whose embeddings train (only those rows of the embedding tables).")
    pivotal.add_argument("--token_abstraction", default="TOK",
                         help="The word(s) in the captions that stand for the subject, comma-separated for several "
                              "(e.g. 'TOK,TOK2'). With CAT it is the trigger: y is the caption without it.")
    pivotal.add_argument("--num_new_tokens_per_abstraction", type=int, default=2,
                         help="New tokens per --token_abstraction: TOK -> <s0><s1> with 2.")
    pivotal.add_argument("--train_text_encoder_ti_frac", type=float, default=0.5,
                         help="The embeddings train for the first ceil(fraction x steps) optimizer steps, then "
                              "freeze (in (0, 1]).")
    pivotal.add_argument("--train_transformer_frac", type=float, default=1.0,
                         help="Fraction of the run the denoiser's LoRA trains (diffusers' Flux advanced script). "
                              "0 with --train_text_encoder_ti: textual inversion alone, no LoRA layer anywhere; "
                              "1: pivotal tuning. Other values are not supported.")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="cat-lora-model")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--train_batch_size", type=int, default=4)
    train.add_argument("--num_train_epochs", type=int, default=1)
    train.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    train.add_argument("--checkpointing_steps", type=int, default=500)
    train.add_argument("--checkpoints_total_limit", type=int, default=None)
    train.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest'.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--text_encoder_lr", type=float, default=None,
                       help="Learning rate of the text encoder's LoRA (with --train_text_encoder); default: "
                            "--learning_rate. Prodigy uses --learning_rate for both.")
    train.add_argument("--scale_lr", action="store_true",
                       help="Scale the learning rate by processes x accumulation steps x batch size.")
    train.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS,
                       help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant" or '
                            '"constant_with_warmup".')
    train.add_argument("--lr_warmup_steps", type=int, default=0)
    train.add_argument("--lr_num_cycles", type=int, default=1)
    train.add_argument("--lr_power", type=float, default=1.0)
    train.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (5.0 is common).")
    train.add_argument("--noise_offset", type=float, default=0.0, help="Noise offset (0.1 is common).")
    train.add_argument("--optimizer", default="AdamW",
                       help="AdamW, or prodigy (needs the prodigyopt package; --learning_rate 1.0 is its usual "
                            "setting). Either case.")
    train.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW.")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="beta1 of AdamW and Prodigy.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="beta2 of AdamW and Prodigy.")
    train.add_argument("--prodigy_beta3", type=float, default=None,
                       help="Prodigy's beta3, for its step-size estimate; default (Prodigy's): sqrt(beta2).")
    train.add_argument("--prodigy_decouple", type=parse_bool, default=True,
                       help="Prodigy: decoupled (AdamW-style) weight decay.")
    train.add_argument("--adam_weight_decay", type=float, default=1e-2)
    train.add_argument("--adam_weight_decay_text_encoder", type=float, default=None,
                       help="Weight decay of the text encoder's LoRA; default: --adam_weight_decay.")
    train.add_argument("--adam_epsilon", type=float, default=1e-08)
    train.add_argument("--prodigy_use_bias_correction", type=parse_bool, default=True,
                       help="Prodigy: Adam's bias correction.")
    train.add_argument("--prodigy_safeguard_warmup", type=parse_bool, default=True,
                       help="Prodigy: keep the learning rate out of the denominator of the step-size estimate "
                            "(steadier during warm-up).")
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    train.add_argument("--allow_tf32", action="store_true")
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="xformers attention in the U-Net (needs the xformers package).")
    train.add_argument("--local_rank", type=int, default=-1,
                       help="Accepted for compatibility and ignored: accelerate gives each process its rank.")
    train.add_argument("--cache_latents", action="store_true",
                       help="Encode every image with the VAE once, before training (needs --center_crop and no "
                            "--random_flip: cached latents cannot be re-augmented).")
    train.add_argument("--pre_compute_text_embeddings", action="store_true",
                       help="Encode every caption (y_T, the CAT prompt y and the class prompt) once, before "
                            "training; not with --train_text_encoder.")
    train.add_argument("--fsdp_text_encoder", action="store_true",
                       help="Under FSDP (accelerate config distributed_type: FSDP, fsdp_version: 2): shard the frozen "
                            "text encoders across the processes too, by their decoder layers (docs/multi-gpu.md).")

    logs = parser.add_argument_group("logging, validation and output")
    logs.add_argument("--report_to", default="tensorboard", choices=TRACKERS,
                      help='"tensorboard", "wandb", another tracker accelerate knows, "all" or "none".')
    logs.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")
    logs.add_argument("--validation_prompt", default=None,
                      help="A prompt with the trigger; validation draws it with and without the trigger.")
    logs.add_argument("--num_validation_images", type=int, default=4)
    logs.add_argument("--validation_steps", type=int, default=None,
                      help=f"Validate every N optimizer steps and after the last one; default "
                           f"{DEFAULT_VALIDATION_STEPS} unless --validation_epochs is given.")
    logs.add_argument("--validation_epochs", type=int, default=None,
                      help="Validate at the end of epoch 1, 1+N, 1+2N, ... and after the last step (diffusers' "
                           "schedule), instead of every --validation_steps.")
    logs.add_argument("--num_validation_inference_steps", type=int, default=25)
    logs.add_argument("--validation_kps", action="store_true",
                      help="At each validation, log the Knowledge Preservation Score (Eq. 9) of the grid: 1 - the "
                           "harmonic mean of CLIP cosines between the with- and without-trigger images.")
    logs.add_argument("--validation_clip_model", default="ViT-L-14-quickgelu",
                      help="open_clip architecture (or model config .json) for --validation_kps.")
    logs.add_argument("--validation_clip_pretrained", default="openai",
                      help="open_clip pretrained tag or local checkpoint file for --validation_kps.")
    logs.add_argument("--skip_final_inference", action="store_true",
                      help="Accepted for diffusers' commands: this script runs no final inference pass (validation "
                           "runs every --validation_steps).")
    logs.add_argument("--output_kohya_format", action="store_true",
                      help="Also write pytorch_lora_weights_kohya.safetensors for AUTOMATIC1111/ComfyUI.")
    logs.add_argument("--push_to_hub", action="store_true")
    logs.add_argument("--hub_token", default=None)
    logs.add_argument("--hub_model_id", default=None)

    # Names, types and defaults as in diffusers' per-family DreamBooth-LoRA scripts; each help starts with the
    # families that read the flag (ModelFamily.reads).
    family = parser.add_argument_group("family flags", "Flags of diffusers' per-family DreamBooth-LoRA scripts; each "
                                       "applies to the model families named at the start of its help.")
    family.add_argument("--pretrained_vae_model_name_or_path", default=None,
                        help=f"{family_readers('pretrained_vae_model_name_or_path')}: "
                             "a VAE (hub id or folder) to use instead of the pipeline's own, e.g. an "
                             "fp16-safe one.")
    family.add_argument("--max_sequence_length", type=int, default=None,
                        help=f"{family_readers('max_sequence_length')}: "
                             "token limit of prompts for the long text encoder (T5, Qwen, ...); default: the family's "
                             "diffusers script's (" + ", ".join(f"{f.label} {f.default_max_sequence_length}"
                                                                for f in FAMILIES.values()
                                                                if f.default_max_sequence_length) + ").")
    family.add_argument("--guidance_scale", type=float, default=3.5,
                        help=f"{family_readers('guidance_scale')}: "
                             "guidance value fed to a guidance-distilled transformer (FLUX.1 [dev]) "
                             "during training.")
    family.add_argument("--weighting_scheme", choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
                        default=None,
                        help=f"{family_readers('weighting_scheme')}: "
                             "'logit_normal' and 'mode' draw timesteps from that density, 'sigma_sqrt' "
                             "and 'cosmap' weight the loss per timestep; 'none': uniform timesteps, unweighted. "
                             "Default: the family's diffusers script's (SD3 logit_normal, the others none).")
    family.add_argument("--logit_mean", type=float, default=0.0,
                        help=f"{family_readers('logit_mean')}: "
                             "mean of the logit-normal timestep density (--weighting_scheme logit_normal).")
    family.add_argument("--logit_std", type=float, default=1.0,
                        help=f"{family_readers('logit_std')}: "
                             "standard deviation of the logit-normal timestep density.")
    family.add_argument("--mode_scale", type=float, default=1.29,
                        help=f"{family_readers('mode_scale')}: "
                             "scale of the 'mode' timestep density (--weighting_scheme mode).")
    family.add_argument("--lora_layers", default=None,
                        help=f"{family_readers('lora_layers')}: "
                             "comma-separated transformer modules to adapt, e.g. 'to_k,to_q,to_v,to_out.0'; "
                             "default: the family's own set.")
    family.add_argument("--upcast_before_saving", action="store_true",
                        help=f"{family_readers('upcast_before_saving')}: "
                             "cast the trained transformer to float32 before its LoRA weights are saved "
                             "(here the LoRA weights are float32 throughout, so they are saved in float32 anyway).")
    family.add_argument("--precondition_outputs", type=int, default=1,
                        help=f"{family_readers('precondition_outputs')}: "
                             "1: the transformer's output is preconditioned to a prediction of the clean latents "
                             "(x_t - sigma * output) and trained against them, as diffusers' SD3 script; 0: the "
                             "flow target noise - latents.")
    family.add_argument("--lora_blocks", default=None,
                        help=f"{family_readers('lora_blocks')}: "
                             "comma-separated transformer block numbers to adapt (e.g. '12,30'); default: all.")
    family.add_argument("--text_encoder_out_layers", type=int, nargs="+", default=None,
                        help=f"{family_readers('text_encoder_out_layers')}: "
                             "the text encoder's hidden layers stacked into the prompt embedding; default: the "
                             "pipeline's own, which it reads at inference (diffusers' script: 10 20 30).")
    family.add_argument("--bnb_quantization_config_path", default=None,
                        help=f"{', '.join(f.label for f in FAMILIES.values() if f.loads_quantized)}: "
                             "JSON file of bitsandbytes options (e.g. {\"load_in_4bit\": true, "
                             "\"bnb_4bit_quant_type\": \"nf4\"}) for loading the frozen transformer quantized; the "
                             "frozen pass reuses it with the adapters disabled. Needs a GPU (diffusers' loader).")

    refused = parser.add_argument_group("diffusers flags not supported here",
                                        "Using one stops with one line saying why.")
    for flag, (nargs, reason) in REFUSED_FLAGS.items():
        refused.add_argument(flag, action=RefusedFlag, nargs=nargs, reason=reason)
    return parser


def family_readers(dest: str) -> str:
    """The families that give the family flag ``dest`` a meaning, e.g. "Flux.1, SD3"."""
    return ", ".join(family.label for family in FAMILIES.values() if family.reads(dest))


def alpha_value(text: str):
    """--cat_alpha: a number, or 'auto' (the drift budget sets it)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the command line; every check here runs before any model is loaded."""
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    from importlib.util import find_spec

    sources = [args.instance_data_dir, args.dataset_name, args.concepts_list]
    if sum(source is not None for source in sources) != 1:
        raise InputError("give exactly one of --instance_data_dir, --dataset_name, --concepts_list")
    if args.train_text_encoder_ti and args.trigger_token is None and args.concepts_list is None:
        abstractions = token_abstractions(args.token_abstraction)
        if len(abstractions) > 1:
            raise InputError(f"--token_abstraction {args.token_abstraction!r} names several concepts: give "
                             "--trigger_token (one of them) or a --concepts_list with one trigger_token each")
        args.trigger_token = abstractions[0]  # with pivotal tuning the abstraction is CAT's trigger
    if args.dataset_name is not None and args.caption_column is None and args.instance_prompt is None:
        raise InputError("--dataset_name needs --caption_column (captions from the dataset) or --instance_prompt")
    if args.cat_alpha != "auto" and args.cat_alpha < 0:
        raise InputError(f"--cat_alpha must be >= 0, got {args.cat_alpha}")
    if args.cat_alpha != 0 and args.trigger_token is None and args.concepts_list is None:
        raise InputError(f"--trigger_token is required when --cat_alpha is {args.cat_alpha} (e.g. --trigger_token sks)")
    if args.cat_drift_budget <= 0:
        raise InputError(f"--cat_drift_budget must be positive, got {args.cat_drift_budget}")
    if args.cat_dual_lr <= 0:
        raise InputError(f"--cat_dual_lr must be positive, got {args.cat_dual_lr}")
    if args.cat_every <= 0:
        raise InputError(f"--cat_every must be positive, got {args.cat_every}")
    if args.trigger_token is not None and not args.trigger_token.strip():
        raise InputError("--trigger_token is empty")
    if args.cat_prompt == "class" and not args.cat_class_word and args.concepts_list is None:
        raise InputError("--cat_prompt class needs --cat_class_word")
    check_swap_args(args)
    if args.cat_prompts is not None and args.cat_alpha == 0:
        raise InputError("--cat_prompts adds to CAT's term: give --cat_alpha > 0 (or auto)")
    if args.cat_prompts_alpha < 0:
        raise InputError(f"--cat_prompts_alpha must be >= 0, got {args.cat_prompts_alpha}")
    if args.cat_prompts_latents != "sample" and args.cat_prompts is None:
        raise InputError("--cat_prompts_latents sets the --cat_prompts term's input: give --cat_prompts FILE")
    if args.cat_prompts_base_images < 1:
        raise InputError(f"--cat_prompts_base_images {args.cat_prompts_base_images}: give at least 1")
    if args.resolution <= 0 or args.resolution % 8:
        raise InputError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.with_prior_preservation and (args.class_data_dir is None or args.class_prompt is None):
        raise InputError("--with_prior_preservation needs --class_data_dir and --class_prompt")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit <= 0:
        raise InputError(f"--checkpoints_total_limit must be positive, got {args.checkpoints_total_limit}")
    check_pivotal_args(args)
    check_catversion_args(args)
    if args.rank <= 0:
        raise InputError(f"--rank must be positive, got {args.rank}")
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    if not 0 <= args.lora_dropout < 1:
        raise InputError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.validation_steps is not None and args.validation_epochs is not None:
        raise InputError("give --validation_steps or --validation_epochs, not both")
    if args.validation_steps is None and args.validation_epochs is None:
        args.validation_steps = DEFAULT_VALIDATION_STEPS
    for flag in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps",
                 "validation_steps", "validation_epochs", "repeats", "tokenizer_max_length", "text_encoder_lr"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise InputError(f"--{flag} must be positive, got {value}")
    if args.max_train_steps is not None and args.max_train_steps <= 0:
        raise InputError(f"--max_train_steps must be positive, got {args.max_train_steps}")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        raise InputError(f"--resume_from_checkpoint: {args.resume_from_checkpoint}: no such checkpoint folder")
    if args.cache_latents and args.random_flip:
        raise InputError("--cache_latents cannot be used with --random_flip (cached latents are not re-augmented)")
    if args.cache_latents and not args.center_crop:
        logger.warning("--cache_latents: each image's latents are cached from its center crop (as with --center_crop)")
    if args.pre_compute_text_embeddings and args.train_text_encoder:
        raise InputError("--pre_compute_text_embeddings cannot be used with --train_text_encoder")
    if args.validation_kps and args.validation_prompt is None:
        raise InputError("--validation_kps needs --validation_prompt")
    if args.report_to not in ("all", "none") and find_spec(args.report_to) is None:
        raise InputError(f"--report_to {args.report_to} needs the {args.report_to} package: pip install "
                         f"{args.report_to}, or --report_to none")
    if args.push_to_hub and args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise InputError("--hub_token with --report_to wandb would expose the token; use `hf auth login`")
    if args.optimizer.lower() not in ("adamw", "prodigy"):
        raise InputError(f"--optimizer {args.optimizer}: expected AdamW or prodigy")
    if args.optimizer.lower() == "prodigy":
        if args.use_8bit_adam:
            raise InputError("--use_8bit_adam applies to AdamW, not to --optimizer prodigy")
        if find_spec("prodigyopt") is None:
            raise InputError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt")
    if args.enable_xformers_memory_efficient_attention and find_spec("xformers") is None:
        raise InputError("--enable_xformers_memory_efficient_attention needs the xformers package: "
                         "pip install xformers")


def check_swap_args(args: argparse.Namespace) -> None:
    """--cat_swap_alpha: its anchor is CAT's frozen pass, and it swaps one concept's trigger for another's."""
    if args.cat_swap_alpha < 0:
        raise InputError(f"--cat_swap_alpha must be >= 0, got {args.cat_swap_alpha}")
    if args.cat_swap_alpha == 0:
        return
    if args.cat_alpha == 0:
        raise InputError("--cat_swap_alpha anchors on CAT's frozen pass: give --cat_alpha > 0 (or auto)")
    if args.concepts_list is None:
        raise InputError("--cat_swap_alpha swaps one concept's trigger for another's: give a --concepts_list with "
                         "at least two triggers")
    if args.train_text_encoder_ti:
        raise InputError("--cat_swap_alpha cannot be used with --train_text_encoder_ti (the triggers become new "
                         "tokens)")


def token_abstractions(text: str) -> list[str]:
    """--token_abstraction: the comma-separated words that stand for the subjects, spaces removed (as diffusers)."""
    abstractions = "".join(text.split()).split(",")
    if not all(abstractions):
        raise InputError(f"--token_abstraction {text!r}: an empty name (expected e.g. 'TOK' or 'TOK,TOK2')")
    if len(set(a.lower() for a in abstractions)) < len(abstractions):
        raise InputError(f"--token_abstraction {text!r}: a name appears twice (names ignore case, as CLIP does)")
    return abstractions


def check_pivotal_args(args: argparse.Namespace) -> None:
    """The pivotal-tuning and textual-inversion flags (see NewTokenEmbeddings)."""
    if args.num_new_tokens_per_abstraction <= 0:
        raise InputError(f"--num_new_tokens_per_abstraction must be positive, got {args.num_new_tokens_per_abstraction}")
    if not 0 < args.train_text_encoder_ti_frac <= 1:
        raise InputError(f"--train_text_encoder_ti_frac must be in (0, 1], got {args.train_text_encoder_ti_frac}")
    if args.train_transformer_frac not in (0, 1):
        raise InputError(f"--train_transformer_frac {args.train_transformer_frac}: only 0 (textual inversion alone) "
                         "or 1 (the LoRA trains for the whole run) are supported")
    if not args.train_text_encoder_ti:
        if args.train_transformer_frac == 0:
            raise InputError("--train_transformer_frac 0 (textual inversion alone) needs --train_text_encoder_ti")
        return
    abstractions = token_abstractions(args.token_abstraction)
    if args.trigger_token is not None and args.trigger_token.lower() not in [a.lower() for a in abstractions]:
        raise InputError(f"--trigger_token {args.trigger_token!r} must be a --token_abstraction "
                         f"({', '.join(abstractions)}): with pivotal tuning the abstraction is the trigger")
    if args.pre_compute_text_embeddings:
        raise InputError("--pre_compute_text_embeddings cannot be used with --train_text_encoder_ti (the embeddings "
                         "train)")
    if args.train_transformer_frac == 0:
        if args.train_text_encoder:
            raise InputError("--train_transformer_frac 0 trains the new embeddings alone; drop --train_text_encoder "
                             "(it adds LoRA layers)")
        if args.cat_alpha != 0:
            raise InputError(f"--cat_alpha {args.cat_alpha} has no effect with --train_transformer_frac 0: y holds "
                             "none of the new tokens and no LoRA layer exists, so the CAT term has no gradient; "
                             "pass --cat_alpha 0")


# What a CatVersion run cannot use, each with why (LoRA's flags have no LoRA layer to act on).
CATVERSION_REFUSED = {
    "rank": "CatVersion has no LoRA layers (its size is --catversion_tokens)",
    "lora_alpha": "CatVersion has no LoRA layers",
    "lora_dropout": "CatVersion has no LoRA layers",
    "lora_layers": "CatVersion has no LoRA layers (it adapts the text encoder's last 3 self-attention layers)",
    "train_text_encoder": "CatVersion already adapts the text encoder, with its key/value tokens alone",
    "train_text_encoder_ti": "CatVersion learns no new token embeddings",
    "output_kohya_format": "kohya's format holds LoRA layers; CatVersion is saved as catversion.safetensors",
    "pre_compute_text_embeddings": "CatVersion trains inside the text encoder, which must run at every step",
}


def check_catversion_args(args: argparse.Namespace) -> None:
    """--adapter catversion: the flags that mean nothing for it are refused, one line each."""
    if args.catversion_tokens <= 0:
        raise InputError(f"--catversion_tokens must be positive, got {args.catversion_tokens}")
    if args.adapter != "catversion":
        return
    defaults = build_parser().parse_args(["--pretrained_model_name_or_path", "-"])
    for dest, why in CATVERSION_REFUSED.items():
        if getattr(args, dest) != getattr(defaults, dest):
            raise InputError(f"--{dest} cannot be used with --adapter catversion: {why}")


def validation_due(args: argparse.Namespace, step: int, steps_per_epoch: int, max_train_steps: int) -> bool:
    """Whether to validate after optimizer step ``step``: every --validation_steps, or at the end of epochs
    1, 1+N, 1+2N, ... for --validation_epochs N (diffusers validates after epoch index 0, N, 2N, ...); and always
    after the last step."""
    if step == max_train_steps:
        return True
    if args.validation_epochs is not None:
        epochs_done, within = divmod(step, steps_per_epoch)
        return within == 0 and (epochs_done - 1) % args.validation_epochs == 0
    return step % args.validation_steps == 0


def prior_generation_dtype(precision: str | None, training_dtype):
    """The dtype for generating class images: --prior_generation_precision, else the training dtype."""
    import torch

    return {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
            "bf16": torch.bfloat16}.get(precision, training_dtype)


def optimizer_parameter_groups(args: argparse.Namespace, denoiser_parameters: list, text_encoder_parameters: list,
                               learning_rate: float):
    """The optimizer's parameters: one list, or two groups when the text encoder's LoRA has its own learning rate
    (--text_encoder_lr; Prodigy keeps --learning_rate) or weight decay (--adam_weight_decay_text_encoder)."""
    lr = args.text_encoder_lr if args.optimizer.lower() == "adamw" else None
    decay = args.adam_weight_decay_text_encoder
    if not text_encoder_parameters or (lr is None and decay is None):
        return denoiser_parameters + text_encoder_parameters  # one group: checkpoints keep their layout
    return [{"params": denoiser_parameters},
            {"params": text_encoder_parameters, "lr": lr or learning_rate,
             "weight_decay": args.adam_weight_decay if decay is None else decay}]


# ---------------------------------------------------------------------------------------------------------
# 2. Trigger handling (pure functions; evaluate_kps.py imports these so both scripts share one definition)
# ---------------------------------------------------------------------------------------------------------


def _trigger_pattern(trigger: str) -> re.Pattern:
    # A trigger is a whole word: not preceded or followed by a word character ("sksx" and "xsks" stay),
    # while punctuation right after it ("sks,") still counts as a word boundary. Case is ignored because
    # CLIP's tokenizer lowercases every caption: "SKS" and "sks" are the same token to the text encoder.
    return re.compile(r"(?<!\w)" + re.escape(trigger) + r"(?!\w)", re.IGNORECASE)


def contains_trigger(caption: str, trigger: str) -> bool:
    """True when ``trigger`` occurs in ``caption`` as a whole word, in any case ("SKS" counts as "sks").

    Case is ignored because CLIP's tokenizer lowercases the caption: to the text encoder "SKS" is the
    trigger, so a caption holding only "SKS" does contain it.
    """
    return bool(_trigger_pattern(trigger).search(caption))


def _tidy(caption: str) -> str:
    caption = re.sub(r"\s+", " ", caption).strip()
    # Removing a word can leave " ," or a leading comma behind: close the gap, drop the orphan.
    caption = re.sub(r"\s+([,.;:!?])", r"\1", caption)
    caption = re.sub(r"([,;:])(?:[,;:])+", r"\1", caption)
    caption = re.sub(r"^[,;:]\s*", "", caption)
    return caption


def replace_trigger(caption: str, trigger: str, replacement: str) -> str:
    """Replace every whole-word occurrence of ``trigger``, in any case, with ``replacement``; tidy whitespace."""
    return _tidy(_trigger_pattern(trigger).sub(lambda match: replacement, caption))


def strip_trigger(caption: str, trigger: str) -> str:
    """The paper's y from y_T (Eq. 3): the caption with its trigger word removed.

    The trigger is removed as a whole word, never as a substring, and whitespace is collapsed:
    ``"a photo of sks dog"`` -> ``"a photo of dog"``, ``"sks, a dog"`` -> ``"a dog"``,
    ``"a sksx dog"`` is left unchanged.

    Every occurrence goes, whatever its case: ``"a sks dog, SKS style"`` -> ``"a dog, style"``. CLIP's
    tokenizer lowercases the caption, so "SKS" is the trigger token to the text encoder; Eq. 3 defines y as
    y_T without the trigger, and an "SKS" left in y would make the CAT term pull the trigger itself back to
    the base model.
    """
    return replace_trigger(caption, trigger, "")


def cat_prompt(caption: str, trigger: str, mode: str, class_word: str | None = None) -> str:
    """The prompt y on which CAT compares the adapted and the frozen denoiser (Eq. 3).

    ``strip`` (the paper's choice): ``caption`` without its trigger; ``class``: the trigger replaced by
    ``class_word`` ("a photo of sks" -> "a photo of teapot"); ``empty``: the unconditional prompt "".
    """
    if mode == "strip":
        return strip_trigger(caption, trigger)
    if mode == "class":
        if not class_word:
            raise InputError("--cat_prompt class needs --cat_class_word (or class_word in the concepts list)")
        return replace_trigger(caption, trigger, class_word)
    if mode == "empty":
        return ""
    raise ValueError(f"unknown CAT prompt mode {mode!r}")


# ---------------------------------------------------------------------------------------------------------
# 3. Data
# ---------------------------------------------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (the order is part of the random stream)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_text(path: Path, where: str | None = None) -> str:
    """The contents of a UTF-8 text file; ``InputError`` naming the file (and ``where``, e.g. a flag) if it is not.

    Captions and lists are read as UTF-8 whatever the system's locale, so a run means the same everywhere.
    """
    prefix = f"{where}: {path}" if where else str(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{prefix}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                         f"{error.start}); save it as UTF-8") from None


def load_image_caption_pairs(folder, default_caption: str | None = None) -> list[tuple[Path, str]]:
    """Pair each image in ``folder`` with its caption.

    A caption comes from, in order: a ``metadata.jsonl`` in the folder (lines with ``file_name`` and
    ``text``), a ``.txt`` file with the image's stem beside it, or ``default_caption``. Raises
    ``InputError`` naming the folder or image when the folder is missing or empty or an image has no caption.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    metadata = {}
    metadata_file = folder / "metadata.jsonl"
    if metadata_file.is_file():
        for number, line in enumerate(read_text(metadata_file).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                metadata[record["file_name"]] = str(record["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise InputError(
                    f"{metadata_file}:{number}: expected a JSON object with 'file_name' and 'text' ({error})"
                ) from None
    images = list_images(folder)
    if not images:
        raise InputError(f"{folder}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    pairs = []
    for image in images:
        caption_file = image.with_suffix(".txt")
        if image.name in metadata:
            caption = metadata[image.name]
        elif caption_file.is_file():
            caption = read_text(caption_file).strip()
        elif default_caption is not None:
            caption = default_caption
        else:
            raise InputError(
                f"{image}: no caption (add {caption_file.name}, a metadata.jsonl entry, or --instance_prompt)"
            )
        pairs.append((image, caption))
    return pairs


@dataclass
class Concept:
    """One subject to learn: where its images are, its default caption, its trigger and class word."""

    instance_data_dir: str | None
    instance_prompt: str | None
    trigger_token: str | None
    class_word: str | None = None


@dataclass
class Example:
    """One training image (a path, or an image already decoded by datasets) with y_T and y."""

    image: object
    caption: str
    cat_caption: str
    name: str
    trigger: str | None = None
    concept: int = 0  # index in the concepts list: --cat_alpha auto holds each concept to the budget
    swap_captions: tuple[str, ...] = ()  # --cat_swap_alpha: the caption with each other concept's trigger
    bank_prompts: tuple[str, ...] = ()  # --cat_prompts: the bank, {class} replaced by this concept's class word


def concept_field_error(entry: dict) -> str | None:
    """What is wrong with the values of a concepts-list entry, or None.

    Each field must be a non-empty string (``class_word`` may also be null): a number or a list would
    otherwise fail much later, inside the regular expressions or the tokenizer, with a traceback.
    """
    for key in ("instance_data_dir", "instance_prompt", "trigger_token", "class_word"):
        if key not in entry or (key == "class_word" and entry[key] is None):
            continue
        value = entry[key]
        if not isinstance(value, str) or not value.strip():
            return f"{key} must be a non-empty string, got {json.dumps(value)}"
    return None


def load_concepts(args: argparse.Namespace) -> list[Concept]:
    """The concepts to train: the ``--concepts_list`` file, or one concept from the single-concept flags."""
    if args.concepts_list is None:
        return [Concept(args.instance_data_dir, args.instance_prompt, args.trigger_token, args.cat_class_word)]
    path = Path(args.concepts_list)
    try:
        entries = json.loads(read_text(path, "--concepts_list"))
    except FileNotFoundError:
        raise InputError(f"--concepts_list: {path}: no such file") from None
    except json.JSONDecodeError as error:
        raise InputError(f"--concepts_list: {path}: not valid JSON ({error})") from None
    if not isinstance(entries, list) or not entries:
        raise InputError(f"--concepts_list: {path}: expected a non-empty JSON list of concept objects")
    concepts = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(f"--concepts_list: {path}: entry {number} is not an object")
        missing = [key for key in ("instance_data_dir", "instance_prompt", "trigger_token") if key not in entry]
        if missing:
            raise InputError(f"--concepts_list: {path}: entry {number} lacks {', '.join(missing)}")
        wrong_type = concept_field_error(entry)
        if wrong_type:
            raise InputError(f"--concepts_list: {path}: entry {number}: {wrong_type}")
        folder = Path(entry["instance_data_dir"])
        if not folder.is_absolute():
            folder = path.parent / folder  # relative to the list, so a list travels with its images
        class_word = entry.get("class_word") or args.cat_class_word
        if args.cat_prompt == "class" and not class_word:
            raise InputError(f"--concepts_list: {path}: entry {number} needs class_word for --cat_prompt class")
        concepts.append(Concept(str(folder), entry["instance_prompt"], entry["trigger_token"], class_word))
    return concepts


def open_rgb_image(source, name: str, notes: dict | None = None):
    """Decode an image fully (so corrupt files fail here, not mid-training), upright and in 8-bit RGB.

    EXIF orientation is applied, 16-bit and float images are scaled to 8 bits (a plain convert would clip
    them to white), and transparency is flattened onto white (a plain convert would leave it black). What was
    changed is recorded in ``notes`` (category -> image names) for the data-loading summary.
    """

    def note(category):
        if notes is not None:
            notes.setdefault(category, []).append(name)

    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        image.load()
        orientation = image.getexif().get(0x0112, 1)
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # PIL raises many types for broken files
        raise InputError(f"{name}: cannot read image ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    if orientation not in (0, 1):
        note("rotated by their EXIF orientation")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and pixels.max() <= 1.0:
            pixels = pixels * 255.0  # float images in [0, 1]
        elif pixels.max() > 255:
            pixels = pixels / 257.0  # 16-bit: 65535 -> 255
        image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "L")
        note("scaled from 16-bit or float to 8-bit")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        note("with transparency flattened onto white")
    elif image.mode not in ("RGB", "L"):
        note(f"converted from {image.mode} to RGB")
    return image.convert("RGB")


def summarize_notes(notes: dict) -> list[str]:
    """One line per kind of change made to the data, with a count and the first few names."""
    lines = []
    for category, names in notes.items():
        shown = ", ".join(Path(n).name for n in names[:5]) + (", ..." if len(names) > 5 else "")
        lines.append(f"{len(names)} image(s) {category}: {shown}")
    return lines


def check_validation_prompt(prompt: str | None, cat_alpha: float, concepts: list[Concept]) -> None:
    """With CAT on, the validation prompt must name at least one concept's trigger.

    Validation draws the prompt with and without its triggers: without one, both rows would be the same
    picture and the grid would show nothing about the adapter.
    """
    triggers = [c.trigger_token for c in concepts if c.trigger_token]
    if prompt is None or cat_alpha == 0 or not triggers:
        return
    if not any(contains_trigger(prompt, trigger) for trigger in triggers):
        names = " or ".join(repr(trigger) for trigger in triggers)
        raise InputError(f"--validation_prompt {prompt!r} does not contain the trigger {names}")


def check_image(path: Path, resolution: int, notes: dict) -> None:
    """Decode one image file now (``InputError`` naming it if it cannot be); note what will be fixed on the way."""
    image = open_rgb_image(path, str(path), notes)
    if min(image.size) < resolution:
        notes.setdefault(f"smaller than --resolution {resolution} (upscaled)", []).append(str(path))


def check_class_images(class_data_dir: Path, num_class_images: int, resolution: int, notes: dict) -> None:
    """Decode the existing class images that prior preservation will use, before any model loads.

    These are the first ``num_class_images`` by name (the missing ones are generated later, and sort after
    or among them without pushing an unchecked one in). A corrupt one is an error naming it, as for
    instance images; conversions go into ``notes``, the same data-loading summary.
    """
    if not class_data_dir.is_dir():
        return
    for path in list_images(class_data_dir)[:num_class_images]:
        try:
            check_image(path, resolution, notes)
        except InputError as error:
            raise InputError(f"--class_data_dir: {error}; remove it (missing class images are generated)") from None


def collect_instance_examples(args: argparse.Namespace, concepts: list[Concept], notes: dict | None = None
                              ) -> list[Example]:
    """Every training image with its caption y_T and CAT prompt y, checked before any model loads.

    Unreadable images are errors; what is fixed on the way (orientation, bit depth, transparency, small
    images that will be upscaled) is recorded in ``notes``.
    """
    notes = {} if notes is None else notes
    examples = []
    if args.dataset_name is not None:
        examples = _examples_from_dataset(args, concepts[0], notes)
    else:
        for number, concept in enumerate(concepts):
            for path, caption in load_image_caption_pairs(concept.instance_data_dir, concept.instance_prompt):
                check_image(path, args.resolution, notes)
                examples.append(Example(path, caption, _cat_caption(args, concept, caption, str(path)), str(path),
                                        concept.trigger_token, number, swap_captions(args, concepts, concept, caption)))
    if args.cat_swap_alpha > 0 and not any(example.swap_captions for example in examples):
        raise InputError("--cat_swap_alpha: the concepts list has a single trigger, so there is nothing to swap")
    return examples


def swap_captions(args: argparse.Namespace, concepts: list[Concept], concept: Concept, caption: str
                  ) -> tuple[str, ...]:
    """--cat_swap_alpha: ``caption`` with its trigger replaced by each other concept's trigger (each once)."""
    if args.cat_swap_alpha == 0:
        return ()
    others = dict.fromkeys(c.trigger_token for c in concepts if c.trigger_token != concept.trigger_token)
    return tuple(replace_trigger(caption, concept.trigger_token, other) for other in others)


def load_prompt_bank(path: str, concepts: list[Concept]) -> list[tuple[str, ...]]:
    """--cat_prompts: the bank's prompts for each concept (``{class}`` replaced by its class word), in file order.

    One prompt a line; blank lines and lines starting with ``#`` are skipped. Refused in one line each: a missing
    file, a file with no prompt, a line holding any concept's trigger (y' must be trigger-less, or the term would pull
    the trigger itself back to the base model), and ``{class}`` for a concept without a class word.
    """
    where = f"--cat_prompts: {path}"
    if not Path(path).is_file():
        raise InputError(f"{where}: no such file")
    lines = [(number, line.strip()) for number, line in enumerate(read_text(Path(path), "--cat_prompts")
                                                                  .splitlines(), 1)]
    lines = [(number, line) for number, line in lines if line and not line.startswith("#")]
    if not lines:
        raise InputError(f"{where}: no prompts (one a line; blank lines and # comments are skipped)")
    banks = []
    for concept in concepts:
        bank = []
        for number, line in lines:
            if BANK_CLASS in line and not concept.class_word:
                raise InputError(f"{where}: line {number} uses {BANK_CLASS} but concept {concept.trigger_token!r} "
                                 "has no class word (--cat_class_word, or class_word in the concepts list)")
            prompt = line.replace(BANK_CLASS, concept.class_word or "")
            for trigger in (c.trigger_token for c in concepts if c.trigger_token):
                if contains_trigger(prompt, trigger):
                    raise InputError(f"{where}: line {number} {line!r} contains the trigger {trigger!r}; the bank is "
                                     "for prompts without any trigger")
            bank.append(prompt)
        banks.append(tuple(bank))
    return banks


def with_prompt_bank(examples: list[Example], banks: list[tuple[str, ...]]) -> list[Example]:
    """The examples, each with its concept's bank (``load_prompt_bank``)."""
    return [replace(example, bank_prompts=banks[example.concept]) for example in examples]


def _examples_from_dataset(args: argparse.Namespace, concept: Concept, notes: dict) -> list[Example]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(args.dataset_name, args.dataset_config_name, split="train", cache_dir=args.cache_dir)
    except Exception as error:
        raise InputError(f"--dataset_name {args.dataset_name}: cannot load ({type(error).__name__}: {error})") from None
    for column, flag in ((args.image_column, "--image_column"), (args.caption_column, "--caption_column")):
        if column is not None and column not in dataset.column_names:  # --caption_column unset: --instance_prompt
            raise InputError(f"{flag} {column!r} is not a column of {args.dataset_name} ({dataset.column_names})")
    if len(dataset) == 0:
        raise InputError(f"--dataset_name {args.dataset_name}: the train split is empty")
    examples = []
    for index, row in enumerate(dataset):
        name = f"{args.dataset_name}[{index}]"
        caption = row.get(args.caption_column) or args.instance_prompt
        if not caption:
            raise InputError(f"{name}: empty caption and no --instance_prompt")
        image = open_rgb_image(row[args.image_column], name, notes)
        examples.append(Example(image, caption, _cat_caption(args, concept, caption, name), name,
                                concept.trigger_token))
    return examples


def _cat_caption(args: argparse.Namespace, concept: Concept, caption: str, name: str) -> str:
    pivotal = getattr(args, "train_text_encoder_ti", False)
    if args.cat_alpha == 0 and not pivotal:
        return caption  # unused: the CAT term is off
    if not contains_trigger(caption, concept.trigger_token):
        flag = "--token_abstraction" if pivotal else "the trigger"
        raise InputError(f"{name}: caption {caption!r} does not contain {flag} {concept.trigger_token!r}")
    if args.cat_alpha == 0:
        return caption
    y = cat_prompt(caption, concept.trigger_token, args.cat_prompt, concept.class_word)
    if pivotal:  # every abstraction goes, so y holds none of the new tokens (the frozen pass is the base model's)
        for abstraction in token_abstractions(args.token_abstraction):
            y = strip_trigger(y, abstraction)
    return y


def warn_about_triggers(tokenizer, triggers: list[str]) -> None:
    """Warn when a trigger splits into several tokens or is a frequent word (its meaning will be overwritten)."""
    for trigger in triggers:
        pieces = tokenizer.tokenize(trigger)
        if len(pieces) > 1:
            logger.warning(f"trigger {trigger!r} splits into {len(pieces)} tokens {pieces}; a single rare token "
                           "(e.g. 'sks') binds the subject more cleanly")
        elif tokenizer.convert_tokens_to_ids(pieces[0]) < COMMON_TOKEN_ID_LIMIT:
            logger.warning(f"trigger {trigger!r} is a common word for this tokenizer; training will change what "
                           "it means everywhere. Prefer a rare token such as 'sks'")


def check_caption_lengths(tokenizer, examples: list[Example], notes: dict, limit: int | None = None) -> None:
    """Note captions longer than the text encoder's limit (``limit`` caption tokens; default: the tokenizer's less a
    start and an end token); refuse one whose trigger would be cut off."""
    limit = limit or tokenizer.model_max_length - 2
    for example in examples:
        ids = tokenizer(example.caption, add_special_tokens=False).input_ids
        if len(ids) <= limit:
            continue
        if example.trigger:
            trigger_ids = tokenizer(example.trigger, add_special_tokens=False).input_ids
            kept = ids[:limit]
            if not any(kept[i:i + len(trigger_ids)] == trigger_ids for i in range(len(kept) - len(trigger_ids) + 1)):
                raise InputError(f"{example.name}: the trigger {example.trigger!r} falls after the text encoder's "
                                 f"{limit}-token limit ({len(ids)} tokens); move it nearer the start of the caption")
        notes.setdefault(f"with captions truncated to {limit} tokens", []).append(example.name)


class EpochShuffleSampler:
    """A permutation of the dataset per epoch, drawn from (seed, epoch) alone.

    It yields sample numbers ``epoch * length + index``; the dataset seeds each sample's augmentation with
    that number. Data order and augmentation therefore never touch the global random state (which dataloader
    prefetching would otherwise advance ahead of the training step), so a run resumed mid-epoch sees the same
    images, crops and flips as the uninterrupted one.
    """

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        offset = self.epoch * self.length
        return iter((offset + i for i in torch.randperm(self.length, generator=generator).tolist()))

    def __len__(self) -> int:
        return self.length


def draw_seed(generator) -> int:
    """A fresh 62-bit seed from ``generator``."""

    return int(torch.randint(0, 2**62, (1,), generator=generator))


def augment(image, resolution: int, center_crop: bool, random_flip: bool, generator, interpolation: str = "lanczos"):
    """Resize the short side to ``resolution`` (filter: ``interpolation``, a --image_interpolation_mode), crop a
    square, maybe flip.

    Returns the tensor in [-1, 1] and SDXL's micro-conditioning for it: the original ``(height, width)`` and
    the crop's top-left corner ``(top, left)``, measured in the flipped image when the image was flipped (as
    diffusers' SDXL scripts do, which flip before cropping).
    """
    original_size = (image.height, image.width)
    image = TF.resize(image, resolution, interpolation=TF.InterpolationMode[interpolation.upper()])
    if center_crop:
        top = max(0, int(round((image.height - resolution) / 2.0)))
        left = max(0, int(round((image.width - resolution) / 2.0)))
        image = TF.center_crop(image, resolution)
    else:
        top = int(torch.randint(0, image.height - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, image.width - resolution + 1, (1,), generator=generator))
        resized_width = image.width
        image = TF.crop(image, top, left, resolution, resolution)
    if random_flip and torch.rand(1, generator=generator).item() < 0.5:
        image = TF.hflip(image)
        if not center_crop:
            left = resized_width - left - resolution
    return TF.normalize(TF.to_tensor(image), [0.5], [0.5]), original_size, (top, left)


class CATDataset:
    """A map-style dataset of pixel values, the prompts y_T and y, and (with prior preservation) class rows.

    Item ``k`` is example ``k % len`` augmented with randomness seeded by ``(seed, k)`` (see EpochShuffleSampler),
    with a ``noise_seed`` for its latent sample, noise and timestep drawn from the same generator. Prompts stay
    text: each model family tokenizes them for its own text encoders. With a ``latent_cache`` (image name ->
    VAE posterior parameters, original size, crop) ``pixel_values`` holds those parameters instead.

    A module-level class holding only picklable data, so that dataloader workers started with spawn or
    forkserver (macOS, Windows, Python 3.14's default on Linux) can receive it.
    """

    def __init__(self, instance_examples, class_examples, resolution: int, center_crop: bool, random_flip: bool,
                 seed: int = 0, latent_cache: dict | None = None, interpolation: str = "lanczos",
                 bank_base: dict | None = None):
        self.instance_examples, self.class_examples = instance_examples, class_examples or []
        self.resolution, self.seed, self.latent_cache = resolution, seed, latent_cache
        self.center_crop, self.random_flip, self.interpolation = center_crop, random_flip, interpolation
        self.bank_base = bank_base  # --cat_prompts_latents base: bank prompt -> the base model's images of it

    def __len__(self):
        # As in DreamBooth: an epoch walks the longer of the instance and class sets.
        return max(len(self.instance_examples), len(self.class_examples))

    def pixels_or_latents(self, example: Example, generator):
        if self.latent_cache is not None:
            return self.latent_cache[example.name]
        return augment(open_rgb_image(example.image, example.name), self.resolution, self.center_crop,
                       self.random_flip, generator, self.interpolation)

    def __getitem__(self, number: int) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + number)
        example = self.instance_examples[number % len(self.instance_examples)]
        pixels, original_size, crop_top_left = self.pixels_or_latents(example, generator)
        item = {
            "pixel_values": pixels,
            "original_size": original_size,
            "crop_top_left": crop_top_left,
            "prompt": example.caption,
            "cat_prompt": example.cat_caption,
            "concept": example.concept,
            "noise_seed": draw_seed(generator),
        }
        if self.class_examples:
            class_example = self.class_examples[number % len(self.class_examples)]
            pixels, original_size, crop_top_left = self.pixels_or_latents(class_example, generator)
            item.update(class_pixel_values=pixels, class_original_size=original_size,
                        class_crop_top_left=crop_top_left, class_prompt=class_example.caption,
                        class_noise_seed=draw_seed(generator))
        if example.swap_captions:  # drawn last: the draws above are those of a run without --cat_swap_alpha
            which = torch.randint(len(example.swap_captions), (), generator=generator).item()
            item["swap_prompt"] = example.swap_captions[which]
        if example.bank_prompts:  # drawn after every other draw: the rest of the item is that of a run without a bank
            which = torch.randint(len(example.bank_prompts), (), generator=generator).item()
            item["bank_prompt"] = example.bank_prompts[which]
            if self.bank_base:  # one of the base model's images of y', with its own noise seed (z', t')
                images = self.bank_base[item["bank_prompt"]]
                base = images[torch.randint(len(images), (), generator=generator).item()]
                pixels, original_size, crop_top_left = self.pixels_or_latents(base, generator)
                item.update(bank_pixel_values=pixels, bank_original_size=original_size,
                            bank_crop_top_left=crop_top_left, bank_noise_seed=draw_seed(generator))
        return item


def make_dataset(instance_examples, class_examples, resolution, center_crop, random_flip, seed=0,
                 latent_cache: dict | None = None, interpolation: str = "lanczos",
                 bank_base: dict | None = None) -> CATDataset:
    """The training dataset (see ``CATDataset``)."""
    return CATDataset(instance_examples, class_examples, resolution, center_crop, random_flip, seed, latent_cache,
                      interpolation, bank_base)


def collate_examples(items: list[dict]) -> dict:
    """Stack a batch; class rows go after the instance rows, whose count is ``num_instance``.

    ``prompts`` are the captions of every row (y_T, then the class prompt), ``cat_prompts`` the CAT prompts y
    of the instance rows, ``swap_prompts`` their captions with another concept's trigger (--cat_swap_alpha; else
    empty), ``bank_prompts`` each instance row's prompt y' drawn from the --cat_prompts bank (else empty), and with
    --cat_prompts_latents base ``bank``: a batch of its own (pixels or cached latents, sizes, noise seeds) of the
    base model's images of those y', one per instance row.
    """
    fields_ = ["pixel_values", "original_size", "crop_top_left", "prompt", "noise_seed"]
    rows = {name: [item[name] for item in items] for name in fields_}
    if "class_pixel_values" in items[0]:
        for name in fields_:
            rows[name] += [item[f"class_{name}"] for item in items]
    bank = {}
    if "bank_pixel_values" in items[0]:
        bank = {"bank": {
            "pixel_values": torch.stack([item["bank_pixel_values"] for item in items]).contiguous().float(),
            "original_sizes": torch.tensor([item["bank_original_size"] for item in items], dtype=torch.int64),
            "crops_top_left": torch.tensor([item["bank_crop_top_left"] for item in items], dtype=torch.int64),
            "noise_seeds": torch.tensor([item["bank_noise_seed"] for item in items], dtype=torch.int64),
            "num_instance": len(items)}}
    return {
        **bank,
        "pixel_values": torch.stack(rows["pixel_values"]).contiguous().float(),
        "original_sizes": torch.tensor(rows["original_size"], dtype=torch.int64),
        "crops_top_left": torch.tensor(rows["crop_top_left"], dtype=torch.int64),
        "prompts": rows["prompt"],
        "cat_prompts": [item["cat_prompt"] for item in items],
        "swap_prompts": [item["swap_prompt"] for item in items if "swap_prompt" in item],
        "bank_prompts": [item["bank_prompt"] for item in items if "bank_prompt" in item],
        "concepts": torch.tensor([item["concept"] for item in items], dtype=torch.int64),
        "noise_seeds": torch.tensor(rows["noise_seed"], dtype=torch.int64),
        "num_instance": len(items),
    }


def prepare_class_examples(args: argparse.Namespace, family, accelerator, weight_dtype) -> list[Example]:
    """DreamBooth's class images: generate the missing ones with the base model, then list them all."""
    class_dir = Path(args.class_data_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    missing = args.num_class_images - len(list_images(class_dir))
    if missing > 0 and accelerator.is_main_process:
        dtype = prior_generation_dtype(args.prior_generation_precision, weight_dtype)
        pipeline = family.load_pipeline(dtype=dtype).to(accelerator.device)
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(args.seed or 0)
        start = len(list_images(class_dir))
        logger.info(f"Generating {missing} class images for prior preservation in {class_dir}")
        for offset in tqdm(range(0, missing, args.sample_batch_size), desc="class images"):
            count = min(args.sample_batch_size, missing - offset)
            images = pipeline(prompt=[args.class_prompt] * count, height=args.resolution, width=args.resolution,
                              generator=generator).images
            for number, image in enumerate(images):
                image.save(class_dir / f"class-{start + offset + number:05d}.png")
        del pipeline
    accelerator.wait_for_everyone()
    paths = list_images(class_dir)[: args.num_class_images]
    return [Example(path, args.class_prompt, args.class_prompt, str(path)) for path in paths]


def prepare_bank_base_examples(args: argparse.Namespace, family, accelerator, weight_dtype,
                               instance_examples: list[Example]) -> dict[str, list[Example]]:
    """--cat_prompts_latents base: the base model's own images of every bank prompt (--cat_prompts_base_images
    each), generated once by the main process and kept in <output_dir>/cat_bank_base_images.pt (a tensor file, not
    image files; reused while the model, resolution, count, seed and prompts are the same: a resumed run draws the
    same z'). Each prompt's images come from its own seed, so a prompt's images do not depend on the others."""
    prompts = list(dict.fromkeys(p for e in instance_examples for p in e.bank_prompts))
    seed = args.seed or 0
    settings = {"model": args.pretrained_model_name_or_path, "revision": args.revision, "variant": args.variant,
                "resolution": args.resolution, "per_prompt": args.cat_prompts_base_images, "seed": seed}
    cache_file = Path(args.output_dir) / "cat_bank_base_images.pt"

    def cached() -> dict | None:
        if not cache_file.is_file():
            return None
        saved = torch.load(cache_file, weights_only=True)
        return saved["images"] if saved["settings"] == settings and set(prompts) <= set(saved["images"]) else None

    if accelerator.is_main_process and cached() is None:
        dtype = prior_generation_dtype(args.prior_generation_precision, weight_dtype)
        pipeline = family.load_pipeline(dtype=dtype).to(accelerator.device)
        pipeline.set_progress_bar_config(disable=True)
        logger.info(f"Generating the base model's images of {len(prompts)} bank prompts for --cat_prompts_latents base")
        images = {}
        for prompt in tqdm(prompts, desc="bank base images"):
            generator = torch.Generator(device="cpu").manual_seed(seed ^ zlib.crc32(prompt.encode()))
            drawn = pipeline(prompt=prompt, num_images_per_prompt=args.cat_prompts_base_images,
                             height=args.resolution, width=args.resolution, generator=generator).images
            images[prompt] = torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in drawn]))
        del pipeline
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"settings": settings, "images": images}, cache_file)
    accelerator.wait_for_everyone()
    images = cached()
    return {prompt: [Example(Image.fromarray(array.numpy()), prompt, prompt, f"cat-bank-base/{number}-{k}")
                     for k, array in enumerate(images[prompt])] for number, prompt in enumerate(prompts)}


# ---------------------------------------------------------------------------------------------------------
# 4. Models: one small class per pipeline family. Everything family-specific lives here (which models to
#    load, how prompts become conditioning, the noisy input and target, the LoRA targets, the pipeline class
#    used to sample and to save); the CAT term, the training step and the loop below do not know the family.
# ---------------------------------------------------------------------------------------------------------

CLIP_ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_ATTENTION_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


@dataclass(frozen=True)
class FamilyConfig:
    """The options a model family reads (a subset of the command line)."""

    pretrained_model_name_or_path: str
    revision: str | None = None
    variant: str | None = None
    resolution: int = 512
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    pretrained_vae_model_name_or_path: str | None = None
    tokenizer_name: str | None = None
    tokenizer_max_length: int | None = None
    # Families with flow matching and long text encoders (Flux.1, SD3, ...): see FAMILY_FLAGS
    max_sequence_length: int | None = None  # None: the family's default_max_sequence_length
    guidance_scale: float = 3.5
    weighting_scheme: str | None = None  # None: the family's default_weighting_scheme
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    lora_layers: str | None = None
    lora_blocks: str | None = None
    text_encoder_out_layers: tuple | None = None
    precondition_outputs: int = 1
    bnb_quantization_config_path: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "FamilyConfig":
        return cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)})


def device_of(model) -> torch.device:
    return getattr(model, "module", model).device


def tokenize(tokenizer, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                     max_length=max_length or tokenizer.model_max_length).input_ids


def row_generators(batch, device) -> list:
    """One generator per row, seeded by the batch's ``noise_seeds``: a sample gets the same latent sample, noise
    and timestep whatever batch, process or resumed run it lands in."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in batch["noise_seeds"]]


def per_sample(values, like):
    """(batch,) -> (batch, 1, 1, ...), broadcastable against ``like``."""
    return values.reshape(-1, *[1] * (like.ndim - 1))


# Noise objectives: how clean latents become what every term of Eq. 3 shares (z_t, t, the target, per-sample
# loss weights). Families hold one as a part (``objective``) instead of inheriting it from another family.

class NoiseObjective(ABC):
    """The objective's interface; ``flags`` names the FamilyConfig fields among FAMILY_FLAGS that it reads."""

    flags: tuple = ()
    scheduler_class: type  # the training noise scheduler, built from the pipeline's scheduler config

    def __init__(self, config: FamilyConfig):
        self.config = config

    @abstractmethod
    def noisy_latents(self, latents, generators: list, noise_scheduler) -> dict:
        """``{"noisy", "timesteps", "target", "loss_weights"}``; row i draws only from ``generators[i]``."""

    @abstractmethod
    def pure_noise(self, like, generators: list, noise_scheduler) -> dict:
        """``{"noisy", "timesteps", ...}`` of an input with no image in it: the schedule's last (noisiest) timestep,
        noise shaped ``like``, row i from ``generators[i]`` (--cat_prompts_latents noise)."""


class DDPMObjective(NoiseObjective):
    """Stable Diffusion's discrete schedule: the U-Net predicts the noise (epsilon) or the velocity (v-prediction),
    as the scheduler's config says; --noise_offset and --snr_gamma (Min-SNR) as in diffusers' SD scripts."""

    scheduler_class = DDPMScheduler  # whatever the pipeline samples with, as diffusers' SD scripts

    def noisy_latents(self, latents, generators: list, noise_scheduler) -> dict:
        device = latents.device
        noise = randn_tensor(latents.shape, generator=generators, device=device, dtype=latents.dtype)
        if self.config.noise_offset:
            offset = randn_tensor(latents.shape[:2] + (1,) * (latents.ndim - 2), generator=generators,
                                  device=device, dtype=latents.dtype)
            noise = noise + self.config.noise_offset * offset
        timesteps = torch.cat([torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=g,
                                             device=device) for g in generators]).long()
        return {"noisy": noise_scheduler.add_noise(latents, noise, timesteps), "timesteps": timesteps,
                "target": self.target(noise_scheduler, latents, noise, timesteps),
                "loss_weights": self.min_snr_weights(noise_scheduler, timesteps)}

    def pure_noise(self, like, generators: list, noise_scheduler) -> dict:
        noise = randn_tensor(like.shape, generator=generators, device=like.device, dtype=like.dtype)
        last = noise_scheduler.config.num_train_timesteps - 1
        timesteps = torch.full((like.shape[0],), last, device=like.device, dtype=torch.long)
        # x_T = sqrt(abar_T) x + sqrt(1 - abar_T) eps with x = 0: SD's schedule never reaches abar = 0
        return {"noisy": noise_scheduler.add_noise(torch.zeros_like(noise), noise, timesteps), "timesteps": timesteps}

    @staticmethod
    def target(noise_scheduler, latents, noise, timesteps):
        """What the U-Net is trained to predict: the noise (epsilon) or the velocity (v-prediction)."""
        prediction_type = noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction type {prediction_type!r}")

    def min_snr_weights(self, noise_scheduler, timesteps):
        """--snr_gamma: Min-SNR weights (Hang et al. 2023) per sample; None for the plain MSE."""
        if self.config.snr_gamma is None:
            return None
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=self.config.snr_gamma)
        return weights / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weights / snr


class FlowMatchingObjective(NoiseObjective):
    """Rectified flow, as diffusers' Flux.1/SD3/Qwen-Image/Z-Image/FLUX.2 scripts: z_t = (1 - sigma) x + sigma noise,
    target ``noise - x``, the timestep density of --weighting_scheme and its loss weights (diffusers' training_utils).
    The returned ``timesteps`` are the scheduler's (sigma x 1000), with the ``sigmas``; each family converts them for
    its denoiser."""

    flags = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")
    scheduler_class = FlowMatchEulerDiscreteScheduler

    def __init__(self, config: FamilyConfig):
        super().__init__(config)
        for flag, value in (("--snr_gamma", config.snr_gamma), ("--noise_offset", config.noise_offset or None)):
            if value is not None:
                raise InputError(f"{flag} is for Stable Diffusion's noise schedules; flow matching uses "
                                 "--weighting_scheme")

    def noisy_latents(self, latents, generators: list, noise_scheduler) -> dict:
        config, device = self.config, latents.device
        noise = randn_tensor(latents.shape, generator=generators, device=device, dtype=latents.dtype)
        u = torch.cat([compute_density_for_timestep_sampling(
            weighting_scheme=config.weighting_scheme, batch_size=1, logit_mean=config.logit_mean,
            logit_std=config.logit_std, mode_scale=config.mode_scale, device=device, generator=g) for g in generators])
        indices = (u * noise_scheduler.config.num_train_timesteps).long().cpu()
        timesteps = noise_scheduler.timesteps[indices].to(device)
        sigmas = noise_scheduler.sigmas[indices].to(device, dtype=latents.dtype)
        return {"noisy": (1.0 - per_sample(sigmas, latents)) * latents + per_sample(sigmas, latents) * noise,
                "timesteps": timesteps, "sigmas": sigmas, "target": noise - latents,
                "loss_weights": compute_loss_weighting_for_sd3(weighting_scheme=config.weighting_scheme, sigmas=sigmas)}

    def pure_noise(self, like, generators: list, noise_scheduler) -> dict:
        noise = randn_tensor(like.shape, generator=generators, device=like.device, dtype=like.dtype)
        rows = like.shape[0]
        # index 0: the schedule's largest timestep, sigma 1 (z = noise)
        sigmas = noise_scheduler.sigmas[0].to(like.device, dtype=like.dtype).repeat(rows)
        return {"noisy": per_sample(sigmas, noise) * noise, "sigmas": sigmas,
                "timesteps": noise_scheduler.timesteps[0].to(like.device).repeat(rows)}


class ModelFamily(ABC):
    """What a model family must define: the written interface between a pipeline and the family-agnostic CAT term,
    training step and loop. A subclass that leaves out a name of ``REQUIRED`` or an abstract method fails when
    its class statement runs (at import), not after hours of training.

    Data (class attributes):
      label                    the name users know ("SDXL"), in messages
      pipeline_class           the diffusers pipeline: loads the base, samples, saves (``save_lora_weights``)
      denoiser                 its component name ("unet", "transformer")
      text_encoders, tokenizers  component names, pairwise (tokenizers[i] feeds text_encoders[i])
      objective_class          a NoiseObjective (DDPM or flow matching)
      flags                    the FAMILY_FLAGS it reads (its objective's are added)
      trainable_text_encoders  what --train_text_encoder adapts, as diffusers' script; () refuses the flag
      embedding_file_keys      pivotal tuning (--train_text_encoder_ti): encoder -> key in the embeddings file
                               ({}: refused; the new tokens need CLIP-like encoders that read every prompt)
      kohya_layout             a KohyaLayout for --output_kohya_format, or None: refused
      hub_tag                  the model card's family tag
    Methods: ``encode_prompts`` (prompts -> conditioning), ``predict`` (z_t, t, conditioning -> the objective's
    target) and ``lora_targets``; loading, latents and the noisy input have generic defaults to override.
    """

    REQUIRED = ("label", "pipeline_class", "denoiser", "text_encoders", "tokenizers", "objective_class", "flags",
                "trainable_text_encoders", "embedding_file_keys", "kohya_layout", "hub_tag")
    # Optional, with these defaults:
    diffusers_lora_names = False  # True: save_lora_weights gets diffusers' names (lora.down/up), as diffusers' SD
    pipeline_kwargs = {}  # extra from_pretrained arguments of the pipeline
    validation_scheduler = None  # a scheduler class for validation images; None: the pipeline's own
    loads_quantized = False  # whether --bnb_quantization_config_path applies (diffusers' quantized loader)
    default_max_sequence_length = None  # families with a long text encoder: their diffusers script's default
    long_tokenizer = None  # the tokenizer that reads --max_sequence_length tokens (T5, Qwen, ...)
    default_weighting_scheme = "none"  # --weighting_scheme of the family's diffusers script
    supports_catversion = False  # --adapter catversion: a single CLIP text encoder whose attention it wraps

    def __init_subclass__(cls, partial: bool = False, **kwargs):
        """``partial=True``: a base that families share pieces through; the check waits for its subclasses."""
        super().__init_subclass__(**kwargs)
        if partial:
            return
        missing = [name for name in cls.REQUIRED if not hasattr(cls, name)]
        missing += [name for name in ("encode_prompts", "predict", "lora_targets")
                    if getattr(getattr(cls, name), "__isabstractmethod__", False)]
        if missing:
            raise TypeError(f"model family {cls.__name__} does not define {', '.join(missing)} (see ModelFamily)")
        if len(cls.text_encoders) != len(cls.tokenizers):
            raise TypeError(f"model family {cls.__name__}: one tokenizer per text encoder")
        unknown = set(cls.flags) - set(FAMILY_FLAGS)
        if unknown:
            raise TypeError(f"model family {cls.__name__}: flags {sorted(unknown)} are not in FAMILY_FLAGS")
        layout = cls.kohya_layout
        if layout is not None:
            if not isinstance(layout, KohyaLayout):
                raise TypeError(f"model family {cls.__name__}: kohya_layout must be a KohyaLayout or None, "
                                f"not {layout!r}")
            if layout.denoiser != cls.denoiser or not set(layout.text_encoders) <= set(cls.text_encoders):
                raise TypeError(f"model family {cls.__name__}: its kohya layout names {sorted(layout.prefixes)}, "
                                f"not its components ({cls.denoiser}, {', '.join(cls.text_encoders)})")
            unnamed = set(cls.trainable_text_encoders) - set(layout.text_encoders)
            if unnamed:
                raise TypeError(f"model family {cls.__name__}: its kohya layout has no prefix for "
                                f"{sorted(unnamed)}, which --train_text_encoder adapts")

    def __init__(self, config: FamilyConfig):
        family_defaults = {"max_sequence_length": self.default_max_sequence_length,
                           "weighting_scheme": self.default_weighting_scheme}
        config = replace(config, **{name: value for name, value in family_defaults.items()
                                    if getattr(config, name) is None})
        self.config = config
        self.source = {"pretrained_model_name_or_path": config.pretrained_model_name_or_path,
                       "revision": config.revision}
        self._tokenizers = None
        self.objective = self.objective_class(config)
        self.quantization = None
        if config.bnb_quantization_config_path is not None:
            if not self.loads_quantized:
                quantized = ", ".join(family.label for family in FAMILIES.values() if family.loads_quantized)
                raise InputError(f"--bnb_quantization_config_path: a quantized base is supported for {quantized} only, "
                                 f"not {self.label} ({self.pipeline_class.__name__})")
            self.quantization = read_quantization_config(config.bnb_quantization_config_path)

    @classmethod
    def reads(cls, flag: str) -> bool:
        """Whether this family gives the family flag ``flag`` (a FAMILY_FLAGS dest) a meaning."""
        return flag in cls.flags or flag in cls.objective_class.flags

    def tokenizer_of(self, text_encoder: str) -> str:
        """The pipeline component name of the tokenizer that feeds ``text_encoder``."""
        return self.tokenizers[self.text_encoders.index(text_encoder)]

    # Loading ------------------------------------------------------------------------------------------
    def load_tokenizers(self) -> dict:
        """The pipeline's tokenizers; --tokenizer_name replaces the first one and --tokenizer_max_length shortens
        its prompts, as in diffusers' scripts."""
        if self._tokenizers is None:
            tokenizers = {name: AutoTokenizer.from_pretrained(subfolder=name, **self.source) for name in self.tokenizers}
            first = self.tokenizers[0]
            if self.config.tokenizer_name:
                tokenizers[first] = AutoTokenizer.from_pretrained(self.config.tokenizer_name,
                                                                  revision=self.config.revision)
            max_length = self.config.tokenizer_max_length
            if max_length is not None:
                if max_length > tokenizers[first].model_max_length:
                    raise InputError(f"--tokenizer_max_length {max_length} exceeds the tokenizer's limit of "
                                     f"{tokenizers[first].model_max_length} tokens")
                tokenizers[first].model_max_length = max_length
            if self.long_tokenizer is not None:  # the caption-length checks measure against this limit
                tokenizers[self.long_tokenizer].model_max_length = self.config.max_sequence_length
            self._tokenizers = tokenizers
        return self._tokenizers

    def caption_token_limit(self, tokenizer_name: str) -> int:
        """How many caption tokens the text encoder fed by ``tokenizer_name`` reads: the tokenizer's limit less the
        special tokens it adds around a caption (CLIP: a start and an end token; T5: only the end token)."""
        tokenizer = self.load_tokenizers()[tokenizer_name]
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        return tokenizer.model_max_length - len(tokenizer("").input_ids)

    def component_class(self, name: str) -> type:
        """The class of the pipeline component ``name``, as the base's ``model_index.json`` names it."""
        if not hasattr(self, "_index"):
            self._index = DiffusionPipeline.load_config(self.config.pretrained_model_name_or_path,
                                                        revision=self.config.revision)
        library, class_name = self._index[name]
        return getattr(importlib.import_module(library), class_name)

    def load_component(self, name: str, **kwargs):
        return self.component_class(name).from_pretrained(subfolder=name, variant=self.config.variant, **self.source,
                                                          **kwargs)

    def load_text_encoders(self) -> dict:
        return {name: self.load_component(name) for name in self.text_encoders}

    def load_denoiser(self, weight_dtype=torch.float32):
        """The denoiser in float32 (prepare_models casts it), or quantized by diffusers' loader in ``weight_dtype``."""
        if self.quantization is None:
            return self.load_component(self.denoiser)
        options = dict(self.quantization)
        if options.get("load_in_4bit"):
            options["bnb_4bit_compute_dtype"] = weight_dtype  # as diffusers' scripts
        try:
            denoiser = self.load_component(self.denoiser, quantization_config=BitsAndBytesConfig(**options),
                                           torch_dtype=weight_dtype)
        except (RuntimeError, ImportError) as error:  # e.g. diffusers' "No GPU found. A GPU is needed for ..."
            raise InputError(f"--bnb_quantization_config_path {self.config.bnb_quantization_config_path}: "
                             f"{str(error).strip().splitlines()[0]}") from None
        return self.prepare_quantized(denoiser)

    @staticmethod
    def prepare_quantized(denoiser):
        """peft's preparation of a k-bit base (frozen, non-quantized parameters upcast), as diffusers does."""
        return prepare_model_for_kbit_training(denoiser, use_gradient_checkpointing=False)

    def load_vae(self):
        return self.load_component("vae")

    def load_noise_scheduler(self):
        return self.objective.scheduler_class.from_pretrained(subfolder="scheduler", **self.source)

    def load_models(self, weight_dtype=torch.float32) -> dict:
        """The frozen base model, keyed by pipeline component name, plus ``noise_scheduler``.

        The denoiser loads first: it is the component most likely to fail (a quantization config), and the
        failure should come before gigabytes of text encoders are read.
        """
        denoiser = self.load_denoiser(weight_dtype)
        models = {**self.load_text_encoders(), "vae": self.load_vae(), self.denoiser: denoiser}
        for model in models.values():
            model.requires_grad_(False)
        return {**models, "noise_scheduler": self.load_noise_scheduler()}

    def vae_dtype(self, weight_dtype):
        return weight_dtype

    def lora_layers(self, component: str, model) -> list[int] | None:
        """Which numbered layers of ``component`` get LoRA layers (None: all that match the targets)."""
        return None

    def load_pipeline(self, **components):
        """The family's inference pipeline from the base folder, with ``components`` (and ``torch_dtype``) given."""
        return self.pipeline_class.from_pretrained(
            variant=self.config.variant, **self.source, **self.pipeline_kwargs, **components)

    def text_pipeline(self, text_encoders: dict):
        """The family's pipeline holding only the text encoders and tokenizers, to reuse its own prompt encoding."""
        encoders = {name: getattr(model, "module", model) for name, model in text_encoders.items()}
        return self.pipeline_class(**{name: None for name in (self.denoiser, "vae", "scheduler")}, **encoders,
                                   **self.load_tokenizers())

    # Conditioning, noisy input, prediction -------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, text_encoders: dict, prompts: list[str]) -> dict:
        """Prompts -> the denoiser's conditioning, every tensor batch-first (rows can be taken and joined)."""

    @abstractmethod
    def predict(self, denoiser, z: dict, cond: dict):
        """The denoiser's prediction of ``z["target"]`` for ``z`` (from ``noisy_latents``) and ``cond``."""

    @abstractmethod
    def lora_targets(self, component: str, model) -> list[str]:
        """peft ``target_modules`` of ``component`` (the denoiser or a trainable text encoder), given its model."""

    @staticmethod
    def encode_pixels(vae, pixels):
        """The VAE's posterior of a batch of images (batch, 3, height, width)."""
        return vae.encode(pixels).latent_dist

    def posterior(self, batch, vae):
        """The VAE posterior of the batch's images (with --cache_latents, rebuilt from its cached parameters)."""
        images = batch["pixel_values"].to(vae.device, dtype=vae.dtype)
        if images.shape[1] == 3:
            return self.encode_pixels(vae, images)
        return DiagonalGaussianDistribution(images)  # --cache_latents: the posterior's mean and log-variance

    def encode_latents(self, batch, vae, generators, weight_dtype):
        """Pixels (or, with --cache_latents, the VAE posterior's parameters) -> normalized latents."""
        latents = self.posterior(batch, vae).sample(generator=generators)
        shift = getattr(vae.config, "shift_factor", None) or 0.0  # Flux's and SD3's VAEs have one; SD's does not
        return ((latents - shift) * vae.config.scaling_factor).to(weight_dtype)

    def noisy_latents(self, batch, vae, noise_scheduler, weight_dtype) -> dict:
        """z_t, t, the target and the per-sample loss weights: what every term of Eq. 3 shares (each row from its
        own generator, see ``row_generators``). Families add what else a sample conditions on (SDXL's time ids)."""
        generators = row_generators(batch, vae.device)
        latents = self.encode_latents(batch, vae, generators, weight_dtype)
        return self.objective.noisy_latents(latents, generators, noise_scheduler)


# Export layouts: how --output_kohya_format names a family's LoRA layers ---------------------------------------


class KohyaLayout(ABC):
    """A kohya key layout (the names AUTOMATIC1111/Forge and ComfyUI read), declared by a family as its
    ``kohya_layout``. ``kohya_state_dict`` writes any layout; a layout says only how names change.

      name         its short name ("sd"), in the model card and messages
      denoiser     the denoiser component, named ``lora_unet_`` (kohya calls Flux's transformer "unet" too)
      prefixes     component -> kohya prefix, the denoiser's and each text encoder's
    ``denoiser_layers`` renames the denoiser's LoRA layers (text encoders keep CLIP's ``text_model.`` paths).
    A layout that leaves a name out fails when its class is defined.
    """

    REQUIRED = ("name", "denoiser", "prefixes")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [name for name in cls.REQUIRED if not hasattr(cls, name)]
        if missing:
            raise TypeError(f"kohya layout {cls.__name__} does not define {', '.join(missing)} (see KohyaLayout)")
        if cls.prefixes.get(cls.denoiser) != "lora_unet":
            raise TypeError(f"kohya layout {cls.__name__}: the denoiser {cls.denoiser!r} must be named lora_unet")
        unknown = set(cls.prefixes) - {cls.denoiser, "text_encoder", "text_encoder_2"}
        if unknown:  # the components diffusers' convert_state_dict_to_kohya names
            raise TypeError(f"kohya layout {cls.__name__}: no kohya prefix for the components {sorted(unknown)}")

    @property
    def text_encoders(self) -> list[str]:
        return [component for component in self.prefixes if component != self.denoiser]

    @abstractmethod
    def denoiser_layers(self, pairs: dict, denoiser_config) -> dict:
        """``{diffusers layer path: (down, up)}`` of the denoiser -> ``{kohya layer path: (down, up)}``."""


class SDKohyaLayout(KohyaLayout):
    """kohya sd-scripts' SD 1.x/2.x names: lora_unet_<diffusers UNet path>, lora_te_text_model_<CLIP path>."""

    name, denoiser, prefixes = "sd", "unet", {"unet": "lora_unet", "text_encoder": "lora_te"}

    def denoiser_layers(self, pairs: dict, denoiser_config) -> dict:
        return dict(pairs)


class SDXLKohyaLayout(KohyaLayout):
    """kohya's SDXL names: lora_unet_<SGM/LDM UNet path>, lora_te1_text_model_..., lora_te2_text_model_..."""

    name, denoiser = "sdxl", "unet"
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}

    def denoiser_layers(self, pairs: dict, denoiser_config) -> dict:
        layers_per_block = denoiser_config.get("layers_per_block", 2)
        return {sgm_unet_layer(path, layers_per_block): pair for path, pair in pairs.items()}


class FluxKohyaLayout(KohyaLayout):
    """kohya's Flux.1 names: lora_unet_<Black Forest Labs path> with fused qkv/linear1, lora_te1_text_model_..."""

    name, denoiser = "flux", "transformer"
    prefixes = {"transformer": "lora_unet", "text_encoder": "lora_te1"}

    def denoiser_layers(self, pairs: dict, denoiser_config) -> dict:
        layers, fused = {}, {}
        for path, pair in pairs.items():
            name, part = flux_bfl_layer(path)
            if part is None:
                layers[name] = pair
            else:
                fused.setdefault(name, {})[part] = pair
        for name, parts in fused.items():
            layers[name] = fuse_lora_parts(parts, flux_fused_part_sizes(name, parts))
        return layers


class StableDiffusionFamily(ModelFamily):
    """SD 1.x/2.x: one CLIP text encoder, a U-Net predicting the noise (or the velocity, SD 2.x 768)."""

    label = "SD 1.x/2.x"
    pipeline_class = StableDiffusionPipeline
    denoiser = "unet"
    text_encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)
    objective_class = DDPMObjective
    flags = ()
    trainable_text_encoders = ("text_encoder",)
    # diffusers' advanced scripts and AUTOMATIC1111/ComfyUI read clip_l for SD's CLIP, clip_g for SDXL's second.
    embedding_file_keys = {"text_encoder": "clip_l"}
    kohya_layout = SDKohyaLayout()
    hub_tag = "stable-diffusion"
    diffusers_lora_names = True
    pipeline_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    validation_scheduler = DPMSolverMultistepScheduler
    supports_catversion = True

    def lora_targets(self, component: str, model=None) -> list[str]:
        return UNET_ATTENTION_TARGETS if component == self.denoiser else CLIP_ATTENTION_TARGETS

    def encode_prompts(self, text_encoders: dict, prompts: list[str]) -> dict:
        text_encoder = text_encoders["text_encoder"]
        ids = tokenize(self.load_tokenizers()["tokenizer"], prompts).to(device_of(text_encoder))
        return {"encoder_hidden_states": text_encoder(ids, return_dict=False)[0]}

    def predict(self, unet, z: dict, cond: dict):
        return unet(z["noisy"], z["timesteps"], cond["encoder_hidden_states"], return_dict=False)[0]


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL: two CLIP text encoders (penultimate hidden states concatenated, pooled embedding from the second)
    and the size/crop micro-conditioning ``time_ids``, as diffusers' ``train_dreambooth_lora_sdxl.py``."""

    supports_catversion = False  # CatVersion was defined and run on SD 1.5 only
    label = "SDXL"
    pipeline_class = StableDiffusionXLPipeline
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    flags = ("pretrained_vae_model_name_or_path",)
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    embedding_file_keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    kohya_layout = SDXLKohyaLayout()
    hub_tag = "stable-diffusion-xl"
    pipeline_kwargs = {"add_watermarker": False}

    def load_vae(self):
        if self.config.pretrained_vae_model_name_or_path is None:
            return super().load_vae()
        return AutoencoderKL.from_pretrained(self.config.pretrained_vae_model_name_or_path)

    def lora_layers(self, component: str, model) -> list[int] | None:
        # The first encoder is read at its penultimate layer: a LoRA on its last layer would never get a gradient
        # (and DDP refuses parameters without one).
        if component == "text_encoder":
            return list(range(model.config.num_hidden_layers - 1))
        return None

    def vae_dtype(self, weight_dtype):
        # SDXL's own VAE overflows in fp16 (NaN latents): keep it in float32 unless a fixed VAE was given.
        return torch.float32 if self.config.pretrained_vae_model_name_or_path is None else weight_dtype

    def load_pipeline(self, **components):
        if self.config.pretrained_vae_model_name_or_path is not None and "vae" not in components:
            components["vae"] = self.load_vae()
        return super().load_pipeline(**components)

    def encode_prompts(self, text_encoders: dict, prompts: list[str]) -> dict:
        tokenizers = self.load_tokenizers()
        hidden_states = []
        for tokenizer_name, encoder_name in zip(self.tokenizers, self.text_encoders):
            encoder = text_encoders[encoder_name]
            ids = tokenize(tokenizers[tokenizer_name], prompts).to(device_of(encoder))
            output = encoder(ids, output_hidden_states=True, return_dict=True)
            hidden_states.append(output.hidden_states[-2])
        # The pooled embedding is the second encoder's projected one (CLIPTextModelWithProjection.text_embeds).
        return {"encoder_hidden_states": torch.cat(hidden_states, dim=-1), "text_embeds": output.text_embeds}

    def noisy_latents(self, batch, vae, noise_scheduler, weight_dtype) -> dict:
        z = super().noisy_latents(batch, vae, noise_scheduler, weight_dtype)
        resolution = self.config.resolution
        target_size = torch.tensor([[resolution, resolution]]).expand(len(batch["original_sizes"]), 2)
        time_ids = torch.cat([batch["original_sizes"].cpu(), batch["crops_top_left"].cpu(), target_size], dim=1)
        return {**z, "time_ids": time_ids.to(vae.device, dtype=weight_dtype)}

    def predict(self, unet, z: dict, cond: dict):
        added = {"text_embeds": cond["text_embeds"], "time_ids": z["time_ids"]}
        return unet(z["noisy"], z["timesteps"], cond["encoder_hidden_states"], added_cond_kwargs=added,
                    return_dict=False)[0]


# diffusers' train_dreambooth_lora_flux.py default: attention (image and text streams) and feed-forward layers.
FLUX_TRANSFORMER_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                            "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                            "ff_context.net.0.proj", "ff_context.net.2"]


def read_quantization_config(path: str | None) -> dict | None:
    """--bnb_quantization_config_path: the JSON options of ``BitsAndBytesConfig``, checked before any model loads."""
    if path is None:
        return None
    flag = f"--bnb_quantization_config_path {path}"
    try:
        options = json.loads(Path(path).read_text())
    except OSError as error:
        raise InputError(f"{flag}: cannot read it ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{flag}: not valid JSON ({error})") from None
    if not isinstance(options, dict) or not (options.get("load_in_8bit") or options.get("load_in_4bit")):
        raise InputError(f"{flag}: expected a JSON object with \"load_in_8bit\": true or \"load_in_4bit\": true")
    try:
        BitsAndBytesConfig(**options)
    except (TypeError, ValueError) as error:
        raise InputError(f"{flag}: {str(error).splitlines()[0]}") from None
    return options


def listed_targets(lora_layers: str | None, default: list[str]) -> list[str]:
    """--lora_layers "a,b,c" (diffusers' flag of the transformer families), or the family's default."""
    if lora_layers:
        return [layer.strip() for layer in lora_layers.split(",") if layer.strip()]
    return default


class FluxFamily(ModelFamily):
    """Flux.1 as diffusers' ``train_dreambooth_lora_flux.py``: the CLIP pooled embedding and the T5 sequence,
    2x2-packed latents with their position ids, flow matching, and the guidance embedding of the
    guidance-distilled dev model."""

    label = "Flux.1"
    pipeline_class = FluxPipeline
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    objective_class = FlowMatchingObjective
    flags = ("max_sequence_length", "guidance_scale", "lora_layers", "upcast_before_saving")
    trainable_text_encoders = ("text_encoder",)  # CLIP; T5 stays frozen (as diffusers)
    # Pivotal tuning would give CLIP new rows while T5, which carries most of the conditioning, reads the new tokens
    # as unknown pieces: refused rather than half-done.
    embedding_file_keys = {}
    kohya_layout = FluxKohyaLayout()
    hub_tag = "flux"
    loads_quantized = True
    default_max_sequence_length = 512
    long_tokenizer = "tokenizer_2"

    def lora_targets(self, component: str, model=None) -> list[str]:
        if component != self.denoiser:
            return CLIP_ATTENTION_TARGETS
        return listed_targets(self.config.lora_layers, FLUX_TRANSFORMER_TARGETS)

    def encode_prompts(self, text_encoders: dict, prompts: list[str]) -> dict:
        """CLIP's pooled output and T5's last hidden states of the same prompts (both read the same y)."""
        tokenizers = self.load_tokenizers()
        clip, t5 = text_encoders["text_encoder"], text_encoders["text_encoder_2"]
        clip_ids = tokenize(tokenizers["tokenizer"], prompts).to(device_of(clip))
        t5_ids = tokenize(tokenizers["tokenizer_2"], prompts, self.config.max_sequence_length).to(device_of(t5))
        return {"encoder_hidden_states": t5(t5_ids, return_dict=False)[0],
                "pooled_projections": clip(clip_ids, output_hidden_states=False).pooler_output}

    def predict(self, transformer, z: dict, cond: dict):
        """Pack z_t into 2x2 patches with their image ids, run the transformer, unpack to the latents' shape.

        Latents stay unpacked outside ``predict``, so the target, the loss and the CAT term compare images, not
        token orders."""
        noisy = z["noisy"]
        batch_size, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch_size, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch_size, height // 2, width // 2, noisy.device,
                                                           noisy.dtype)
        prompt = cond["encoder_hidden_states"]
        text_ids = torch.zeros(prompt.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if getattr(transformer, "module", transformer).config.guidance_embeds:
            guidance = torch.full((batch_size,), self.config.guidance_scale, device=noisy.device)
        pred = transformer(hidden_states=packed, timestep=z["timesteps"] / 1000, guidance=guidance,
                           pooled_projections=cond["pooled_projections"], encoder_hidden_states=prompt,
                           txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        # In latent units: a scale factor of 1 makes _unpack_latents return the latents' own height and width.
        return FluxPipeline._unpack_latents(pred, height, width, 1)


# diffusers' train_dreambooth_lora_sd3.py default: the attention of both streams of the joint blocks.
SD3_TRANSFORMER_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                           "attn.to_out.0", "attn.to_q", "attn.to_v"]


class StableDiffusion3Family(ModelFamily):
    """SD3 and SD3.5 as diffusers' ``train_dreambooth_lora_sd3.py``: CLIP-L and CLIP-G read at their penultimate
    layer (concatenated, zero-padded to T5's width, then joined with T5's sequence), their projected pooled
    embeddings concatenated, an MMDiT on unpacked latents with the scheduler's timesteps (0-1000), flow matching;
    with --precondition_outputs (diffusers' default) prediction and target are the clean latents."""

    label = "SD3"
    pipeline_class = StableDiffusion3Pipeline
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    objective_class = FlowMatchingObjective
    flags = ("max_sequence_length", "lora_layers", "lora_blocks", "precondition_outputs", "upcast_before_saving")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")  # the two CLIPs; T5 stays frozen (as diffusers)
    embedding_file_keys = {}  # T5 reads every prompt too (as Flux.1)
    kohya_layout = None
    hub_tag = "sd3"
    default_max_sequence_length = 77  # diffusers' SD3 script (its pipeline's default is 256)
    long_tokenizer = "tokenizer_3"
    default_weighting_scheme = "logit_normal"  # diffusers' SD3 script

    def lora_targets(self, component: str, model=None) -> list[str]:
        if component != self.denoiser:
            return CLIP_ATTENTION_TARGETS
        targets = listed_targets(self.config.lora_layers, SD3_TRANSFORMER_TARGETS)
        if self.config.lora_blocks:
            blocks = [int(block) for block in self.config.lora_blocks.split(",") if block.strip()]
            targets = [f"transformer_blocks.{block}.{target}" for block in blocks for target in targets]
        return targets

    def encode_prompts(self, text_encoders: dict, prompts: list[str]) -> dict:
        tokenizers = self.load_tokenizers()
        clip_states, pooled = [], []
        for tokenizer_name, encoder_name in zip(self.tokenizers[:2], self.text_encoders[:2]):
            encoder = text_encoders[encoder_name]
            ids = tokenize(tokenizers[tokenizer_name], prompts).to(device_of(encoder))
            output = encoder(ids, output_hidden_states=True, return_dict=True)
            clip_states.append(output.hidden_states[-2])
            pooled.append(output.text_embeds)
        t5 = text_encoders["text_encoder_3"]
        t5_states = t5(tokenize(tokenizers["tokenizer_3"], prompts, self.config.max_sequence_length).to(device_of(t5)),
                       return_dict=False)[0]
        clip_states = torch.cat(clip_states, dim=-1)
        clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip_states, t5_states.to(clip_states.dtype)], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}

    def noisy_latents(self, batch, vae, noise_scheduler, weight_dtype) -> dict:
        z = super().noisy_latents(batch, vae, noise_scheduler, weight_dtype)
        if self.config.precondition_outputs:  # the clean latents: x_t - sigma * (noise - x)
            z["target"] = z["noisy"] - per_sample(z["sigmas"], z["noisy"]) * z["target"]
        return z

    def predict(self, transformer, z: dict, cond: dict):
        output = transformer(hidden_states=z["noisy"], timestep=z["timesteps"],
                             encoder_hidden_states=cond["encoder_hidden_states"],
                             pooled_projections=cond["pooled_projections"], return_dict=False)[0]
        if self.config.precondition_outputs:
            return z["noisy"] - per_sample(z["sigmas"], output) * output
        return output


def pad_rows(rows: list, length: int) -> tuple:
    """Variable-length (tokens, width) rows -> (batch, length, width) zero-padded, and the (batch, length) mask."""
    embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0].device)
    for number, row in enumerate(rows):
        embeds[number, :len(row)] = row
        mask[number, :len(row)] = True
    return embeds, mask


# diffusers' Qwen-Image and Z-Image scripts adapt the attention projections only.
ATTENTION_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


class LanguageModelFamily(ModelFamily, partial=True):
    """What the families with one language-model text encoder share (Qwen-Image, Z-Image, FLUX.2): flow matching,
    prompts of up to --max_sequence_length tokens, a quantized base where asked, and, as diffusers' scripts, no
    text-encoder LoRA, no pivotal tuning (the new tokens would need rows in a large vocabulary read by every
    prompt) and no kohya layout."""

    denoiser = "transformer"
    text_encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)
    objective_class = FlowMatchingObjective
    trainable_text_encoders = ()
    embedding_file_keys = {}
    kohya_layout = None
    loads_quantized = True
    default_max_sequence_length = 512
    long_tokenizer = "tokenizer"

    def lora_targets(self, component: str, model=None) -> list[str]:
        return listed_targets(self.config.lora_layers, ATTENTION_TARGETS)

    @abstractmethod
    def template_tokens(self) -> int:
        """How many of the --max_sequence_length tokens the pipeline's prompt template takes (an empty caption's)."""

    def caption_token_limit(self, tokenizer_name: str) -> int:
        tokenizer = self.load_tokenizers()[tokenizer_name]
        return getattr(tokenizer, "tokenizer", tokenizer).model_max_length - self.template_tokens()

    def chat_template_tokens(self, **template_options) -> int:
        """The length of the pipeline's chat template around an empty user message."""
        tokenizer = self.load_tokenizers()["tokenizer"]
        text = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                             add_generation_prompt=True, **template_options)
        return len(tokenizer(text).input_ids)


class QwenImageFamily(LanguageModelFamily):
    """Qwen-Image as diffusers' ``train_dreambooth_lora_qwen_image.py``: the pipeline's own prompt encoding (Qwen2.5-VL
    under its prompt template, the template's tokens dropped, with the attention mask), its video VAE's latents
    normalized per channel, 2x2-packed for the transformer with their shapes, flow matching with sigma as timestep."""

    label = "Qwen-Image"
    pipeline_class = QwenImagePipeline
    flags = ("max_sequence_length", "lora_layers", "upcast_before_saving")
    hub_tag = "qwen-image"

    def template_tokens(self) -> int:
        # The pipeline drops the template's system part after encoding; the rest stays in the sequence.
        pipeline = self.text_pipeline({"text_encoder": None})
        template = self.load_tokenizers()["tokenizer"](pipeline.prompt_template_encode.format("")).input_ids
        return len(template) - pipeline.prompt_template_encode_start_idx

    def encode_prompts(self, text_encoders: dict, prompts: list[str]) -> dict:
        # Padded to --max_sequence_length (the pipeline pads to the longest prompt): one shape for every call, so
        # rows of separate calls can be joined and cached; the mask keeps the padding out of attention.
        device = device_of(text_encoders["text_encoder"])
        embeds, mask = self.text_pipeline(text_encoders).encode_prompt(
            list(prompts), device=device, max_sequence_length=self.config.max_sequence_length)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        rows = [row[keep.bool()] for row, keep in zip(embeds, mask)]
        embeds, mask = pad_rows(rows, self.config.max_sequence_length)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

    @staticmethod
    def encode_pixels(vae, pixels):
        return vae.encode(pixels.unsqueeze(2)).latent_dist  # a video VAE: one frame

    def encode_latents(self, batch, vae, generators, weight_dtype):
        latents = self.posterior(batch, vae).sample(generator=generators)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(1, -1, 1, 1, 1)
        return ((latents - mean) / std).to(weight_dtype)

    def predict(self, transformer, z: dict, cond: dict):
        noisy = z["noisy"]  # (batch, channels, 1 frame, height, width)
        batch_size, channels, _, height, width = noisy.shape
        packed = QwenImagePipeline._pack_latents(noisy[:, :, 0], batch_size, channels, height, width)
        pred = transformer(hidden_states=packed, encoder_hidden_states=cond["encoder_hidden_states"],
                           encoder_hidden_states_mask=cond["encoder_hidden_states_mask"],
                           timestep=z["timesteps"] / 1000, img_shapes=[(1, height // 2, width // 2)] * batch_size,
                           return_dict=False)[0]
        return QwenImagePipeline._unpack_latents(pred, height, width, 1)  # scale 1: latent units


class ZImageFamily(LanguageModelFamily):
    """Z-Image as diffusers' ``train_dreambooth_lora_z_image.py``: the pipeline's own prompt encoding (Qwen3 under its
    chat template, penultimate layer, padding removed), the VAE posterior's mode, a transformer that takes lists of
    images and captions with the time running from noise (0) to clean (1) and predicts the negated flow."""

    label = "Z-Image"
    pipeline_class = ZImagePipeline
    flags = ("max_sequence_length", "lora_layers", "upcast_before_saving")
    hub_tag = "z-image"

    def template_tokens(self) -> int:
        return self.chat_template_tokens(enable_thinking=True)  # as ZImagePipeline._encode_prompt

    def encode_prompts(self, text_encoders: dict, prompts: list[str]) -> dict:
        device = device_of(text_encoders["text_encoder"])
        # A copy: the pipeline writes the templated prompts into the list it is given.
        rows = self.text_pipeline(text_encoders)._encode_prompt(list(prompts), device=device,
                                                                max_sequence_length=self.config.max_sequence_length)
        embeds, mask = pad_rows(rows, self.config.max_sequence_length)
        return {"prompt_embeds": embeds, "prompt_mask": mask}

    def encode_latents(self, batch, vae, generators, weight_dtype):
        latents = self.posterior(batch, vae).mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(weight_dtype)

    def predict(self, transformer, z: dict, cond: dict):
        images = list(z["noisy"].unsqueeze(2).unbind(0))  # (channels, 1 frame, height, width) each
        captions = [embeds[keep] for embeds, keep in zip(cond["prompt_embeds"], cond["prompt_mask"])]
        pred = transformer(images, (1000 - z["timesteps"]) / 1000, captions, return_dict=False)[0]
        return -torch.stack(pred).squeeze(2)


class Flux2KleinFamily(LanguageModelFamily):
    """FLUX.2 [klein] as diffusers' ``train_dreambooth_lora_flux2_klein.py``: the pipeline's own prompt encoding (Qwen3
    under its chat template, hidden states of --text_encoder_out_layers stacked), the VAE posterior's mode patchified
    2x2 and normalized by the VAE's batch-norm statistics, packed with 4-D position ids; flow matching with sigma as
    timestep; the guidance embedding only where the transformer has one."""

    label = "FLUX.2 [klein]"
    pipeline_class = Flux2KleinPipeline
    flags = ("max_sequence_length", "guidance_scale", "lora_layers", "upcast_before_saving", "text_encoder_out_layers")
    hub_tag = "flux2-klein"

    def template_tokens(self) -> int:
        return self.chat_template_tokens(enable_thinking=False)  # as Flux2KleinPipeline._get_qwen3_prompt_embeds

    def out_layers(self) -> tuple:
        """--text_encoder_out_layers, or the pipeline's own (diffusers' script defaults to 10, 20, 30, which the
        pipeline does not read at inference: a LoRA trained on them would be used on other features)."""
        if self.config.text_encoder_out_layers:
            return tuple(self.config.text_encoder_out_layers)
        return inspect.signature(self.pipeline_class.encode_prompt).parameters["text_encoder_out_layers"].default

    def lora_targets(self, component: str, model=None) -> list[str]:
        # diffusers' default: the image stream's attention in the double blocks, the fused projections in the
        # single blocks (their ``attn.to_out`` is a Linear; in the double blocks it is a list).
        single_blocks = len(model.single_transformer_blocks) if model is not None else 0
        return listed_targets(self.config.lora_layers, ATTENTION_TARGETS + ["to_qkv_mlp_proj"] + [
            f"single_transformer_blocks.{block}.attn.to_out" for block in range(single_blocks)])

    def encode_prompts(self, text_encoders: dict, prompts: list[str]) -> dict:
        encoder = getattr(text_encoders["text_encoder"], "module", text_encoders["text_encoder"])
        embeds = self.pipeline_class._get_qwen3_prompt_embeds(
            encoder, self.load_tokenizers()["tokenizer"], list(prompts), device=device_of(encoder),
            max_sequence_length=self.config.max_sequence_length, hidden_states_layers=self.out_layers())
        return {"encoder_hidden_states": embeds}

    def encode_latents(self, batch, vae, generators, weight_dtype):
        latents = self.pipeline_class._patchify_latents(self.posterior(batch, vae).mode())
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return ((latents - mean) / std).to(weight_dtype)

    def predict(self, transformer, z: dict, cond: dict):
        noisy, prompt = z["noisy"], cond["encoder_hidden_states"]
        image_ids = self.pipeline_class._prepare_latent_ids(noisy).to(noisy.device)
        text_ids = self.pipeline_class._prepare_text_ids(prompt).to(noisy.device)
        guidance = None
        if getattr(transformer, "module", transformer).config.guidance_embeds:
            guidance = torch.full((noisy.shape[0],), self.config.guidance_scale, device=noisy.device)
        pred = transformer(hidden_states=self.pipeline_class._pack_latents(noisy), encoder_hidden_states=prompt,
                           timestep=z["timesteps"] / 1000, img_ids=image_ids, txt_ids=text_ids, guidance=guidance,
                           return_dict=False)[0]
        return self.pipeline_class._unpack_latents_with_ids(pred[:, :image_ids.shape[1]], image_ids)



class Flux2Family(Flux2KleinFamily):
    """FLUX.2 [dev] as diffusers' ``train_dreambooth_lora_flux2.py``: as [klein] but for the text encoder, Mistral 3
    read through its processor under the pipeline's system message, and the guidance embedding of the
    guidance-distilled model."""

    label = "FLUX.2 [dev]"
    pipeline_class = Flux2Pipeline
    flags = Flux2KleinFamily.flags
    embedding_file_keys = {}
    kohya_layout = None
    hub_tag = "flux2"

    def template_tokens(self) -> int:
        # The system message and the chat template around an empty caption, as the pipeline formats a prompt.
        messages = flux2_format_input(prompts=[""], system_message=FLUX2_SYSTEM_MESSAGE)
        inputs = self.load_tokenizers()["tokenizer"].apply_chat_template(messages, add_generation_prompt=False,
                                                                         tokenize=True, return_dict=True)
        return len(inputs["input_ids"][0])

    def load_tokenizers(self) -> dict:
        """The Mistral processor (the pipeline's ``tokenizer``, or --tokenizer_name's), its tokenizer reading
        --max_sequence_length tokens."""
        if self._tokenizers is None:
            if self.config.tokenizer_name:  # a processor folder or hub id, as the pipeline's own
                processor = self.component_class("tokenizer").from_pretrained(self.config.tokenizer_name,
                                                                             revision=self.config.revision)
            else:
                processor = self.component_class("tokenizer").from_pretrained(subfolder="tokenizer", **self.source)
            processor.tokenizer.model_max_length = self.config.max_sequence_length
            self._tokenizers = {"tokenizer": processor}
        return self._tokenizers

    def encode_prompts(self, text_encoders: dict, prompts: list[str]) -> dict:
        encoder = getattr(text_encoders["text_encoder"], "module", text_encoders["text_encoder"])
        embeds = self.pipeline_class._get_mistral_3_small_prompt_embeds(
            encoder, self.load_tokenizers()["tokenizer"], list(prompts), device=device_of(encoder),
            max_sequence_length=self.config.max_sequence_length, hidden_states_layers=self.out_layers())
        return {"encoder_hidden_states": embeds}


# The families this script trains, keyed by the pipeline class that a base model's model_index.json names.
FAMILIES = {family.pipeline_class.__name__: family for family in (
    StableDiffusionFamily, StableDiffusionXLFamily, FluxFamily, StableDiffusion3Family, QwenImageFamily, ZImageFamily,
    Flux2KleinFamily, Flux2Family)}


def read_pipeline_class(source: str, revision: str | None = None) -> str:
    """The ``_class_name`` of a pipeline's ``model_index.json`` (a local folder or a hub id); nothing heavy loads."""
    try:
        config = DiffusionPipeline.load_config(source, revision=revision)
    except Exception as error:  # a missing folder, a folder without model_index.json, an unknown hub id, ...
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"--pretrained_model_name_or_path {source}: cannot read its model_index.json ({reason})"
                         ) from None
    return config.get("_class_name") or "an unnamed pipeline"


def model_family(args: argparse.Namespace):
    """The family object for the base model, from its ``model_index.json``; unsupported pipelines are refused."""
    config = FamilyConfig.from_args(args)
    pipeline_class = read_pipeline_class(config.pretrained_model_name_or_path, config.revision)
    if pipeline_class not in FAMILIES:
        raise InputError(f"--pretrained_model_name_or_path {config.pretrained_model_name_or_path}: {pipeline_class} "
                         f"is not supported (train_cat_lora.py trains {', '.join(FAMILIES)})")
    return FAMILIES[pipeline_class](config)


# ---------------------------------------------------------------------------------------------------------
# 5. Adapters: what a run trains on the frozen base. The pieces (LoRA layers through peft, pivotal tuning's new
#    token rows, CatVersion's learned key/value tokens), then the written Adapter interface that the loop, validation
#    and save call without knowing the kind.
# ---------------------------------------------------------------------------------------------------------


def adapted_components(family, train_text_encoder: bool, train_denoiser: bool = True) -> list[str]:
    """The pipeline components that carry trainable LoRA layers: the denoiser (unless textual inversion alone,
    --train_transformer_frac 0), and the text encoders if asked."""
    return ([family.denoiser] if train_denoiser else []) + (list(family.trainable_text_encoders)
                                                             if train_text_encoder else [])


class NewTokenEmbeddings:
    """Pivotal tuning (--train_text_encoder_ti): new tokens <s0><s1>... per --token_abstraction, added to every
    tokenizer and text encoder named in ``family.embedding_file_keys``, one trainable embedding row each.

    Only the new rows may change. The whole table is the trainable parameter (as in diffusers), so two guards:
    before each optimizer step the other rows' gradient is zeroed (gradient clipping and Adam's moments then see
    the new rows alone), and after it the other rows are copied back from the base model's, because decoupled
    weight decay shrinks every row that has a gradient, zero or not. The new rows train on optimizer steps
    1..ceil(--train_text_encoder_ti_frac x steps) and are frozen after (their gradient dropped): a function of the
    step only, so a resumed run freezes them at the same step. Registered for checkpointing (state_dict).
    """

    def __init__(self, abstractions: list[str], per_abstraction: int, seed: int = 0):
        # diffusers' numbering: abstraction i gets <s{i*n}> ... <s{i*n+n-1}>
        self.tokens = {abstraction: [f"<s{i * per_abstraction + j}>" for j in range(per_abstraction)]
                       for i, abstraction in enumerate(abstractions)}
        self.seed = seed
        self.tables, self.first_new_row, self.base_rows = {}, {}, {}
        self.train_steps = None

    @property
    def new_tokens(self) -> list[str]:
        return [token for tokens in self.tokens.values() for token in tokens]

    def expand(self, text: str) -> str:
        """y_T for the text encoders: every abstraction (a whole word, any case) replaced by its new tokens."""
        for abstraction, tokens in self.tokens.items():
            text = replace_trigger(text, abstraction, "".join(tokens))
        return text

    def add_to_tokenizers(self, family) -> None:
        """Add the new tokens to the family's (cached) tokenizers: enough for the caption checks, no model loaded."""
        tokenizers = family.load_tokenizers()
        for encoder_name in family.embedding_file_keys:
            tokenizer = tokenizers[family.tokenizer_of(encoder_name)]
            tokenizer.add_tokens([token for token in self.new_tokens if token not in tokenizer.get_vocab()])

    def new_ids(self, tokenizer) -> list[int]:
        return tokenizer.convert_tokens_to_ids(self.new_tokens)

    def add_to_text_encoders(self, family, text_encoders: dict) -> None:
        """Resize each embedding table to its tokenizer and draw the new rows as diffusers does: normal, scaled by
        the table's standard deviation (a private generator: the global random stream is left as it was)."""
        generator = torch.Generator().manual_seed(self.seed)
        tokenizers = family.load_tokenizers()
        for encoder_name in family.embedding_file_keys:
            tokenizer = tokenizers[family.tokenizer_of(encoder_name)]
            encoder = text_encoders[encoder_name]
            rows = encoder.get_input_embeddings().num_embeddings
            if self.new_ids(tokenizer) != list(range(rows, rows + len(self.new_tokens))):
                raise InputError(f"{encoder_name}: its tokenizer ({len(tokenizer)} tokens with the new ones) does not "
                                 f"match its embedding table ({rows} rows)")
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new rows are drawn below
            table = encoder.get_input_embeddings().weight
            with torch.no_grad():
                std = table[:rows].float().std()
                new = torch.randn(len(self.new_tokens), table.shape[1], generator=generator) * std
                table[rows:] = new.to(table.device, table.dtype)
            self.tables[encoder_name], self.first_new_row[encoder_name] = table, rows

    def make_trainable(self) -> list:
        """The embedding tables as trainable parameters; the base rows are kept to restore them after each step."""
        for name, table in self.tables.items():
            table.requires_grad_(True)
            self.base_rows[name] = table.detach()[:self.first_new_row[name]].clone()
        return list(self.tables.values())

    def schedule(self, max_train_steps: int, fraction: float) -> None:
        self.train_steps = math.ceil(fraction * max_train_steps)

    def trains_on(self, step: int) -> bool:
        """Whether optimizer step ``step`` (counted from 1) updates the new rows."""
        return step <= self.train_steps

    def before_optimizer_step(self, step: int) -> None:
        """Keep the gradient of the new rows only, and only while they train."""
        for name, table in self.tables.items():
            if table.grad is None:
                continue
            if self.trains_on(step):
                table.grad[:self.first_new_row[name]] = 0
            else:
                table.grad = None  # the optimizer skips a parameter without gradient: no step, no weight decay

    def restore_base_rows(self) -> None:
        with torch.no_grad():
            for name, table in self.tables.items():
                table[:self.first_new_row[name]] = self.base_rows[name].to(table.dtype)

    def rows(self, encoder_name: str) -> torch.Tensor:
        """The new rows of one text encoder, in token order (float32, on the CPU)."""
        return self.tables[encoder_name].detach()[self.first_new_row[encoder_name]:].float().cpu().contiguous()

    def state_dict(self) -> dict:
        return {name: self.rows(name) for name in self.tables}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, table in self.tables.items():
                table[self.first_new_row[name]:] = state[name].to(table.device, table.dtype)


def add_lora_adapters(family, models: dict, rank: int, lora_alpha: float, train_text_encoder: bool,
                      lora_dropout: float = 0.0, train_denoiser: bool = True) -> None:
    """Attach peft LoRA adapters; their up-projections start at zero, so step 0 is the base model."""
    for component in adapted_components(family, train_text_encoder, train_denoiser):
        layers = family.lora_layers(component, models[component])
        where = {} if layers is None else {"layers_to_transform": layers, "layers_pattern": "layers"}
        models[component].add_adapter(LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                 init_lora_weights="gaussian",
                                                 target_modules=family.lora_targets(component, models[component]),
                                                 **where))


# CatVersion (Zhao et al., arXiv 2311.14631): the concept as learned key/value tokens in the text encoder -------

CATVERSION_WEIGHT_NAME = "catversion.safetensors"
CATVERSION_CONFIG_NAME = "catversion_config.json"
CATVERSION_LAYERS = 3  # the last 3 self-attention layers (9-11 of SD 1.5's 12): the paper's "feature-dense" ones


class CatVersionAttention(torch.nn.Module):
    """A CLIP self-attention layer with ``tokens`` learned keys and values concatenated before the prompt's.

    The learned rows live in the projected key/value space (they skip k_proj and v_proj), are split across
    heads like the projected ones, and are the same for every prompt. Every query position attends to them:
    the causal (and padding) mask gains a zero column for them. The authors' code extends CLIP's additive
    mask with ones there, which adds +1 to each learned key's logit (weighting the learned tokens by e before
    the softmax normalizes); that reads as a slip from the multiplicative "1 = keep" convention, so we add
    nothing: the attention the paper describes.
    ``enabled = False`` runs the wrapped layer untouched: the base model, bit for bit.
    """

    def __init__(self, attention: CLIPAttention, tokens: int = 1, generator: torch.Generator | None = None):
        super().__init__()
        self.attention = attention
        # [0] keys, [1] values; N(0, 1) as the authors' torch.randn
        self.residual = torch.nn.Parameter(torch.randn(2, tokens, attention.embed_dim, generator=generator))
        self.enabled = True

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if not self.enabled:
            return self.attention(hidden_states, attention_mask, **kwargs)
        attention = self.attention
        batch, length, _ = hidden_states.shape
        residual = self.residual.to(hidden_states.dtype).unsqueeze(1).expand(-1, batch, -1, -1)

        def heads(states):  # (batch, length, width) -> (batch, heads, length, head width)
            return states.reshape(batch, -1, attention.num_heads, attention.head_dim).transpose(1, 2)

        query = heads(attention.q_proj(hidden_states))
        key = torch.cat([heads(residual[0]), heads(attention.k_proj(hidden_states))], dim=2)
        value = torch.cat([heads(residual[1]), heads(attention.v_proj(hidden_states))], dim=2)
        mask = additive_mask(attention_mask, kwargs.get("is_causal", True), length, query)
        mask = F.pad(mask, (residual.shape[2], 0), value=0.0)  # every query attends to every learned token
        weights = torch.softmax(query @ key.transpose(-1, -2) * attention.scale + mask, dim=-1, dtype=torch.float32)
        weights = F.dropout(weights.to(query.dtype), p=attention.dropout, training=attention.training)
        output = (weights @ value).transpose(1, 2).reshape(batch, length, -1)
        return attention.out_proj(output), None


def additive_mask(attention_mask, is_causal: bool, length: int, like: torch.Tensor) -> torch.Tensor:
    """transformers' mask for a CLIP attention layer as an additive float mask: None under SDPA (causal when
    ``is_causal``), a boolean mask (True = attend), or already additive (eager)."""
    if attention_mask is None:
        attention_mask = torch.ones(length, length, dtype=torch.bool, device=like.device)
        attention_mask = attention_mask.tril() if is_causal else attention_mask
    if attention_mask.dtype == torch.bool:
        additive = torch.zeros(attention_mask.shape, dtype=like.dtype, device=like.device)
        attention_mask = additive.masked_fill(~attention_mask, torch.finfo(like.dtype).min)
    return attention_mask.to(like.dtype)


class CatVersion:
    """The CatVersion adapter of one CLIP text encoder: its wrapped layers, their learned tokens, save and load.

    Registered for checkpointing (``state_dict``/``load_state_dict`` hold the learned tokens alone), so a
    resumed run restores them exactly.
    """

    def __init__(self, layers: dict[int, CatVersionAttention]):
        self.layers = layers  # index of the attention layer in the encoder -> its wrapper

    @classmethod
    def attach(cls, text_encoder, tokens: int = 1, num_layers: int = CATVERSION_LAYERS, seed: int = 0) -> "CatVersion":
        """Wrap the last ``num_layers`` self-attention layers of ``text_encoder``, learned tokens from N(0, 1)."""
        text_encoder = getattr(text_encoder, "module", text_encoder)
        sites = [(parent, name, child) for parent in text_encoder.modules()
                 for name, child in parent.named_children() if isinstance(child, CLIPAttention)]
        generator = torch.Generator().manual_seed(seed)
        layers = {}
        for index, (parent, name, attention) in list(enumerate(sites))[-num_layers:]:
            wrapper = CatVersionAttention(attention, tokens, generator).to(attention.q_proj.weight.device)
            setattr(parent, name, wrapper)
            layers[index] = wrapper
        return cls(layers)

    def parameters(self) -> list:
        return [layer.residual for layer in self.layers.values()]

    def state_dict(self) -> dict:
        """``key.<layer>`` and ``value.<layer>``, each (tokens, width), float32."""
        return {f"{kind}.{index}": layer.residual.detach()[row].float().contiguous().cpu()
                for index, layer in self.layers.items() for row, kind in enumerate(("key", "value"))}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for index, layer in self.layers.items():
                for row, kind in enumerate(("key", "value")):
                    layer.residual[row].copy_(state[f"{kind}.{index}"])

    def save(self, folder: Path, settings: dict) -> list[Path]:
        """``catversion.safetensors`` and ``catversion_config.json`` (tokens, layers, and ``settings``)."""
        tokens = next(iter(self.layers.values())).residual.shape[1]
        config = {"adapter": "catversion", "tokens": tokens, "layers": sorted(self.layers), **settings}
        save_file(self.state_dict(), str(folder / CATVERSION_WEIGHT_NAME))
        (folder / CATVERSION_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return [folder / CATVERSION_WEIGHT_NAME, folder / CATVERSION_CONFIG_NAME]


def load_catversion(text_encoder, folder) -> CatVersion:
    """Apply the CatVersion adapter saved in ``folder`` to ``text_encoder`` (adapter on; ``adapters_disabled``
    turns it off). InputError if the folder holds none or it does not fit this text encoder."""
    folder = Path(folder)
    config_path, weights_path = folder / CATVERSION_CONFIG_NAME, folder / CATVERSION_WEIGHT_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise InputError(f"{folder}: no CatVersion adapter ({CATVERSION_WEIGHT_NAME} and {CATVERSION_CONFIG_NAME})")
    config, state = json.loads(config_path.read_text(encoding="utf-8")), load_file(weights_path)
    width = text_encoder.config.hidden_size
    attention_layers = sum(isinstance(m, CLIPAttention) for m in text_encoder.modules())
    expected = {f"{kind}.{i}" for i in config["layers"] for kind in ("key", "value")}
    if (set(state) != expected or any(v.shape != (config["tokens"], width) for v in state.values())
            or max(config["layers"]) != attention_layers - 1):
        raise InputError(f"{folder}: its CatVersion tokens (layers {config['layers']}, width "
                         f"{next(iter(state.values())).shape[-1]}) do not fit this text encoder "
                         f"({attention_layers} layers, width {width})")
    catversion = CatVersion.attach(text_encoder, config["tokens"], len(config["layers"]))
    catversion.load_state_dict(state)
    return catversion


def unload_catversion(text_encoder) -> None:
    """Put the original attention layers back (the text encoder becomes the base one again)."""
    text_encoder = getattr(text_encoder, "module", text_encoder)
    for parent in list(text_encoder.modules()):
        for name, child in parent.named_children():
            if isinstance(child, CatVersionAttention):
                setattr(parent, name, child.attention)


def catversion_layers(model) -> list[CatVersionAttention]:
    return [m for m in getattr(model, "module", model).modules() if isinstance(m, CatVersionAttention)]


# The Adapter interface: each kind one class; the loop, validation and save call only the interface ----------


class CardLines(NamedTuple):
    """What an adapter adds to the model card: settings bullets, lines of the usage code, notes after it."""

    settings: tuple | list = ()
    code: tuple | list = ()
    notes: tuple | list = ()


class Adapter(ABC):
    """What a kind of adapter must define. ``make_adapters`` builds a run's adapters once, from the flags; ``main``,
    the loop, validation and save call them through this interface and never ask which kind they hold. A kind that
    leaves out a name of ``REQUIRED`` or an abstract method fails when its class statement runs.

      name          the kind, in messages and the model card
      components    (family) -> the pipeline components that carry its trainable parameters
      attach        (family, models): add its trainable parameters (float32) to the loaded, frozen base models
      save          (output_dir, accelerator, family, models, facts) -> the files written after training
      card          (output_dir, family) -> CardLines
      switches      (model) -> (off, on) pairs that turn this kind's layers in ``model`` off for the frozen pass and
                    back on (class method: ``adapters_disabled`` asks every kind of every model)
    Optional, with no-op defaults: ``check`` (family), ``prepare_examples`` (y_T as the text encoders read it),
    ``schedule`` (the step count), ``checkpoint_state`` (objects accelerate saves with every checkpoint),
    ``save_checkpoint``/``load_checkpoint`` (files of its own in a checkpoint folder), ``before_optimizer_step``/
    ``after_optimizer_step`` and ``validation_prompts`` (the grid's two prompts, and whether its bottom row runs
    with the adapter off). ``rare_trigger``: whether the trigger is a word the user picked (advice on rare words).
    ``fsdp_refusal``: why this kind cannot train sharded with FSDP (None: it can).

    ``save`` and ``save_checkpoint`` run on every process (under FSDP gathering the weights takes all of them);
    only the main process writes.
    """

    REQUIRED = ("name",)
    rare_trigger = True
    fsdp_refusal = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [name for name in cls.REQUIRED if not hasattr(cls, name)]
        missing += [name for name in ("components", "attach", "save", "card", "switches")
                    if getattr(getattr(cls, name), "__isabstractmethod__", False)]
        if missing:
            raise TypeError(f"adapter kind {cls.__name__} does not define {', '.join(missing)} (see Adapter)")

    @abstractmethod
    def components(self, family) -> list[str]:
        """The pipeline components that carry this adapter's trainable parameters."""

    @abstractmethod
    def attach(self, family, models: dict) -> None:
        """Add the trainable parameters to the loaded base models."""

    @abstractmethod
    def save(self, output_dir: Path, accelerator, family, models: dict, facts: dict) -> list[Path]:
        """Write the trained adapter; ``facts``: base_model, class_words, cat_alpha, steps."""

    @abstractmethod
    def card(self, output_dir: Path, family) -> CardLines:
        """The model card's lines about this adapter."""

    @classmethod
    @abstractmethod
    def switches(cls, model) -> list[tuple]:
        """(off, on) callables for this kind's layers in ``model`` (none: [])."""

    def check(self, family) -> None:
        pass

    def prepare_examples(self, family, examples: list[Example], cat_alpha) -> list[Example]:
        return examples

    def schedule(self, max_train_steps: int) -> None:
        pass

    def checkpoint_state(self) -> list:
        return []

    def save_checkpoint(self, folder: Path, accelerator, family, models: dict) -> None:
        pass

    def load_checkpoint(self, folder: Path, accelerator, family, models: dict) -> None:
        pass

    def before_optimizer_step(self, step: int) -> None:
        pass

    def after_optimizer_step(self, step: int) -> None:
        pass

    def validation_prompts(self, top: str, bottom: str, bottom_off: bool) -> tuple[str, str, bool]:
        return top, bottom, bottom_off


@dataclass(frozen=True)
class LoraOptions:
    """The LoRA layers' options (--rank, --lora_alpha, --lora_dropout, which components, kohya export)."""

    rank: int = 4
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    train_text_encoder: bool = False
    train_denoiser: bool = True
    output_kohya_format: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LoraOptions":
        return cls(args.rank, args.lora_alpha, args.lora_dropout, args.train_text_encoder,
                   args.train_transformer_frac > 0, args.output_kohya_format)


class LoraAdapter(Adapter):
    """peft LoRA layers on the denoiser (and, with --train_text_encoder, the family's trainable text encoders),
    saved as the pipeline's ``pytorch_lora_weights.safetensors`` (and kohya's layout where asked)."""

    name = "LoRA"

    def __init__(self, options: LoraOptions):
        self.options = options

    def components(self, family) -> list[str]:
        return adapted_components(family, self.options.train_text_encoder, self.options.train_denoiser)

    def attach(self, family, models: dict) -> None:
        o = self.options
        add_lora_adapters(family, models, o.rank, o.lora_alpha, o.train_text_encoder, o.lora_dropout,
                          train_denoiser=o.train_denoiser)

    @classmethod
    def switches(cls, model) -> list[tuple]:
        # The layers' own flag, nothing else: peft's enable_adapters(False) also sets requires_grad on the LoRA
        # weights, which under FSDP are views of sharded storage (peft #1442, #2977), and would hand the optimizer
        # frozen parameters should a pass end without its "on".
        def setter(layer, disabled):
            return lambda: setattr(layer, "_disable_adapters", disabled)

        return [(setter(layer, True), setter(layer, False)) for layer in getattr(model, "module", model).modules()
                if isinstance(layer, BaseTunerLayer)]

    def peft_states(self, accelerator, family, models: dict) -> dict:
        """Every process calls it: under FSDP the weights are gathered (the main process's are whole)."""
        return peft_state_dicts(accelerator, family, models, self.options.train_text_encoder,
                                self.options.train_denoiser)

    def save_checkpoint(self, folder: Path, accelerator, family, models: dict) -> None:
        peft_states = self.peft_states(accelerator, family, models)
        if accelerator.is_main_process:
            family.pipeline_class.save_lora_weights(folder, **lora_save_arguments(accelerator, family, models,
                                                                                  peft_states))

    def load_checkpoint(self, folder: Path, accelerator, family, models: dict) -> None:
        if is_sharded(accelerator):
            return  # accelerate's load_state has put the sharded weights back, the LoRA layers among them
        components = self.components(family)
        load_lora_checkpoint(Path(folder), family, models, components)
        if accelerator.mixed_precision in ("fp16", "bf16"):
            cast_training_params([accelerator.unwrap_model(models[name]) for name in components])

    def save(self, output_dir: Path, accelerator, family, models: dict, facts: dict) -> list[Path]:
        peft_states = self.peft_states(accelerator, family, models)
        if not accelerator.is_main_process:
            return []
        family.pipeline_class.save_lora_weights(output_dir, **lora_save_arguments(accelerator, family, models,
                                                                                  peft_states))
        written = [output_dir / "pytorch_lora_weights.safetensors"]
        if self.options.output_kohya_format:
            denoiser_config = accelerator.unwrap_model(models[family.denoiser]).config
            written.append(save_kohya_weights(output_dir, peft_states, self.options.lora_alpha, family.kohya_layout,
                                              denoiser_config))
        return written

    def card(self, output_dir: Path, family) -> CardLines:
        o = self.options
        return CardLines([f"- LoRA rank {o.rank}, alpha {o.lora_alpha}; text encoder trained: {o.train_text_encoder}"],
                         ['pipe.load_lora_weights("path/to/this/folder")'])


class PivotalTokens(Adapter):
    """Pivotal tuning (--train_text_encoder_ti): new tokens per --token_abstraction with trainable embedding rows
    (``NewTokenEmbeddings``), usually beside a LoRA. y_T is written with the new tokens; y holds none of them, so the
    frozen pass needs nothing turned off (checked before training)."""

    name = "pivotal tokens"
    rare_trigger = False  # the abstractions are placeholders that the new tokens replace, not words training rebinds
    fsdp_refusal = ("FSDP shards the denoiser only, and pivotal tuning trains rows of the text encoders' embedding "
                    "tables (SD 1.x/2.x and SDXL, which fit one GPU: run several processes without FSDP)")

    def __init__(self, new_tokens: NewTokenEmbeddings, train_fraction: float):
        self.new_tokens, self.train_fraction = new_tokens, train_fraction

    def components(self, family) -> list[str]:
        return list(family.embedding_file_keys)

    def prepare_examples(self, family, examples: list[Example], cat_alpha) -> list[Example]:
        self.new_tokens.add_to_tokenizers(family)
        examples = pivotal_examples(self.new_tokens, examples)
        if cat_alpha != 0:
            check_no_new_tokens_in_y(family, self.new_tokens, examples)
        return examples

    def attach(self, family, models: dict) -> None:
        # After the LoRA layers: peft freezes what it does not add, and the embedding tables must stay trainable.
        self.new_tokens.add_to_text_encoders(family, models)
        self.new_tokens.make_trainable()

    @classmethod
    def switches(cls, model) -> list[tuple]:
        return []

    def schedule(self, max_train_steps: int) -> None:
        self.new_tokens.schedule(max_train_steps, self.train_fraction)

    def checkpoint_state(self) -> list:
        return [self.new_tokens]  # the new rows, saved and restored with every checkpoint

    def before_optimizer_step(self, step: int) -> None:
        self.new_tokens.before_optimizer_step(step)

    def after_optimizer_step(self, step: int) -> None:
        self.new_tokens.restore_base_rows()

    def validation_prompts(self, top: str, bottom: str, bottom_off: bool) -> tuple[str, str, bool]:
        return self.new_tokens.expand(top), bottom, bottom_off

    def save(self, output_dir: Path, accelerator, family, models: dict, facts: dict) -> list[Path]:
        return save_embeddings(output_dir, family, self.new_tokens) if accelerator.is_main_process else []

    def card(self, output_dir: Path, family) -> CardLines:
        new_tokens = self.new_tokens
        diffusers_name, webui_names = embedding_file_names(output_dir, list(new_tokens.tokens))
        notes = ["", "Embeddings (pivotal tuning): `" + diffusers_name + ".safetensors` is diffusers' format (keys "
                 + ", ".join(f"`{key}`" for key in family.embedding_file_keys.values()) + "), loaded as above; "
                 "prompt with the new tokens in place of the abstraction, e.g. "
                 + ", ".join(f"`{a}` -> `{''.join(t)}`" for a, t in new_tokens.tokens.items()) + ".",
                 "For AUTOMATIC1111 (`embeddings/`) and ComfyUI (`models/embeddings/`): copy "
                 + ", ".join(f"`embeddings/{n}.safetensors`" for n in webui_names.values())
                 + " and write its file name in the prompt (ComfyUI: `embedding:<name>`): "
                 + ", ".join(f"`{a}` -> `{n}`" for a, n in webui_names.items()) + "."]
        return CardLines([], embedding_card_lines(output_dir, family, new_tokens), notes)


class CatVersionAdapter(Adapter):
    """CatVersion (--adapter catversion): learned key/value tokens in the text encoder's last self-attention
    layers (``CatVersion``). Its trigger is the class word, so every prompt changes: the validation grid's bottom
    row is the same prompt with the adapter off."""

    name = "CatVersion"
    rare_trigger = False  # the trigger is the class word
    fsdp_refusal = ("FSDP shards the denoiser only, and CatVersion trains inside the CLIP text encoder (SD 1.x/2.x, "
                    "which fit one GPU: run several processes without FSDP)")

    def __init__(self, tokens: int, seed: int):
        self.tokens, self.seed, self.catversion = tokens, seed, None

    def check(self, family) -> None:
        if not family.supports_catversion:
            raise InputError(f"--adapter catversion is supported for SD 1.x/2.x only, not {family.label}: the paper "
                             "defines and runs it on SD 1.5's single CLIP text encoder")

    def components(self, family) -> list[str]:
        return list(family.text_encoders)

    def attach(self, family, models: dict) -> None:
        self.catversion = CatVersion.attach(models[family.text_encoders[0]], self.tokens, seed=self.seed)

    @classmethod
    def switches(cls, model) -> list[tuple]:
        def setter(layer, enabled):
            return lambda: setattr(layer, "enabled", enabled)

        return [(setter(layer, False), setter(layer, True)) for layer in catversion_layers(model)]

    def checkpoint_state(self) -> list:
        return [self.catversion]  # its learned tokens, saved and restored with every checkpoint

    def validation_prompts(self, top: str, bottom: str, bottom_off: bool) -> tuple[str, str, bool]:
        return top, top, True

    def save(self, output_dir: Path, accelerator, family, models: dict, facts: dict) -> list[Path]:
        return self.catversion.save(output_dir, facts) if accelerator.is_main_process else []

    def card(self, output_dir: Path, family) -> CardLines:
        return CardLines([f"- Adapter: CatVersion, {self.tokens} learned key/value token(s) in the text encoder's "
                          f"last {CATVERSION_LAYERS} self-attention layers ({CATVERSION_WEIGHT_NAME})"],
                         ["from train_cat_lora import load_catversion", "",
                          'load_catversion(pipe.text_encoder, "path/to/this/folder")  # on; adapters_disabled(...) '
                          "turns it off"])


ADAPTER_KINDS = (LoraAdapter, PivotalTokens, CatVersionAdapter)


def make_adapters(args: argparse.Namespace, family, seed: int) -> list[Adapter]:
    """The run's adapters, from --adapter and --train_text_encoder_ti (the one place that reads them): CatVersion
    alone, or LoRA layers, or pivotal tokens with or without LoRA layers (textual inversion alone:
    --train_transformer_frac 0). LoRA comes first: peft freezes the parameters it does not add."""
    if args.adapter == "catversion":
        return [CatVersionAdapter(args.catversion_tokens, seed)]
    adapters = []
    lora = LoraAdapter(LoraOptions.from_args(args))
    if lora.components(family):
        adapters.append(lora)
    if args.train_text_encoder_ti:
        adapters.append(PivotalTokens(NewTokenEmbeddings(token_abstractions(args.token_abstraction),
                                                         args.num_new_tokens_per_abstraction, seed),
                                      args.train_text_encoder_ti_frac))
    return adapters


def trained_components(family, adapters: list[Adapter]) -> list[str]:
    """The components with trainable parameters, each once, in the adapters' order."""
    return list(dict.fromkeys(name for adapter in adapters for name in adapter.components(family)))


class adapters_disabled:
    """Context manager: run the given models as the frozen base model: every adapter kind's layers in them off
    (peft's LoRA layers then call only their base layer, so the frozen pass computes no low-rank branch at all; a
    CatVersion layer calls the original attention layer), and back on after."""

    def __init__(self, *models):
        self.switches = [switch for model in models for kind in ADAPTER_KINDS for switch in kind.switches(model)]

    def __enter__(self):
        for off, _ in self.switches:
            off()

    def __exit__(self, *exc):
        for _, on in self.switches:
            on()


def has_adapters(model) -> bool:
    return any(kind.switches(model) for kind in ADAPTER_KINDS)


# ---------------------------------------------------------------------------------------------------------
# 6. Prompt conditioning (adapted and frozen) and the latent cache
# ---------------------------------------------------------------------------------------------------------


class PromptEncoder:
    """Prompts -> conditioning through the family's text encoders (adapted, when they carry LoRA layers)."""

    def __init__(self, family, text_encoders: dict):
        self.family, self.text_encoders = family, text_encoders

    @property
    def adapted(self) -> bool:
        return any(has_adapters(model) for model in self.text_encoders.values())

    def __call__(self, prompts: list[str]) -> dict:
        return self.family.encode_prompts(self.text_encoders, prompts)

    def frozen(self, prompts: list[str]) -> dict:
        """The base text encoders' conditioning (adapters disabled, no gradient)."""
        with torch.no_grad(), adapters_disabled(*self.text_encoders.values()):
            return self(prompts)


class CachedPromptEncoder:
    """--pre_compute_text_embeddings: every prompt of the run encoded once by the frozen text encoders.

    Called like ``PromptEncoder``; it has no adapters, so the frozen pass reuses the same conditioning and the
    text encoders can leave memory after encoding.
    """

    adapted = False

    def __init__(self, encoder: PromptEncoder, prompts):
        self.conditioning = {}
        with torch.no_grad():
            for prompt in sorted(set(prompts)):
                self.conditioning[prompt] = {name: value[0] for name, value in encoder([prompt]).items()}

    def __call__(self, prompts: list[str]) -> dict:
        rows = [self.conditioning[prompt] for prompt in prompts]
        return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}

    frozen = __call__


def encode_latent_cache(family, vae, examples: list[Example], resolution: int, batch_size: int,
                        interpolation: str = "lanczos") -> dict:
    """--cache_latents: VAE posterior parameters, original size and crop of every (center-cropped) image."""
    cache = {}
    unique = list({example.name: example for example in examples}.values())
    with torch.no_grad():
        for start in tqdm(range(0, len(unique), batch_size), desc="Caching latents"):
            chunk = unique[start:start + batch_size]
            augmented = [augment(open_rgb_image(e.image, e.name), resolution, True, False, None, interpolation)
                         for e in chunk]
            pixels = torch.stack([pixels for pixels, _, _ in augmented]).to(vae.device, dtype=vae.dtype)
            parameters = family.encode_pixels(vae, pixels).parameters.cpu()
            cache.update({e.name: (p, size, crop) for e, p, (_, size, crop) in zip(chunk, parameters, augmented)})
    return cache


# ---------------------------------------------------------------------------------------------------------
# 7. Loss
# ---------------------------------------------------------------------------------------------------------


def cat_loss(adapted_pred, frozen_pred):
    """The CAT term of Eq. 3 (before its weight alpha): ``||eps_frozen(z_t, t, y) - eps_lora(z_t, t, y)||^2``.

    ``adapted_pred`` is the denoiser's prediction with the adapter on the trigger-less prompt y (it carries
    the gradient); ``frozen_pred`` the base model's prediction on the same noisy latents, timesteps and y,
    computed without gradient. Mean squared error over all elements, the same reduction as the diffusion term,
    so alpha weighs the two on the same scale. The prediction may be a noise, a velocity or a flow: the term
    is the same.
    """
    return F.mse_loss(adapted_pred.float(), frozen_pred.detach().float(), reduction="mean")


def relative_drift(adapted_pred, frozen_pred):
    """Per sample: the CAT term relative to the mean square of the base model's own prediction on y.

    The unit of --cat_drift_budget: 0.01 means the adapter moved the trigger-less prediction by 1% of its power,
    a number that means the same at every timestep and for every family (noise, velocity or flow).
    """
    dims = list(range(1, adapted_pred.ndim))
    error = (adapted_pred.detach().float() - frozen_pred.detach().float()).pow(2).mean(dim=dims)
    return error / frozen_pred.detach().float().pow(2).mean(dim=dims).clamp(min=1e-12)


def diffusion_loss(pred, target, loss_weights=None):
    """MSE to the target; with per-sample ``loss_weights`` (Min-SNR, flow-matching weighting) a weighted mean."""
    if loss_weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_sample * loss_weights.float().reshape(-1)).mean()


def take_rows(tensors: dict, start: int, stop: int | None = None) -> dict:
    """Rows ``start:stop`` of every batch-first tensor in ``tensors`` (None entries stay None)."""
    return {name: None if value is None else value[start:stop] for name, value in tensors.items()}


def join_rows(first: dict, second: dict) -> dict:
    """Two batches of the same tensors, stacked (for one denoiser call on both)."""
    return {name: None if value is None else torch.cat([value, second[name]]) for name, value in first.items()}


def frozen_prediction(family, denoiser, z: dict, frozen_cond: dict):
    """eps_frozen(z_t, t, y): the base denoiser (every adapter disabled), without gradient.

    ``frozen_cond`` is the base text encoders' conditioning of y (``PromptEncoder.frozen``; when the text
    encoders carry no adapter, the conditioning the adapted pass used is already the frozen one).
    """
    with torch.no_grad(), adapters_disabled(denoiser):
        return family.predict(denoiser, z, {name: value.detach() for name, value in frozen_cond.items()})


# Salt for the generators of --cat_prompts_latents noise: each sample's own stream, apart from its z_t's.
BANK_NOISE_SALT = 0x5EED_BA4C


def bank_noise_latents(family, batch, instance: dict, noise_scheduler) -> dict:
    """--cat_prompts_latents noise: the subject rows' conditioning with z' = pure noise at the schedule's last
    timestep (``objective.pure_noise``), drawn from each sample's own seed (salted): the same in any batch, process
    or resumed run."""
    n = batch["num_instance"]
    generators = [torch.Generator(device=instance["noisy"].device).manual_seed(int(seed) ^ BANK_NOISE_SALT)
                  for seed in batch["noise_seeds"][:n]]
    return {**instance, **family.objective.pure_noise(instance["noisy"], generators, noise_scheduler)}


def weighted_cat_term(adapted_pred, frozen_pred, weight: float, row_weights=None):
    """``weight * cat_loss(adapted_pred, frozen_pred)``; with ``row_weights`` (one per row, --cat_alpha auto: each
    row's concept multiplier) the same MSE with each row's part weighted by its own."""
    if row_weights is None:
        return weight * cat_loss(adapted_pred, frozen_pred)
    per_row = F.mse_loss(adapted_pred.float(), frozen_pred.detach().float(), reduction="none")
    per_row = per_row.mean(dim=list(range(1, per_row.ndim)))
    return weight * (row_weights.to(per_row.device) * per_row).mean()


@dataclass(frozen=True)
class StepConfig:
    """The options of one training step."""

    cat_alpha: float = 1.0
    cat_mode: str = "lean"  # "lean" or "batched": same gradients, see training_step
    prior_loss_weight: float = 0.0
    weight_dtype: torch.dtype = torch.float32
    cat_swap_alpha: float = 0.0  # beta of the swapped-trigger term (runs with the CAT term only)
    cat_bank_alpha: float = 0.0  # weight of the --cat_prompts term (runs with the CAT term only)
    cat_bank_latents: str = "sample"  # --cat_prompts_latents: z' is the sample's z_t, pure noise at the last t, or
    # the base model's image of y' at its own t' ("base": the batch's "bank")

    @classmethod
    def from_args(cls, args: argparse.Namespace, weight_dtype) -> "StepConfig":
        # With --cat_alpha auto the multipliers come as per-row weights: the config's alpha is then 1.
        cat_alpha = 1.0 if args.cat_alpha == "auto" else args.cat_alpha
        return cls(cat_alpha, args.cat_mode, args.prior_loss_weight if args.with_prior_preservation else 0.0,
                   weight_dtype, args.cat_swap_alpha, args.cat_prompts_alpha if args.cat_prompts else 0.0,
                   args.cat_prompts_latents)


def training_step(batch, family, models: dict, encode_prompts, config: StepConfig, backward, cat_weights=None
                  ) -> dict:
    """Compute one batch's losses and ``backward`` them; return the detached parts for logging.

    Rows ``[:num_instance]`` of the batch are subject images with captions y_T, the rest class images (prior
    preservation). The CAT term uses the subject rows with their trigger-less prompts y, on the same noisy
    latents, timesteps (and any other conditioning of the sample) as the diffusion term (Eq. 3). ``cat_mode``
    trades memory for speed, with the same gradients: ``lean`` backwards the diffusion term before the CAT
    passes run, and each adapted CAT pass (y, then y_swap and y' when they run) before the next, so no two passes'
    activations are alive together; ``batched`` runs all adapted passes (y_T, y, ...) as one denoiser call and one
    backward.

    ``cat_weights`` (one per subject row, --cat_alpha auto) weight each row's CAT term, on top of
    ``config.cat_alpha``. The returned ``drift`` is each subject row's ``relative_drift`` (empty without CAT).

    With ``config.cat_swap_alpha`` (beta) and the batch's ``swap_prompts`` (each subject row's caption with its
    trigger replaced by another concept's), the CAT passes also run the adapter on those prompts, and
    ``beta * ||eps_frozen(z_t, t, y) - eps_lora(z_t, t, y_swap)||^2`` joins the loss: another concept's trigger
    must leave this subject's prediction where the base model has it, as having no trigger does.

    With ``config.cat_bank_alpha`` and the batch's ``bank_prompts`` (a trigger-less prompt y' per subject row, drawn
    from --cat_prompts), ``cat_bank_alpha * ||eps_frozen(z_t, t, y') - eps_lora(z_t, t, y')||^2`` joins the loss, on
    the row's own z_t and t (``config.cat_bank_latents`` "noise": on pure noise at the schedule's last timestep
    instead, ``bank_noise_latents``; "base": on the base model's image of y' from the batch's ``bank``, noised at
    its own t'): y' runs in the adapted CAT passes and in the frozen one (one denoiser call
    each). With ``cat_weights`` each row's bank term is weighted by its multiplier too, and ``drift`` is the mean of
    the row's drift on y and on y'.
    """
    denoiser = models[family.denoiser]
    z = family.noisy_latents(batch, models["vae"], models["noise_scheduler"], config.weight_dtype)
    n, batch_size = batch["num_instance"], z["noisy"].shape[0]
    use_cat = config.cat_alpha > 0
    use_swap = use_cat and config.cat_swap_alpha > 0 and bool(batch.get("swap_prompts"))
    use_bank = use_cat and config.cat_bank_alpha > 0 and bool(batch.get("bank_prompts"))
    instance, classes = take_rows(z, 0, n), take_rows(z, n)
    # The adapted CAT passes: y, then (with the swap term) y_swap, then (with a bank) y', on the subject rows' z_t, t.
    bank_prompts = batch["bank_prompts"] if use_bank else []
    cat_prompts = batch["cat_prompts"] + (batch["swap_prompts"] if use_swap else []) + bank_prompts
    bank_z = instance
    if use_bank and config.cat_bank_latents == "noise":
        bank_z = bank_noise_latents(family, batch, instance, models["noise_scheduler"])
    elif use_bank and config.cat_bank_latents == "base":  # the base model's image of y', noised at its own t'
        bank_z = {**instance, **family.noisy_latents(batch["bank"], models["vae"], models["noise_scheduler"],
                                                     config.weight_dtype)}
    cat_z = join_rows(instance, instance) if use_swap else instance
    if use_bank:
        cat_z = join_rows(cat_z, bank_z)
    if use_cat and config.cat_mode == "batched":  # y_T and y through the text encoders in one call too
        both_cond = encode_prompts(batch["prompts"] + cat_prompts)
        preds = family.predict(denoiser, join_rows(z, cat_z), both_cond)
        cat_cond = take_rows(both_cond, batch_size)
        model_pred, adapted_pred = preds[:batch_size], preds[batch_size:]
    else:
        cond = encode_prompts(batch["prompts"])
        model_pred = family.predict(denoiser, z, cond)

    loss_diffusion = diffusion_loss(model_pred[:n], instance["target"], instance["loss_weights"])
    loss_prior = torch.zeros((), device=model_pred.device)
    if n < batch_size:
        loss_prior = diffusion_loss(model_pred[n:], classes["target"], classes["loss_weights"])
    loss = loss_diffusion + config.prior_loss_weight * loss_prior
    loss_cat = loss_swap = loss_bank = weighted_bank = torch.zeros((), device=model_pred.device)
    lean = use_cat and config.cat_mode == "lean"
    if use_cat:
        if lean:  # y's adapted pass alone; y_swap's and y''s follow, each backwarded before the next one runs
            backward(loss)  # frees the diffusion graph before the CAT passes build theirs
            cat_cond = encode_prompts(batch["cat_prompts"])
            adapted_pred = family.predict(denoiser, instance, cat_cond)
            bank_cond = encode_prompts(bank_prompts) if use_bank else None  # for y''s frozen pass and its adapted one
            loss = torch.zeros((), device=model_pred.device)
        else:
            parts = adapted_pred.split(n)  # y, then y_swap and y' when they run
            adapted_pred, swap_pred, bank_pred = parts[0], parts[1] if use_swap else None, parts[-1]
        # The frozen pass: y (and the bank's y') on the same z_t, one denoiser call.
        if encode_prompts.adapted:
            frozen_cond = encode_prompts.frozen(batch["cat_prompts"] + bank_prompts)
        else:  # the conditioning of y (and y') the adapted pass used is the base model's
            frozen_cond = take_rows(cat_cond, 0, n)
            if use_bank:
                frozen_cond = join_rows(frozen_cond, bank_cond if lean else take_rows(cat_cond, len(cat_prompts) - n))
        frozen_pred = frozen_prediction(family, denoiser, join_rows(instance, bank_z) if use_bank else instance,
                                        frozen_cond)
        frozen_pred, bank_frozen = frozen_pred[:n], frozen_pred[n:]
        loss_cat = cat_loss(adapted_pred, frozen_pred)
        weighted_cat = weighted_cat_term(adapted_pred, frozen_pred, config.cat_alpha, cat_weights)
        loss = loss + weighted_cat
        drift = relative_drift(adapted_pred, frozen_pred)
        if lean and (use_swap or use_bank):
            backward(loss)  # y's graph goes before y_swap's or y''s is built: one pass's activations at a time
            loss = torch.zeros((), device=model_pred.device)
        if use_swap:
            if lean:
                swap_pred = family.predict(denoiser, instance, encode_prompts(batch["swap_prompts"]))
            loss_swap = cat_loss(swap_pred, frozen_pred)
            loss = loss + config.cat_swap_alpha * loss_swap
            if lean and use_bank:
                backward(loss)
                loss = torch.zeros((), device=model_pred.device)
        if use_bank:  # --cat_prompts: ||eps_frozen(z_t, t, y') - eps_lora(z_t, t, y')||^2; the budget counts its drift
            if lean:
                bank_pred = family.predict(denoiser, bank_z, bank_cond)
            loss_bank = cat_loss(bank_pred, bank_frozen)
            weighted_bank = weighted_cat_term(bank_pred, bank_frozen, config.cat_bank_alpha, cat_weights)
            loss = loss + weighted_bank
            drift = (drift + relative_drift(bank_pred, bank_frozen)) / 2
    else:
        weighted_cat, drift = loss_cat, torch.zeros(0, device=model_pred.device)
    backward(loss)
    total = (loss_diffusion + config.prior_loss_weight * loss_prior + weighted_cat
             + config.cat_swap_alpha * loss_swap + weighted_bank)
    losses = {"loss": total.detach(), "diffusion": loss_diffusion.detach(), "prior": loss_prior.detach(),
              "cat": loss_cat.detach(), "drift": drift}
    if batch.get("swap_prompts"):  # logged on every step of a swap run (0 on steps without the CAT passes)
        losses["swap"] = loss_swap.detach()
    if batch.get("bank_prompts"):  # likewise for a bank run
        losses["bank"] = loss_bank.detach()
    return losses


# ---------------------------------------------------------------------------------------------------------
# 8. Training state: the accelerator, the optimizer, the drift budget (--cat_alpha auto), checkpoints
# ---------------------------------------------------------------------------------------------------------


def cat_runs_on(step: int, cat_every: int) -> bool:
    """--cat_every N: whether optimizer step ``step`` (counted from 1) runs the CAT passes. Deterministic in the
    step, so a resumed run makes the same choice; its term is then weighted by N, so the expected gradient is
    that of Eq. 3 (the variance grows: the CAT gradient arrives N times larger on one step in N)."""
    return step % cat_every == 0


class DriftBudget:
    """--cat_alpha auto: minimise the diffusion loss subject to each concept's drift staying under a budget.

    The drift is ``relative_drift`` (the CAT term relative to the mean square of the base model's prediction on
    y); its running estimate per concept is an exponential moving average. Each concept's alpha is the Lagrange
    multiplier of its constraint, written as log(drift) <= log(budget) (the same constraint, free of units and of
    the drift's scale), updated by dual ascent after every optimizer step that ran the CAT passes:

        alpha <- max(0, alpha + dual_lr * log(drift_estimate / budget))

    so alpha rises while the drift is over budget and falls (never below 0) under it, by dual_lr per e-fold of
    violation. It starts at 0: while the drift stays under budget the run is a plain LoRA run. Its state is
    saved in every checkpoint (``accelerator.register_for_checkpointing``), so a resumed run is bit-exact.
    """

    def __init__(self, num_concepts: int, budget: float, dual_lr: float, smoothing: float = 0.9):
        self.budget, self.dual_lr, self.smoothing = budget, dual_lr, smoothing
        self.alpha = torch.zeros(num_concepts, dtype=torch.float64)
        self.drift = torch.zeros(num_concepts, dtype=torch.float64)
        self.seen = torch.zeros(num_concepts, dtype=torch.bool)

    def weights(self, concepts) -> torch.Tensor:
        """Each subject row's alpha."""
        return self.alpha[concepts.cpu()].float()

    def update(self, concepts, drift) -> None:
        """Fold one step's per-row drift (of every process: gather first) into the estimates; move alpha."""
        concepts, drift = concepts.cpu(), drift.detach().cpu().double()
        for concept in concepts.unique().tolist():
            observed = drift[concepts == concept].mean()
            if self.seen[concept]:
                observed = self.smoothing * self.drift[concept] + (1 - self.smoothing) * observed
            self.drift[concept], self.seen[concept] = observed, True
            violation = torch.log(observed.clamp(min=1e-30) / self.budget)  # drift 0 (step 0) counts as far under
            self.alpha[concept] = torch.clamp(self.alpha[concept] + self.dual_lr * violation, min=0.0)

    def state_dict(self) -> dict:
        return {"alpha": self.alpha.clone(), "drift": self.drift.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.drift, self.seen = state["alpha"].clone(), state["drift"].clone(), state["seen"].clone()


def use_cpu_processes() -> bool:
    """True when several launched processes must share the CPU (gloo).

    Under ``accelerate launch --multi_gpu`` or ``torchrun`` on a machine without an accelerator, accelerate
    would otherwise leave every process believing it is the only one (and all of them would write files).
    """

    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    return parse_flag_from_env("ACCELERATE_USE_CPU") or (launched and not torch.accelerator.is_available())


def make_accelerator(args: argparse.Namespace):

    output_dir = Path(args.output_dir)
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    accelerator = Accelerator(
        cpu=use_cpu_processes(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project,
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # Other processes report errors only, so each message appears once.
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.ERROR)
    for noisy in ("transformers", "diffusers"):
        logging.getLogger(noisy).setLevel(logging.WARNING if accelerator.is_main_process else logging.ERROR)
    return accelerator


def check_distribution(args: argparse.Namespace, adapters: list, accelerator) -> None:
    """What the processes' setup (accelerate's config) can run, refused in one line each before any model loads."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise InputError("DeepSpeed (accelerate config distributed_type: DEEPSPEED) is not supported: its engine "
                         "saves and restores whole models, not the LoRA; use FSDP (fsdp_version: 2) to shard the "
                         "base model, or several processes without either (docs/multi-gpu.md)")
    if not is_sharded(accelerator):
        if args.fsdp_text_encoder:
            raise InputError("--fsdp_text_encoder needs FSDP: accelerate config distributed_type: FSDP, "
                             "fsdp_version: 2 (docs/multi-gpu.md)")
        return
    version = accelerator.state.fsdp_plugin.fsdp_version
    if version != 2:
        raise InputError(f"accelerate config fsdp_version: {version} is not supported: use fsdp_version: 2 "
                         "(torch's fully_shard; docs/multi-gpu.md)")
    if args.train_text_encoder:
        raise InputError("--train_text_encoder is not supported under FSDP: FSDP shards and trains the denoiser's "
                         "LoRA; the text encoders stay frozen (--fsdp_text_encoder shards them)")
    if args.bnb_quantization_config_path is not None:
        raise InputError(f"--bnb_quantization_config_path {args.bnb_quantization_config_path}: a quantized base is "
                         "not sharded under FSDP (accelerate keeps 4-bit weights whole on every process); shard the "
                         "bf16 base instead (--mixed_precision bf16), or quantize without FSDP")
    for adapter in adapters:
        if adapter.fsdp_refusal:
            raise InputError(f"{adapter.name} is not supported under FSDP: {adapter.fsdp_refusal}")


def shard_frozen_text_encoders(family, models: dict, device) -> None:
    """--fsdp_text_encoder: shard each frozen text encoder's decoder layers (transformers' ``_no_split_modules``,
    the classes accelerate's own wrap policy reads) and its token embeddings with torch's ``fully_shard``, which
    moves each process's shards to ``device``; what no layer holds (final norm, rotary buffers) stays whole there.

    The root itself is not sharded: fully_shard replaces a module's class, and transformers finds which outputs
    (hidden_states) a model records by its class, so a sharded root returns no hidden states.
    """
    from torch.distributed.fsdp import fully_shard

    for name in family.text_encoders:
        if name not in models:  # freed after --pre_compute_text_embeddings
            continue
        model = models[name]
        layer_names = set(getattr(model, "_no_split_modules", None) or ())
        targets = {module for module in model.modules() if type(module).__name__ in layer_names}
        targets.add(model.get_input_embeddings())
        inside = {inner for module in targets for inner in module.modules()}
        for module in reversed(list(model.modules())):  # children before their parents, as fully_shard needs
            if module in targets:
                fully_shard(module)
        for module in model.modules():
            if module not in inside:
                for tensors in (module._parameters, module._buffers):
                    for key, tensor in tensors.items():
                        if tensor is not None:
                            tensor.data = tensor.data.to(device)


def weight_dtype_for(accelerator):
    """Frozen weights are held in the mixed-precision dtype; trainable LoRA weights stay in float32."""

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_optimizer(args: argparse.Namespace, parameters, learning_rate: float, fused: bool = False):
    """Prodigy, 8-bit AdamW or torch's AdamW. ``fused``: torch's fused AdamW kernel (CPU and CUDA), the same update
    in one kernel per step instead of several per tensor: a LoRA has hundreds of small tensors."""

    if args.optimizer.lower() == "prodigy":
        import prodigyopt  # check_args made sure it is installed

        return prodigyopt.Prodigy(parameters, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  beta3=args.prodigy_beta3, weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                                  decouple=args.prodigy_decouple, use_bias_correction=args.prodigy_use_bias_correction,
                                  safeguard_warmup=args.prodigy_safeguard_warmup)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise InputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(parameters, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                   weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    return torch.optim.AdamW(parameters, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, fused=fused or None)


def is_sharded(accelerator) -> bool:
    """FSDP: each process holds a shard of every prepared weight, so every process takes part in every forward pass
    of a prepared model and in gathering its weights."""
    return accelerator.distributed_type == DistributedType.FSDP


def gathered_trainable_weights(accelerator, model) -> dict | None:
    """Under FSDP, the model's trainable weights whole, gathered from every process's shard into the main process's
    memory (a collective: every process calls it; the others get an empty dict); the frozen base is never
    gathered. Otherwise None: the model's own state dict is whole."""
    if not is_sharded(accelerator):
        return None
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))


def peft_state_dicts(accelerator, family, models: dict, train_text_encoder: bool, train_denoiser: bool = True
                     ) -> dict:
    """The trained LoRA weights in peft's naming, per pipeline component (``{"unet": ..., "text_encoder": ...}``).
    Every process calls it (under FSDP the weights are gathered); only the main process's are complete.

    Never the embedding table: peft would otherwise look for the base model's config to decide whether a table
    resized by pivotal tuning goes into the LoRA file (the new rows have their own files).
    """
    return {name: get_peft_model_state_dict(accelerator.unwrap_model(models[name]), save_embedding_layers=False,
                                            state_dict=gathered_trainable_weights(accelerator, models[name]))
            for name in adapted_components(family, train_text_encoder, train_denoiser)}


def lora_save_arguments(accelerator, family, models: dict, peft_states: dict) -> dict:
    """Keyword arguments for the family pipeline's ``save_lora_weights``: layers and their peft metadata."""
    layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(state) if family.diffusers_lora_names else state
              for name, state in peft_states.items()}
    unwrapped = {name: accelerator.unwrap_model(models[name]) for name in peft_states}
    return {**layers, **_collate_lora_metadata(unwrapped)}


# The inverse of convert_state_dict_to_diffusers for every layer kind we train (attention, CLIP, and the layers
# it leaves in peft's naming), so a checkpoint reloads into peft whatever the family.
DIFFUSERS_TO_PEFT_KEYS = {".lora.down": ".lora_A", ".lora.up": ".lora_B", ".lora_linear_layer.down": ".lora_A",
                          ".lora_linear_layer.up": ".lora_B"}


def load_lora_checkpoint(folder: Path, family, models: dict, components: list[str]) -> None:
    """Put the LoRA weights of a checkpoint folder (the family's diffusers format) back into the peft layers."""
    state_dict = load_file(folder / "pytorch_lora_weights.safetensors")
    for component in components:
        prefix = f"{component}."
        state = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        model = getattr(models[component], "module", models[component])
        incompatible = set_peft_model_state_dict(model, convert_state_dict(state, DIFFUSERS_TO_PEFT_KEYS),
                                                 adapter_name="default")
        unexpected = getattr(incompatible, "unexpected_keys", None)
        missing_lora = [key for key in getattr(incompatible, "missing_keys", []) if "lora_" in key]
        if unexpected or missing_lora or not state:
            raise InputError(f"{folder}: its LoRA weights do not fit this model's {component} "
                             f"({(unexpected or missing_lora or ['no weights for it'])[:3]})")


def register_checkpoint_hooks(accelerator, family, models: dict, adapters: list) -> None:
    """Make ``accelerator.save_state``/``load_state`` store only what the adapters write (the LoRA weights), not the
    whole base model (token rows and CatVersion's tokens travel as registered checkpoint objects)."""

    def save_hook(prepared, weights, output_dir):
        for adapter in adapters:
            adapter.save_checkpoint(Path(output_dir), accelerator, family, models)
        weights.clear()  # accelerate would otherwise also save every full model

    def load_hook(prepared, input_dir):
        prepared.clear()
        for adapter in adapters:
            adapter.load_checkpoint(Path(input_dir), accelerator, family, models)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (``checkpoint-N``; temporary folders excluded)."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def checkpoints_to_prune(folders: list[Path], total_limit: int | None) -> list[Path]:
    """The oldest of ``folders`` (oldest first, the new checkpoint included) beyond ``total_limit``."""
    if total_limit is None:
        return []
    return folders[: max(0, len(folders) - total_limit)]


class SaveFailed(Exception):
    """Writing a checkpoint failed (out of disk, permissions): reported as one line, with exit status 1."""


def save_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """``accelerator.save_state`` into ``checkpoint-<step>``, written aside and renamed into place.

    Old checkpoints are pruned only once the new one is in place, so a crash mid-save (with
    ``--checkpoints_total_limit 1`` too) still leaves the previous complete checkpoint for ``latest``. A failed
    save removes its hidden partial folder and raises ``SaveFailed``.
    """
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)  # frees the space it took; checkpoint_folders ignores it anyway
        reason = error.strerror or str(error)
        raise SaveFailed(f"could not save {final} ({reason}); the previous checkpoints are intact") from None
    # Every process writes its own random_states_<rank>.pkl: all must be inside before the folder is renamed.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)  # a crash mid-save leaves only the hidden partial folder behind
        logger.info(f"Saved {final}")
        for folder in checkpoints_to_prune(checkpoint_folders(output_dir), total_limit):
            logger.info(f"Removing old checkpoint {folder.name} (--checkpoints_total_limit {total_limit})")
            shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    return final


def resume_checkpoint(accelerator, args: argparse.Namespace) -> int:
    """Load the checkpoint named by ``--resume_from_checkpoint``; return its optimizer step (0: start fresh)."""
    if args.resume_from_checkpoint is None:
        return 0
    if args.resume_from_checkpoint == "latest":
        found = checkpoint_folders(Path(args.output_dir))
        if not found:
            logger.info(f"No checkpoint in {args.output_dir}: starting a new run")
            return 0
        path = found[-1]
    else:
        path = Path(args.resume_from_checkpoint)
    match = re.search(r"checkpoint-(\d+)$", path.name)
    if match is None:
        raise InputError(f"--resume_from_checkpoint: {path}: expected a folder named checkpoint-<step>")
    logger.info(f"Resuming from {path}")
    accelerator.load_state(str(path))
    return int(match.group(1))


# ---------------------------------------------------------------------------------------------------------
# 9. Validation: the validation prompt drawn with and without its trigger, and the grid's Knowledge Preservation
#    Score (paper §3, Eqs. 8-11). evaluate_kps.py imports the metric's functions from here, so the training-time
#    number and the evaluation script's can never drift apart.
# ---------------------------------------------------------------------------------------------------------

CLAMP_MIN = 1e-6
CLIP_FLAGS = ("--validation_clip_model", "--validation_clip_pretrained")


def cosine_similarity(a, b):
    """Row-wise cosine similarity SC(A, B) = A.B / (||A||_2 ||B||_2) (paper Eq. 10), in float32.

    ``a`` and ``b`` are (n, d) embeddings (tensors, arrays or lists) or single (d,) vectors; returns a float32
    tensor of n similarities.
    """

    a = torch.as_tensor(a, dtype=torch.float32).detach().cpu()
    b = torch.as_tensor(b, dtype=torch.float32).detach().cpu()
    a, b = torch.atleast_2d(a), torch.atleast_2d(b)
    if a.shape != b.shape:
        raise ValueError(f"cosine_similarity: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    # Rounding can push the cosine of (nearly) parallel vectors a hair past 1; keep it in [-1, 1].
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).clamp(-1.0, 1.0)


def harmonic_mean(values, name: str = "values", clamp_min: float = CLAMP_MIN) -> tuple[float, int]:
    """Harmonic mean H(x_1..x_n) = n / sum(1/x_i) (paper Eq. 11); returns ``(H, clamped_count)``.

    H is undefined for values <= 0, which cosine similarities can be: every value below ``clamp_min`` (1e-6)
    is raised to ``clamp_min`` (never dropped), a warning naming ``name`` is issued, and the number of
    clamped values is returned so that it can be reported. Raises ValueError for an empty input.
    """
    values = [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    if not values:
        raise ValueError(f"harmonic mean of no {name}")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"harmonic mean of {name}: NaN in the input")
    clamped = sum(v < clamp_min for v in values)
    if clamped:
        warnings.warn(
            f"{name}: {clamped} of {len(values)} values below {clamp_min:g} clamped to {clamp_min:g} "
            "for the harmonic mean (Eq. 11 is undefined for values <= 0)",
            RuntimeWarning,
            stacklevel=2,
        )
    return len(values) / sum(1.0 / max(v, clamp_min) for v in values), clamped


def knowledge_preservation_score(with_trigger_embeds, without_trigger_embeds) -> tuple[float, int]:
    """KPS = 1 - H(s_prev), s_prev_i = SC(CLIP_img(I(y)_i), CLIP_img(I(y_T)_i)) (paper Eqs. 8-9).

    ``with_trigger_embeds`` and ``without_trigger_embeds`` are CLIP image embeddings of the images drawn from
    y_T and from y with the same seed. Returns ``(KPS, clamped_count)``: 0 when the two images are the same
    (the trigger changes nothing), larger the further apart they are in CLIP image space. A low KPS signals
    leakage (the subject appears without the trigger); a high one does not by itself show that the image
    without the trigger is still the base model's.
    """
    h, clamped = harmonic_mean(cosine_similarity(without_trigger_embeds, with_trigger_embeds), "s_prev")
    return 1.0 - h, clamped


class Clip(NamedTuple):
    """An open_clip model in eval mode with its preprocessing, tokenizer and device."""

    model: Any
    preprocess: Any
    tokenizer: Any
    device: Any
    name: str
    pretrained: str


def resolve_clip_choice(model: str, pretrained: str | None, flags=("--clip_model", "--clip_pretrained")) -> str:
    """Check a CLIP choice without loading weights; return the architecture name. ``flags`` name it in errors.

    ``model`` is an open_clip architecture name or a path to an open_clip model config ``.json`` (registered
    under its file stem). ``pretrained`` is a tag of that architecture or a checkpoint file. Refuses tags
    trained with another activation than the architecture builds (``ViT-L-14`` + ``openai`` would silently
    use GELU instead of QuickGELU: use ``ViT-L-14-quickgelu``).
    """

    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise InputError(f"{flags[0]} {model}: no such file")
        open_clip.add_model_config(path)
        model = path.stem
    if model.startswith(("hf-hub:", "local-dir:")):
        return model
    if str(pretrained).lower() in ("", "none"):
        pretrained = None
    config = open_clip.get_model_config(model)
    if config is None:
        raise InputError(f"{flags[0]} {model}: unknown open_clip model (see open_clip.list_models())")
    if pretrained and not os.path.isfile(pretrained):
        tag = open_clip.get_pretrained_cfg(model, pretrained)
        if not tag:
            if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
                raise InputError(f"{flags[1]} {pretrained}: no such file")
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
            raise InputError(f"{flags[1]} {pretrained}: not a tag of {model} (tags: {tags}) nor a file")
        if bool(tag.get("quick_gelu", False)) != bool(config.get("quick_gelu", False)):
            hint = f"{model}-quickgelu" if tag.get("quick_gelu") else model.replace("-quickgelu", "")
            raise InputError(
                f"{flags[0]} {model} {flags[1]} {pretrained}: the weights were trained with "
                f"quick_gelu={bool(tag.get('quick_gelu'))} but the model builds the other activation; use {hint}"
            )
    return model


def load_clip(model: str = "ViT-L-14-quickgelu", pretrained: str | None = "openai", device="cpu",
              flags=("--clip_model", "--clip_pretrained")) -> Clip:
    """Load an open_clip model (float32, eval mode) with its eval preprocessing and tokenizer.

    ``model`` and ``pretrained`` as for ``resolve_clip_choice``; InputError for a bad choice.
    """

    name = resolve_clip_choice(model, pretrained, flags)
    if name.startswith(("local-dir:", "hf-hub:")) or str(pretrained).lower() in ("", "none"):
        pretrained = None  # such models carry their own weights
    try:
        clip_model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, precision="fp32", device=device
        )
    except (RuntimeError, OSError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{flags[1]} {pretrained}: could not load {name} weights ({first_line})") from None
    clip_model.eval().requires_grad_(False)
    return Clip(clip_model, preprocess, open_clip.get_tokenizer(name), torch.device(device), name, pretrained)


def clip_image_embeddings(clip: Clip, images, batch_size: int = 16):
    """L2-normalized float32 CLIP image embeddings (n, d) of a list of PIL images."""

    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([clip.preprocess(im.convert("RGB")) for im in images[start : start + batch_size]])
            out.append(clip.model.encode_image(batch.to(clip.device)).float())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()


def make_grid(rows: list[list]):
    """Paste rows of equally sized PIL images into one image."""

    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(row) for row in rows), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    return grid


def validation_prompts(prompt: str, triggers: list[str], adapters: list | None = None) -> tuple[str, str, bool]:
    """The validation grid's two prompts: the validation prompt and its trigger-less twin (every trigger of every
    concept stripped), as the adapters change them (pivotal tokens in the top one; CatVersion: the same prompt
    twice, the bottom row with the adapter off), and whether the bottom row runs with the adapters off."""
    without, off = prompt, False
    for trigger in triggers:
        without = strip_trigger(without, trigger)
    for adapter in adapters or []:
        prompt, without, off = adapter.validation_prompts(prompt, without, off)
    return prompt, without, off


def run_validation(run: "Run", step: int) -> Path | None:
    """Draw the validation prompt with and without its trigger (same seeds) and save both rows as one PNG."""
    accelerator, args, family, models = run.accelerator, run.args, run.family, run.models
    if not (accelerator.is_main_process or is_sharded(accelerator)):
        return None  # under FSDP every process draws: the sharded denoiser's forward passes need all of them
    triggers, weight_dtype, clip = run.triggers, run.weight_dtype, models.get("clip")
    with_trigger, without_trigger, bottom_off = validation_prompts(args.validation_prompt, triggers, run.adapters)
    # Text encoders freed after --pre_compute_text_embeddings are absent: the pipeline reloads them.
    components = {name: accelerator.unwrap_model(models[name])
                  for name in (family.denoiser, "vae", *family.text_encoders) if name in models}
    pipeline = family.load_pipeline(**components, **family.load_tokenizers(), dtype=weight_dtype)
    pipeline.to(accelerator.device)  # a no-op for the components passed in
    if family.validation_scheduler is not None:
        pipeline.scheduler = family.validation_scheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    with evaluation_mode(*components.values()):  # no LoRA dropout in the pictures (nor in their KPS)
        rows = validation_rows(run, pipeline, with_trigger, without_trigger, bottom_off)
    if not accelerator.is_main_process:
        return None
    if clip is not None:
        kps, clamped = knowledge_preservation_score(clip_image_embeddings(clip, rows[0]),
                                                    clip_image_embeddings(clip, rows[1]))
        run.log({"validation/kps": kps, "validation/s_prev_harmonic_mean": 1.0 - kps,
                 "validation/kps_clamped": clamped}, step)
        logger.info(f"Validation KPS at step {step}: {kps:.4f}" + (f" ({clamped} values clamped)" if clamped else ""))
    grid = make_grid(rows)
    path = Path(args.output_dir) / "validation" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": wandb.Image(grid, caption=f"top: {with_trigger!r}; "
                                                                 f"bottom: {without_trigger!r}")}, step=step)
    logger.info(f"Validation grid (top: {with_trigger!r}, bottom: {without_trigger!r}"
                + (" with the adapter off" if bottom_off else "") + f"): {path}")
    del pipeline
    return path


def validation_rows(run: "Run", pipeline, with_trigger: str, without_trigger: str, bottom_off: bool) -> list:
    """The two rows of the validation grid, same seeds; the bottom one with every adapter off if ``bottom_off``."""
    args, rows = run.args, []
    components = [value for value in pipeline.components.values() if isinstance(value, torch.nn.Module)]
    for prompt, off in ((with_trigger, False), (without_trigger, bottom_off)):
        generators = [torch.Generator(device="cpu").manual_seed((args.seed or 0) + i)
                      for i in range(args.num_validation_images)]
        with torch.no_grad(), adapters_disabled(*components if off else ()):
            rows.append(pipeline(prompt=[prompt] * args.num_validation_images, generator=generators,
                                 num_inference_steps=args.num_validation_inference_steps,
                                 height=args.resolution, width=args.resolution).images)
    return rows


class evaluation_mode:
    """Context manager: the models in eval mode (dropout off), each put back in the mode it had."""

    def __init__(self, *models):
        self.models = [model for model in models if isinstance(model, torch.nn.Module)]

    def __enter__(self):
        self.modes = [model.training for model in self.models]
        for model in self.models:
            model.eval()

    def __exit__(self, *exc):
        for model, mode in zip(self.models, self.modes):
            model.train(mode)


# ---------------------------------------------------------------------------------------------------------
# 10. Training loop: the Run state built once in main, then optimizer step after optimizer step
# ---------------------------------------------------------------------------------------------------------


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived: the run stopped after a complete optimizer step and saved a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopSignals:
    """Context manager: SIGINT/SIGTERM set a flag instead of killing the run mid-step; a second one aborts."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\nReceived {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(send it again to stop at once, without one)", file=sys.stderr)

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def stop_requested(accelerator, stop: StopSignals) -> bool:
    """Whether any process received a stop signal (all processes must stop at the same step)."""
    if accelerator.num_processes == 1:
        return stop.received is not None

    flag = torch.tensor([0 if stop.received is None else 1], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item())


@dataclass
class Run:
    """What the training loop works with, built once in ``main``: the prepared models and their optimizer, the
    data, and the derived step count. ``on_log`` receives every step's logged values (the tests read
    them there; trackers get them from accelerate)."""

    accelerator: Accelerator
    args: argparse.Namespace
    family: "ModelFamily"
    models: dict
    encode_prompts: Any
    dataloader: Any
    sampler: Any
    optimizer: Any
    lr_scheduler: Any
    max_train_steps: int
    triggers: list[str]
    weight_dtype: torch.dtype
    drift_budget: DriftBudget | None = None
    adapters: list = field(default_factory=list)  # the Adapter objects make_adapters built
    on_log: Any = None  # callable(values: dict, step: int)
    pending_drift: list = field(default_factory=list)  # this optimizer step's (concepts, drift) per micro-batch

    def __post_init__(self):
        self.adapted = [self.models[name] for name in trained_components(self.family, self.adapters)]
        self.trainable = [p for model in self.adapted for p in model.parameters() if p.requires_grad]
        self.step_config = StepConfig.from_args(self.args, self.weight_dtype)
        self.steps_per_epoch = math.ceil(len(self.dataloader) / self.args.gradient_accumulation_steps)

    def log(self, values: dict, step: int) -> None:
        self.accelerator.log(values, step=step)
        if self.on_log is not None:
            self.on_log(values, step)


def step_losses(run: Run, batch, step: int) -> dict:
    """The losses of optimizer step ``step`` (counted from 1) on ``batch``, backwarded; with --cat_every N the
    CAT terms run on every N-th step at N times their weight; the drift budget folds in every process's rows."""
    run_cat = run.step_config.cat_alpha > 0 and cat_runs_on(step, run.args.cat_every)
    scale = run.args.cat_every * run_cat
    config = replace(run.step_config, cat_alpha=run.step_config.cat_alpha * scale,
                     cat_swap_alpha=run.step_config.cat_swap_alpha * scale,
                     cat_bank_alpha=run.step_config.cat_bank_alpha * scale)
    cat_weights = run.drift_budget.weights(batch["concepts"]) if run.drift_budget and run_cat else None
    losses = training_step(batch, run.family, run.models, run.encode_prompts, config,
                           backward=run.accelerator.backward, cat_weights=cat_weights)
    if run.drift_budget is not None and run_cat:
        run.pending_drift.append((run.accelerator.gather(batch["concepts"].to(run.accelerator.device)),
                                  run.accelerator.gather(losses["drift"])))
    return losses


def update_drift_budget(run: Run) -> None:
    """--cat_alpha auto: one dual step per optimizer step, on the drift of all its micro-batches (with
    --gradient_accumulation_steps k, a step per micro-batch would move alpha k times as fast)."""
    if run.drift_budget is None or not run.pending_drift:
        return
    concepts, drift = zip(*run.pending_drift)
    run.drift_budget.update(torch.cat(concepts), torch.cat(drift))
    run.pending_drift.clear()


def optimizer_step(run: Run, step: int) -> None:
    """Clip, step the optimizer and the lr schedule, clear the gradients (each a no-op between accumulation
    micro-batches, as accelerate makes them); the adapters' own work around it (pivotal tuning's schedule and
    base rows)."""
    for adapter in run.adapters:
        adapter.before_optimizer_step(step)
    if run.accelerator.sync_gradients and run.args.max_grad_norm > 0:
        run.accelerator.clip_grad_norm_(run.trainable, run.args.max_grad_norm)
    run.optimizer.step()
    for adapter in run.adapters:
        adapter.after_optimizer_step(step)
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def log_step(run: Run, step: int, losses: dict) -> dict:
    """Log the step's losses (mean over processes), lr, drift and the budget's multipliers; return the progress
    bar's postfix."""
    reduce = run.accelerator.reduce
    drift = losses.pop("drift")
    logs = {f"loss/{name}": reduce(value.detach(), reduction="mean").item() for name, value in losses.items()}
    logs["lr"] = run.lr_scheduler.get_last_lr()[0]
    postfix = {"loss": f"{logs['loss/loss']:.4f}", "cat": f"{logs['loss/cat']:.2e}"}
    if len(drift):
        logs["cat/drift"] = run.accelerator.gather(drift).mean().item()
    budget = run.drift_budget
    if budget is not None:
        logs.update({f"cat/alpha_{n}": a for n, a in enumerate(budget.alpha.tolist())})
        logs.update({f"cat/drift_estimate_{n}": d for n, d in enumerate(budget.drift.tolist())})
        postfix.update(alpha=f"{budget.alpha.max().item():.3g}", drift=f"{budget.drift.max().item():.2e}")
    run.log(logs, step)
    return postfix


def after_step(run: Run, step: int, stop: StopSignals, grid: Path | None) -> Path | None:
    """Checkpoint, validate, and stop (with a checkpoint) if a signal came; return the newest validation grid."""
    args, output_dir = run.args, Path(run.args.output_dir)
    checkpoint = None
    if step % args.checkpointing_steps == 0 and step < run.max_train_steps:
        checkpoint = save_checkpoint(run.accelerator, output_dir, step, args.checkpoints_total_limit)
    if args.validation_prompt and validation_due(args, step, run.steps_per_epoch, run.max_train_steps):
        grid = run_validation(run, step) or grid
    if step < run.max_train_steps and stop_requested(run.accelerator, stop):
        checkpoint = checkpoint or save_checkpoint(run.accelerator, output_dir, step, args.checkpoints_total_limit)
        raise TrainingInterrupted(stop.received or signal.SIGTERM, step, checkpoint)
    return grid


def train(run: Run, first_step: int) -> tuple[int, Path | None]:
    """Run the optimizer steps from ``first_step`` to ``run.max_train_steps``; return (last step, last grid)."""
    accelerator, dataloader = run.accelerator, run.dataloader
    accumulation = run.args.gradient_accumulation_steps
    num_epochs = math.ceil(run.max_train_steps / run.steps_per_epoch)
    step, grid = first_step, None
    first_epoch = first_step // run.steps_per_epoch
    batches_to_skip = (first_step % run.steps_per_epoch) * accumulation
    progress = tqdm(range(run.max_train_steps), initial=first_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    with StopSignals() as stop, progress:
        for epoch in range(first_epoch, num_epochs):
            for model in run.adapted:
                model.train()
            batches = dataloader
            if epoch == first_epoch and batches_to_skip:
                batches = accelerator.skip_first_batches(dataloader, batches_to_skip)
            # accelerate's loaders pass their own epoch counter (which restarts at 0 in a resumed process) to the
            # sampler when iterated: set it on the loader itself, not only on the sampler.
            run.sampler.set_epoch(epoch)
            if hasattr(batches, "set_epoch"):
                batches.set_epoch(epoch)
            for batch in batches:
                with accelerator.accumulate(*run.adapted):
                    losses = step_losses(run, batch, step + 1)
                    optimizer_step(run, step + 1)
                if not accelerator.sync_gradients:
                    continue
                update_drift_budget(run)
                step += 1
                progress.update(1)
                progress.set_postfix(log_step(run, step, losses))
                grid = after_step(run, step, stop, grid)
                if step >= run.max_train_steps:
                    return step, grid
    return step, grid


# ---------------------------------------------------------------------------------------------------------
# 11. Save: each adapter's files, the kohya export, the model card
# ---------------------------------------------------------------------------------------------------------


# Kohya-format export (--output_kohya_format): each family names its KohyaLayout (see "Export layouts" above the
# families); the key tables and the naming below are what the layouts use. tests/client_key_maps.py rebuilds
# ComfyUI's and AUTOMATIC1111's key maps from their source (commits cited there); the tests check every key of these
# files against them. Each layer has .lora_down.weight, .lora_up.weight and .alpha; clients apply up @ down * alpha /
# rank.

# diffusers ResnetBlock2D layers -> SGM names (the part after input_blocks.N.0 / output_blocks.N.0 / middle_block.N).
SGM_RESNET_LAYERS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                     "conv_shortcut": "skip_connection"}

# diffusers FluxTransformer2DModel layers -> Black Forest Labs names. A part index means the BFL layer is one
# Linear holding several diffusers layers stacked along its output, in that order (to_q, to_k, to_v[, proj_mlp]).
FLUX_DOUBLE_BLOCK_LAYERS = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
}
FLUX_SINGLE_BLOCK_LAYERS = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None),
}
FLUX_TOP_LEVEL_LAYERS = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
FLUX_MLP_RATIO = 4  # FluxSingleTransformerBlock's proj_mlp width / hidden width (fixed in Flux.1)


def sgm_unet_layer(path: str, layers_per_block: int = 2) -> str:
    """A diffusers UNet layer path in SGM/LDM naming, as SDXL checkpoints, kohya's SDXL LoRAs and A1111 name it.

    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` (with SDXL's 2 layers per block). Every resolution level
    has ``layers_per_block`` input blocks plus one for its downsampler, and ``layers_per_block + 1`` output blocks.
    """
    def resnet_layer(rest: str) -> str:
        head, _, tail = rest.partition(".")
        if head not in SGM_RESNET_LAYERS:
            raise ValueError(f"no SGM name for the UNet layer {path!r}")
        return ".".join(filter(None, (SGM_RESNET_LAYERS[head], tail)))

    match = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", path)
    if match:
        side, level, kind, index, rest = match.groups()
        if side == "down_blocks":
            block = f"input_blocks.{1 + int(level) * (layers_per_block + 1) + int(index)}"
        else:
            block = f"output_blocks.{int(level) * (layers_per_block + 1) + int(index)}"
        return f"{block}.1.{rest}" if kind == "attentions" else f"{block}.0.{resnet_layer(rest)}"
    match = re.fullmatch(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)", path)
    if match:
        kind, index, rest = match.groups()
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * int(index)}.{resnet_layer(rest)}"
    raise ValueError(f"no SGM name for the UNet layer {path!r}")


def flux_bfl_layer(path: str) -> tuple[str, int | None]:
    """A diffusers Flux transformer layer path -> (Black Forest Labs layer path, part index within a fused layer)."""
    match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", path)
    if match:
        kind, index, rest = match.groups()
        layers = FLUX_DOUBLE_BLOCK_LAYERS if kind == "transformer_blocks" else FLUX_SINGLE_BLOCK_LAYERS
        block = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
        if rest in layers:
            name, part = layers[rest]
            return f"{block}.{index}.{name}", part
    elif path in FLUX_TOP_LEVEL_LAYERS:
        return FLUX_TOP_LEVEL_LAYERS[path], None
    raise ValueError(f"no Black Forest Labs name for the Flux layer {path!r}")


def lora_pairs(peft_state: dict) -> dict:
    """``{layer path: (lora_A weight, lora_B weight)}`` from a peft state dict (``get_peft_model_state_dict``)."""
    parts = {}
    for key, value in peft_state.items():
        layer, _, kind = key.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ValueError(f"cannot export {key!r}: only plain LoRA weights (lora_A/lora_B) have a kohya form")
        parts.setdefault(layer, {})[kind[0]] = value
    missing = [layer for layer, pair in parts.items() if len(pair) != 2]
    if missing:
        raise ValueError(f"LoRA layers without both lora_A and lora_B: {missing[:3]}")
    return {layer: (pair["A"], pair["B"]) for layer, pair in parts.items()}


def fuse_lora_parts(parts: dict, part_sizes: list[int]) -> tuple:
    """One LoRA for a fused Linear (BFL's qkv, linear1) from LoRAs of its parts ``{part index: (down, up)}``.

    The downs are stacked and the ups placed block-diagonally (zero rows for parts without a LoRA), so the fused
    rank is the sum of the parts' ranks. Each part's up is multiplied by fused rank / part rank, so that the
    clients' ``alpha / fused rank`` gives back each part's ``alpha / rank``, with the user's alpha unchanged.
    """
    fused_rank = sum(down.shape[0] for down, _ in parts.values())
    some_up = next(iter(parts.values()))[1]
    fused_up = torch.zeros(sum(part_sizes), fused_rank, dtype=some_up.dtype, device=some_up.device)
    downs, column = [], 0
    for index, (down, up) in sorted(parts.items()):
        row, rank = sum(part_sizes[:index]), down.shape[0]
        if up.shape[0] != part_sizes[index]:
            raise ValueError(f"part {index} has {up.shape[0]} outputs, expected {part_sizes[index]}")
        fused_up[row:row + up.shape[0], column:column + rank] = up * (fused_rank / rank)
        downs.append(down)
        column += rank
    return torch.cat(downs), fused_up


def flux_fused_part_sizes(layer: str, parts: dict) -> list[int]:
    """Output widths of the parts of a fused Flux layer, from whichever parts have a LoRA."""
    if layer.endswith(".qkv"):
        width = next(iter(parts.values()))[1].shape[0]
        return [width] * 3
    # linear1 = to_q, to_k, to_v (hidden each), then proj_mlp (FLUX_MLP_RATIO x hidden)
    hidden = next((up.shape[0] for index, (_, up) in parts.items() if index < 3), None)
    if hidden is None:
        hidden = parts[3][1].shape[0] // FLUX_MLP_RATIO
    return [hidden] * 3 + [hidden * FLUX_MLP_RATIO]


def kohya_state_dict(peft_states: dict, lora_alpha: float, layout: "KohyaLayout", denoiser_config=None) -> dict:
    """The LoRA in ``layout``'s kohya key names, which AUTOMATIC1111/Forge and ComfyUI read.

    ``peft_states`` maps a pipeline component (``unet``, ``text_encoder``, ``text_encoder_2``, ``transformer``)
    to its peft state dict; ``lora_alpha`` (the training ``--lora_alpha``) goes into every ``.alpha`` entry.
    ``denoiser_config`` is the denoiser's config (SDXL's block numbers read its ``layers_per_block``).
    Layers come out as ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and ``<name>.alpha``.
    """
    if not isinstance(layout, KohyaLayout):
        raise ValueError(f"layout must be a KohyaLayout, not {layout!r}")
    # convert_state_dict_to_kohya names the components it knows (unet -> lora_unet_, text_encoder -> lora_te1_,
    # text_encoder_2 -> lora_te2_); the layout's own prefixes replace them after.
    converter_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    renamed = {converter_prefix["unet" if component == layout.denoiser else component]: prefix + "_"
               for component, prefix in layout.prefixes.items()}
    layers = {}
    for component, state in peft_states.items():
        pairs = lora_pairs(state)
        if component == layout.denoiser:
            layers.update({f"unet.{name}": pair for name, pair in layout.denoiser_layers(pairs, denoiser_config or {})
                           .items()})
        elif component in layout.text_encoders:
            for path, pair in pairs.items():
                # transformers 5 flattens CLIPTextModel (no "text_model."); every client's CLIP names have it.
                layers[f"{component}.{path if path.startswith('text_model.') else 'text_model.' + path}"] = pair
        else:
            raise ValueError(f"no kohya layout for the component {component!r} in {type(layout).__name__}")
    peft_named = {}
    for name, (down, up) in layers.items():
        peft_named[f"{name}.lora_A.weight"] = down
        peft_named[f"{name}.lora_B.weight"] = up
    result = {}
    for key, value in convert_state_dict_to_kohya(peft_named).items():
        prefix = next(p for p in renamed if key.startswith(p))
        key = renamed[prefix] + key[len(prefix):]
        if key.endswith(".alpha"):
            value = torch.tensor(float(lora_alpha))  # the converter writes the rank
        result[key] = value.contiguous()
    return result


def save_kohya_weights(output_dir: Path, peft_states: dict, lora_alpha: float, layout: "KohyaLayout",
                       denoiser_config=None) -> Path:
    """Write ``pytorch_lora_weights_kohya.safetensors``: ``kohya_state_dict`` for AUTOMATIC1111/Forge/ComfyUI."""
    path = Path(output_dir) / "pytorch_lora_weights_kohya.safetensors"
    save_file(kohya_state_dict(peft_states, lora_alpha, layout, denoiser_config), path)
    return path


def write_model_card(args: argparse.Namespace, family, concepts: list[Concept], steps: int, grid: Path | None,
                     adapters: list | None = None) -> Path:
    """``README.md`` in the output folder: base model, triggers, CAT settings, each adapter's lines, steps, the last
    grid and how to load the result."""
    output_dir = Path(args.output_dir)
    adapters = make_adapters(args, family, seed=0) if adapters is None else adapters
    cards = [adapter.card(output_dir, family) for adapter in adapters]
    triggers = ", ".join(f"`{c.trigger_token}`" for c in concepts if c.trigger_token) or "none"
    lines = [
        f"# CAT-LoRA for {args.pretrained_model_name_or_path}",
        "",
        "LoRA weights trained with Contrastive Adapter Training (CAT, arXiv 2404.07554, Eq. 3) by "
        "`train_cat_lora.py`.",
        "",
        f"- Base model: `{args.pretrained_model_name_or_path}`",
        f"- Trigger(s): {triggers}",
        f"- CAT alpha: {args.cat_alpha}"
        + (f" (drift budget {args.cat_drift_budget}, dual lr {args.cat_dual_lr})" if args.cat_alpha == "auto" else "")
        + (f"; CAT passes every {args.cat_every} steps" if args.cat_every > 1 else "")
        + f"; CAT prompt mode: `{args.cat_prompt}`"
        + (f" (class word `{args.cat_class_word}`)" if args.cat_prompt == "class" and args.cat_class_word else "")
        + (f"; swapped-trigger term beta {args.cat_swap_alpha}" if args.cat_swap_alpha > 0 else ""),
        *(line for card in cards for line in card.settings),
        f"- Steps: {steps}; learning rate {args.learning_rate}; batch size {args.train_batch_size}; "
        f"resolution {args.resolution}; prior preservation: {args.with_prior_preservation}",
    ]
    if grid is not None:
        relative = grid.relative_to(output_dir).as_posix()
        bottom = "the adapter off" if validation_prompts("", [], adapters)[2] else "without"
        lines += ["", f"Last validation (top: with the trigger, bottom: {bottom}, same seeds):",
                  "", f"![validation]({relative})"]
    pipeline = family.pipeline_class.__name__
    lines += ["", "```python", f"from diffusers import {pipeline}", "",
              f'pipe = {pipeline}.from_pretrained("{args.pretrained_model_name_or_path}")']
    lines += [line for card in cards for line in card.code] + ["```"]
    lines += [line for card in cards for line in card.notes]
    card = load_or_create_model_card(
        repo_id_or_path=args.hub_model_id or output_dir.name, from_training=True, license="creativeml-openrail-m",
        base_model=args.pretrained_model_name_or_path, prompt=args.instance_prompt or args.validation_prompt,
        model_description="\n".join(lines), inference=True,
    )
    card = populate_model_card(card, tags=["text-to-image", family.hub_tag, "lora", "diffusers", "cat-lora",
                                           "template:sd-lora"])
    path = output_dir / "README.md"
    card.save(str(path))
    return path


def embedding_file_names(output_dir: Path, abstractions: list[str]) -> tuple[str, dict]:
    """The names of the embedding files: ``<name>_emb`` for diffusers, and per abstraction the AUTOMATIC1111/ComfyUI
    name (``<name>``, or ``<name>_<abstraction>`` for several), which is also the word that calls it in a prompt."""
    name = output_dir.resolve().name
    if len(abstractions) == 1:
        return f"{name}_emb", {abstractions[0]: name}
    return f"{name}_emb", {abstraction: f"{name}_{abstraction}" for abstraction in abstractions}


def save_embeddings(output_dir: Path, family, new_tokens: NewTokenEmbeddings) -> list[Path]:
    """Write the trained token rows in two formats.

    ``<name>_emb.safetensors``: diffusers' advanced scripts' file, one key per text encoder (``clip_l``; SDXL also
    ``clip_g``), each (all new tokens, encoder width); load each key with ``pipe.load_textual_inversion(rows,
    token=["<s0>", "<s1>", ...], text_encoder=..., tokenizer=...)``.
    ``embeddings/<name>.safetensors`` per abstraction, for AUTOMATIC1111 and ComfyUI (drop it in their embeddings
    folder, write its file name in a prompt): SD 1.x/2.x ``emb_params`` (that abstraction's tokens, width);
    SDXL ``clip_l`` and ``clip_g``, the pair AUTOMATIC1111 requires for an SDXL embedding (ComfyUI picks each
    encoder's key, SD 1.x's single tensor whatever its key).
    """
    diffusers_name, webui_names = embedding_file_names(output_dir, list(new_tokens.tokens))
    rows = {key: new_tokens.rows(encoder) for encoder, key in family.embedding_file_keys.items()}
    written = [output_dir / f"{diffusers_name}.safetensors"]
    (output_dir / "embeddings").mkdir(parents=True, exist_ok=True)
    save_file(rows, written[0])
    start = 0
    for abstraction, tokens in new_tokens.tokens.items():
        own = {key: value[start:start + len(tokens)].contiguous() for key, value in rows.items()}
        start += len(tokens)
        if len(own) == 1:
            own = {"emb_params": next(iter(own.values()))}
        written.append(output_dir / "embeddings" / f"{webui_names[abstraction]}.safetensors")
        save_file(own, written[-1])
    return written


def embedding_card_lines(output_dir: Path, family, new_tokens: NewTokenEmbeddings) -> list[str]:
    """The diffusers lines that load the embeddings file into each text encoder (as diffusers' advanced scripts)."""
    diffusers_name, _ = embedding_file_names(output_dir, list(new_tokens.tokens))
    tokens = ", ".join(f'"{token}"' for token in new_tokens.new_tokens)
    lines = ["from safetensors.torch import load_file", "",
             f'state_dict = load_file("path/to/this/folder/{diffusers_name}.safetensors")']
    for encoder, key in family.embedding_file_keys.items():
        tokenizer = family.tokenizer_of(encoder)
        lines.append(f'pipe.load_textual_inversion(state_dict["{key}"], token=[{tokens}], '
                     f"text_encoder=pipe.{encoder}, tokenizer=pipe.{tokenizer})")
    return lines


def save_final_weights(accelerator, args, family, models: dict, concepts, steps, grid, adapters: list) -> list[Path]:
    """Each adapter's files, then the model card. Every process calls it (under FSDP the weights are gathered from
    all of them); the main process writes and returns the files, the others return []."""
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    facts = {"base_model": args.pretrained_model_name_or_path, "class_words": [c.trigger_token for c in concepts],
             "cat_alpha": args.cat_alpha, "steps": steps}
    written = [path for adapter in adapters for path in adapter.save(output_dir, accelerator, family, models, facts)]
    if not accelerator.is_main_process:
        return []
    written.append(write_model_card(args, family, concepts, steps, grid, adapters))
    return written


# ---------------------------------------------------------------------------------------------------------
# 12. main: the steps above in order
# ---------------------------------------------------------------------------------------------------------


def run_seed(args: argparse.Namespace) -> int:
    return args.seed if args.seed is not None else 0


def check_inputs(args: argparse.Namespace):
    """Step 1: everything that can be checked without loading a model: the model family (from its
    ``model_index.json``), the concepts, examples and data notes, and the run's adapters (each checked against the
    family)."""
    family = model_family(args)
    warn_about_family_flags(args, family)
    warn_about_lora_alpha(args, family)
    concepts = load_concepts(args)
    check_family_options(args, family)
    adapters = make_adapters(args, family, run_seed(args))
    for adapter in adapters:  # what the adapter kind cannot do on this family
        adapter.check(family)
    if args.train_text_encoder_ti:
        abstractions = [a.lower() for a in token_abstractions(args.token_abstraction)]
        for concept in concepts:
            if concept.trigger_token.lower() not in abstractions:
                raise InputError(f"--concepts_list: trigger_token {concept.trigger_token!r} is not a "
                                 f"--token_abstraction ({args.token_abstraction}): with pivotal tuning it must be one")
    data_notes = {}
    instance_examples = collect_instance_examples(args, concepts, data_notes)
    if args.cat_prompts is not None:
        instance_examples = with_prompt_bank(instance_examples, load_prompt_bank(args.cat_prompts, concepts))
    if args.with_prior_preservation:
        check_class_images(Path(args.class_data_dir), args.num_class_images, args.resolution, data_notes)
    check_validation_prompt(args.validation_prompt, args.cat_alpha, concepts)
    if args.validation_kps:
        resolve_clip_choice(args.validation_clip_model, args.validation_clip_pretrained, CLIP_FLAGS)
    check_output_dir(Path(args.output_dir))
    return family, concepts, instance_examples, data_notes, adapters



def pivotal_examples(new_tokens: NewTokenEmbeddings, examples: list[Example]) -> list[Example]:
    """The examples with y_T written with the new tokens (y, the CAT prompt, has none of them)."""
    return [replace(e, caption=new_tokens.expand(e.caption),
                    trigger=new_tokens.expand(e.trigger) if e.trigger else e.trigger) for e in examples]


def check_no_new_tokens_in_y(family, new_tokens: NewTokenEmbeddings, examples: list[Example]) -> None:
    """CAT's frozen pass must be the base model's: y may hold none of the new tokens (whose rows train)."""
    tokenizers = family.load_tokenizers()
    for encoder_name in family.embedding_file_keys:
        tokenizer = tokenizers[family.tokenizer_of(encoder_name)]
        new_ids = set(new_tokens.new_ids(tokenizer))
        for example in examples:
            if new_ids & set(tokenizer(example.cat_caption).input_ids):
                raise InputError(f"{example.name}: the CAT prompt {example.cat_caption!r} still holds a new token "
                                 f"({', '.join(new_tokens.new_tokens)}); remove it from the caption")


def warn_about_family_flags(args: argparse.Namespace, family) -> None:
    """A flag of another family's diffusers script (e.g. Flux's --guidance_scale on SDXL) is accepted, as it
    would be there, but means nothing here: say so once."""
    defaults = build_parser().parse_args(["--pretrained_model_name_or_path", "-"])
    for dest in FAMILY_FLAGS:
        if not family.reads(dest) and getattr(args, dest) != getattr(defaults, dest):
            logger.warning(f"--{dest} applies to {family_readers(dest)} models; ignored for {family.label}")


def warn_about_lora_alpha(args: argparse.Namespace, family) -> None:
    """pytorch_lora_weights.safetensors keeps alpha only in diffusers' metadata; ComfyUI reads the layers without
    it (as if alpha were the rank), so the LoRA acts there at rank/alpha of its trained strength."""
    if args.lora_alpha is None or args.lora_alpha == args.rank or args.output_kohya_format:
        return
    remedy = ("add --output_kohya_format for a file with alpha" if family.kohya_layout else
              "keep --lora_alpha at the rank (the default) for ComfyUI")
    logger.warning(f"--lora_alpha {args.lora_alpha:g} is not --rank {args.rank}: diffusers applies it from the saved "
                   f"file's metadata, ComfyUI does not (its LoRA strength {args.rank / args.lora_alpha:g} x); {remedy}")


def check_family_options(args: argparse.Namespace, family) -> None:
    """What a family does not offer, refused in one line before anything loads."""
    # (getattr: callers may ask about the other flags with a partial Namespace, tests/conftest.py's offered())
    if args.train_text_encoder and not family.trainable_text_encoders:
        raise InputError(f"--train_text_encoder is not supported for {family.label}: diffusers' script for it trains "
                         "no text encoder")
    if args.train_text_encoder_ti and not family.embedding_file_keys:
        raise InputError(f"--train_text_encoder_ti is not supported for {family.label}: pivotal tuning needs CLIP text "
                         "encoders that read every prompt (SD 1.x/2.x, SDXL)")
    if args.output_kohya_format and family.kohya_layout is None:
        raise InputError(f"--output_kohya_format: no kohya layout is defined for {family.label}; "
                         "pytorch_lora_weights.safetensors is diffusers' format (which clients read it: README, ComfyUI)")
    if getattr(args, "tokenizer_max_length", None) is not None and family.long_tokenizer == family.tokenizers[0]:
        raise InputError(f"--tokenizer_max_length: {family.label}'s prompts are cut at --max_sequence_length "
                         f"({family.config.max_sequence_length}); set that instead")


def check_prompts(family, triggers: list[str], instance_examples: list[Example], data_notes: dict) -> None:
    """Step 2b: the checks that need only the tokenizers (rare triggers, captions within the length limit)."""
    # A processor (FLUX.2 [dev]'s Mistral) holds its text tokenizer.
    tokenizers = {name: getattr(tokenizer, "tokenizer", tokenizer) for name, tokenizer in family.load_tokenizers().items()}
    warn_about_triggers(tokenizers[family.tokenizers[0]], triggers)
    for name in family.tokenizers:
        limit = family.caption_token_limit(name)
        if limit < 1:  # e.g. a short --max_sequence_length under FLUX.2 [dev]'s system message
            raise InputError(f"--max_sequence_length {family.config.max_sequence_length}: {family.label}'s prompt "
                             f"template takes {tokenizers[name].model_max_length - limit} of those tokens and leaves "
                             "none for the caption")
        check_caption_lengths(tokenizers[name], instance_examples, data_notes, limit)
    for line in summarize_notes(data_notes):
        logger.warning(line)


def prepare_models(args: argparse.Namespace, family, accelerator, weight_dtype, adapters: list | None = None) -> dict:
    """Step 3: the frozen base model in ``weight_dtype`` (a quantized base only moves) with the adapters' trainable
    parameters attached in float32 (LoRA layers, new token rows, CatVersion's tokens)."""
    adapters = make_adapters(args, family, run_seed(args)) if adapters is None else adapters
    models = family.load_models(weight_dtype)
    # Under FSDP the sharded models stay where they loaded: fully_shard moves each process's shard to the device,
    # so the whole model never has to fit there.
    sharded = {family.denoiser, *(family.text_encoders if args.fsdp_text_encoder else ())} \
        if is_sharded(accelerator) else set()
    for name, model in models.items():
        if name == "noise_scheduler":
            continue
        if getattr(model, "is_quantized", False):  # a quantized base cannot be cast; it only moves
            model.to(accelerator.device)
        elif name in sharded:
            model.to(dtype=weight_dtype)
        else:
            model.to(accelerator.device, dtype=family.vae_dtype(weight_dtype) if name == "vae" else weight_dtype)
    for adapter in adapters:
        adapter.attach(family, models)
    if args.enable_xformers_memory_efficient_attention:
        models[family.denoiser].enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        models[family.denoiser].enable_gradient_checkpointing()
        for name in family.trainable_text_encoders if args.train_text_encoder else ():
            models[name].gradient_checkpointing_enable()
    if weight_dtype != torch.float32:
        cast_training_params([models[name] for name in trained_components(family, adapters)], dtype=torch.float32)
    if args.fsdp_text_encoder:
        shard_frozen_text_encoders(family, models, accelerator.device)
    return models


def make_dataloader(args: argparse.Namespace, family, models: dict, instance_examples, class_examples, seed: int,
                    bank_base: dict | None = None):
    """Step 4: the dataloader (with its sampler) and, when asked, the cached prompt conditioning."""
    latent_cache = None
    if args.cache_latents:
        bank_examples = [example for images in (bank_base or {}).values() for example in images]
        latent_cache = encode_latent_cache(family, models["vae"], instance_examples + class_examples + bank_examples,
                                           args.resolution, args.train_batch_size, args.image_interpolation_mode)
    cached_prompts = None
    if args.pre_compute_text_embeddings:
        prompts = [e.caption for e in instance_examples + class_examples] + [e.cat_caption for e in instance_examples]
        prompts += [swapped for e in instance_examples for swapped in e.swap_captions]
        prompts += [prompt for e in instance_examples for prompt in e.bank_prompts]
        text_encoders = {name: models[name] for name in family.text_encoders}
        cached_prompts = CachedPromptEncoder(PromptEncoder(family, text_encoders), prompts)
        # Nothing reads the text encoders after this (validation reloads them): let them leave memory (T5-XXL
        # alone is ~9.5 GB in bf16).
        del text_encoders
        for name in family.text_encoders:
            del models[name]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    dataset = make_dataset(instance_examples * args.repeats, class_examples, args.resolution, args.center_crop,
                           args.random_flip, seed, latent_cache, args.image_interpolation_mode, bank_base)
    sampler = EpochShuffleSampler(len(dataset), seed)
    # A private generator: creating a dataloader iterator draws a seed from it, which must not shift the global
    # random stream (a resumed run creates its iterator at another point).
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                             collate_fn=collate_examples, num_workers=args.dataloader_num_workers,
                                             generator=torch.Generator().manual_seed(seed))
    return dataloader, sampler, cached_prompts


def make_optimizer_and_schedule(args: argparse.Namespace, family, accelerator, models: dict, num_batches: int,
                                adapters: list):
    """Step 5: AdamW (or 8-bit AdamW) over the adapters' parameters and the lr schedule; returns the step count too."""
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    # The new token rows (pivotal tuning) train with the text encoder's learning rate, as in diffusers.
    trainable = {name: [p for p in models[name].parameters() if p.requires_grad]
                 for name in trained_components(family, adapters)}
    text_encoder_parameters = [p for name, params in trainable.items() if name != family.denoiser for p in params]
    optimizer = make_optimizer(args, optimizer_parameter_groups(args, trainable.get(family.denoiser, []),
                                                                text_encoder_parameters, learning_rate), learning_rate,
                               fused=accelerator.device.type in ("cpu", "cuda"))
    steps_per_epoch = math.ceil(num_batches / accelerator.num_processes / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes, num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    return optimizer, lr_scheduler, max_train_steps


def check_output_dir(output_dir: Path) -> None:
    """Fail early, with the folder's name, when the output folder cannot be created or written."""
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--output_dir {output_dir}: {existing} is not a folder")
    try:  # os.access says yes to root even on a read-only file system: really try

        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise InputError(f"--output_dir {output_dir}: cannot write in {existing} ({error.strerror})") from None


def tracker_config(args: argparse.Namespace) -> dict:
    # Trackers (tensorboard's hparams) accept only scalars and strings.
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in vars(args).items()}


def push_to_hub(args: argparse.Namespace) -> None:

    repo_id = create_repo(repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True,
                          token=args.hub_token).repo_id
    upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="CAT-LoRA training",
                  ignore_patterns=["step_*", "epoch_*", "checkpoint-*", ".checkpoint-*"], token=args.hub_token)


def main(argv=None, on_log=None) -> list[Path]:
    """Train; return the files written. Raises ``InputError`` for bad input, before writing anything.
    ``on_log(values, step)``, if given, receives every step's logged values."""
    args = parse_args(argv)
    family, concepts, instance_examples, data_notes, adapters = check_inputs(args)
    triggers = sorted({c.trigger_token for c in concepts if c.trigger_token})

    # Step 2: processes, seed, precision; then the checks that need only the tokenizers.
    accelerator = make_accelerator(args)
    check_distribution(args, adapters, accelerator)
    seed = run_seed(args)
    set_seed(seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = weight_dtype_for(accelerator)
    for adapter in adapters:
        instance_examples = adapter.prepare_examples(family, instance_examples, args.cat_alpha)
    rare_triggers = all(adapter.rare_trigger for adapter in adapters)
    check_prompts(family, triggers if rare_triggers else [], instance_examples, data_notes)

    models = prepare_models(args, family, accelerator, weight_dtype, adapters)
    class_examples = []
    if args.with_prior_preservation:
        class_examples = prepare_class_examples(args, family, accelerator, weight_dtype)
        if not class_examples:
            raise InputError(f"--class_data_dir {args.class_data_dir}: no class images")
    bank_base = None
    if args.cat_prompts and args.cat_prompts_latents == "base":
        bank_base = prepare_bank_base_examples(args, family, accelerator, weight_dtype, instance_examples)
    dataloader, sampler, cached_prompts = make_dataloader(args, family, models, instance_examples, class_examples,
                                                          seed, bank_base)
    optimizer, lr_scheduler, max_train_steps = make_optimizer_and_schedule(args, family, accelerator, models,
                                                                           len(dataloader), adapters)
    for adapter in adapters:
        adapter.schedule(max_train_steps)

    # Step 6: wrap for the processes, resume, train.
    to_prepare = trained_components(family, adapters)
    *prepared, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        *(models[name] for name in to_prepare), optimizer, dataloader, lr_scheduler)
    models.update(zip(to_prepare, prepared))
    # Prompts go through the prepared (possibly DDP-wrapped) text encoders, or the cache.
    encode_prompts = cached_prompts or PromptEncoder(family, {name: models[name] for name in family.text_encoders})
    register_checkpoint_hooks(accelerator, family, models, adapters)
    for state in (state for adapter in adapters for state in adapter.checkpoint_state()):
        accelerator.register_for_checkpointing(state)  # saved and restored with every checkpoint
    drift_budget = None
    if args.cat_alpha == "auto":
        drift_budget = DriftBudget(len(concepts), args.cat_drift_budget, args.cat_dual_lr)
        accelerator.register_for_checkpointing(drift_budget)  # saved and restored with every checkpoint
    if accelerator.is_main_process:
        accelerator.init_trackers("cat-lora", config=tracker_config(args))
    logger.info(f"{family.pipeline_class.__name__}: {len(instance_examples)} images of {len(concepts)} concept(s), "
                f"triggers {triggers}, CAT alpha {args.cat_alpha} ({args.cat_prompt}"
                + (f", drift budget {args.cat_drift_budget}" if drift_budget else "")
                + (f", CAT passes every {args.cat_every} steps" if args.cat_every > 1 else "")
                + (f", swapped-trigger term beta {args.cat_swap_alpha}" if args.cat_swap_alpha > 0 else "")
                + (f", prompt bank {args.cat_prompts} weight {args.cat_prompts_alpha}"
                   + {"noise": " on pure noise", "base": " on the base model's images"}.get(args.cat_prompts_latents, "")
                   if args.cat_prompts else "")
                + f"), {max_train_steps} steps")
    first_step = resume_checkpoint(accelerator, args)
    if args.validation_kps and accelerator.is_main_process:
        models["clip"] = load_clip(args.validation_clip_model, args.validation_clip_pretrained, accelerator.device,
                                   CLIP_FLAGS)
    run = Run(accelerator, args, family, models, encode_prompts, dataloader, sampler, optimizer, lr_scheduler,
              max_train_steps, triggers, weight_dtype, drift_budget, adapters, on_log)
    try:
        steps, grid = train(run, first_step)
    except (TrainingInterrupted, SaveFailed):
        accelerator.end_training()
        raise

    # Step 7: save (every process gathers under FSDP; the main process writes).
    accelerator.wait_for_everyone()
    written = save_final_weights(accelerator, args, family, models, concepts, steps, grid, adapters)
    if accelerator.is_main_process:
        if args.push_to_hub:
            push_to_hub(args)
        for path in written:
            print(f"wrote {path}")
    accelerator.end_training()
    return written


def cli(argv=None) -> int:
    """Run ``main`` as a command: expected failures become one line on stderr and an exit status."""
    program = Path(__file__).name
    try:
        main(argv)
    except InputError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return 2
    except SaveFailed as error:
        print(f"{program}: error: {error}. Fix the cause, then run the same command plus "
              "--resume_from_checkpoint latest", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:
        print(f"{program}: {stop}; saved {stop.checkpoint}. Resume with the same command plus "
              "--resume_from_checkpoint latest", file=sys.stderr)
        return 128 + stop.signum
    return 0


if __name__ == "__main__":
    sys.exit(cli())
