#!/usr/bin/env python
# Copyright 2026 The CAT-LoRA authors. Licensed under the Apache License, Version 2.0.
"""Train a LoRA on Stable Diffusion 1.x/2.x, SDXL or Flux.1 with Contrastive Adapter Training (CAT).

CAT (Park et al., "Contrastive Adapter Training for Personalized Image Generation", arXiv 2404.07554,
§2.2 Eq. 3) adds one term to the usual LoRA objective:

    L = ||eps - eps_lora(z_t, t, y_T)||^2 + alpha * ||eps_frozen(z_t, t, y) - eps_lora(z_t, t, y)||^2

y_T is the training caption with its trigger token ("a photo of sks teapot"), y the same caption without it
("a photo of teapot"), and eps_frozen the base model (adapters disabled, no gradient) on the same noisy
latents and timesteps. The second term keeps the adapter from changing what the model draws for prompts that
do not name the subject, so the subject is bound to its trigger instead of leaking into the class.

The script follows diffusers' ``train_dreambooth_lora.py``: same flag names where the meaning is the same,
run as ``accelerate launch train_cat_lora.py ...`` (plain ``python`` works too). It reads top to bottom in
the order the data flows: arguments -> trigger handling -> data -> models -> loss -> training loop -> save.
"""

import argparse
import gc
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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, parse_flag_from_env, set_seed
from diffusers import (
    AutoencoderKL,
    BitsAndBytesConfig,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
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
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

# Single-token triggers with an id below this are among CLIP BPE's earliest (most frequent) merges.
COMMON_TOKEN_ID_LIMIT = 20000
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


logger = logging.getLogger("train_cat_lora")


class InputError(Exception):
    """Bad input from the user: reported as one line naming the flag or file, with exit status 2."""


# ---------------------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a LoRA with Contrastive Adapter Training (CAT, arXiv 2404.07554, Eq. 3).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("base model")
    model.add_argument("--pretrained_model_name_or_path", required=True,
                       help="Hub id or local folder of a diffusers Stable Diffusion 1.x/2.x, SDXL or Flux.1 "
                            "pipeline (the family is read from its model_index.json).")
    model.add_argument("--revision", default=None, help="Revision of the pretrained model on the hub.")
    model.add_argument("--variant", default=None, help="Weight variant to load, e.g. fp16.")

    data = parser.add_argument_group("data")
    data.add_argument("--instance_data_dir", default=None,
                      help="Folder of subject images; captions from metadata.jsonl, <image>.txt or --instance_prompt.")
    data.add_argument("--instance_prompt", default=None, help="Caption for images without one, e.g. 'a photo of sks dog'.")
    data.add_argument("--dataset_name", default=None,
                      help="A datasets source (hub id or local folder) instead of --instance_data_dir.")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--image_column", default="image")
    data.add_argument("--caption_column", default="text")
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
    data.add_argument("--resolution", type=int, default=512, help="Training resolution (divisible by 8).")
    data.add_argument("--center_crop", action="store_true", help="Center-crop instead of random-crop.")
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    cat = parser.add_argument_group("CAT (Contrastive Adapter Training)")
    cat.add_argument("--cat_alpha", type=float, default=1.0,
                     help="Weight alpha of the CAT term (Eq. 3). 0 turns it off: a plain LoRA run.")
    cat.add_argument("--trigger_token", default=None,
                     help="The rare word that names the subject, e.g. 'sks'. Required when --cat_alpha > 0 "
                          "(unless the concepts list gives one per concept).")
    cat.add_argument("--cat_prompt", choices=["strip", "class", "empty"], default="strip",
                     help="The prompt y of the CAT term: 'strip' removes the trigger from the caption (the "
                          "paper), 'class' replaces it with --cat_class_word, 'empty' uses ''.")
    cat.add_argument("--cat_class_word", default=None, help="Replacement word for --cat_prompt class, e.g. 'dog'.")
    cat.add_argument("--cat_mode", choices=["lean", "batched"], default="lean",
                     help="'lean': backward the diffusion term before the CAT passes (lower peak memory); "
                          "'batched': both adapted passes in one U-Net call. Same gradients.")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    lora.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (scale alpha/rank); default: rank.")
    lora.add_argument("--train_text_encoder", action="store_true", help="Also train a LoRA on the text encoder.")

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
    train.add_argument("--scale_lr", action="store_true",
                       help="Scale the learning rate by processes x accumulation steps x batch size.")
    train.add_argument("--lr_scheduler", default="constant",
                       help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant" or '
                            '"constant_with_warmup".')
    train.add_argument("--lr_warmup_steps", type=int, default=0)
    train.add_argument("--lr_num_cycles", type=int, default=1)
    train.add_argument("--lr_power", type=float, default=1.0)
    train.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (5.0 is common).")
    train.add_argument("--noise_offset", type=float, default=0.0, help="Noise offset (0.1 is common).")
    train.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW.")
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=1e-2)
    train.add_argument("--adam_epsilon", type=float, default=1e-08)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    train.add_argument("--allow_tf32", action="store_true")
    train.add_argument("--cache_latents", action="store_true",
                       help="Encode every image with the VAE once, before training (needs --center_crop and no "
                            "--random_flip: cached latents cannot be re-augmented).")
    train.add_argument("--pre_compute_text_embeddings", action="store_true",
                       help="Encode every caption (y_T, the CAT prompt y and the class prompt) once, before "
                            "training; not with --train_text_encoder.")

    flux = parser.add_argument_group("Flux.1", "Options read only when the base model is a FluxPipeline "
                                              "(names and defaults as diffusers' Flux LoRA scripts).")
    flux.add_argument("--max_sequence_length", type=int, default=512,
                      help="Tokens of the T5 prompt encoding (the CLIP encoder always reads 77).")
    flux.add_argument("--guidance_scale", type=float, default=3.5,
                      help="Guidance value fed to the guidance embedding of a guidance-distilled transformer "
                           "(Flux.1-dev) during training; ignored by transformers without one.")
    flux.add_argument("--weighting_scheme", type=str, default="none",
                      choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
                      help="Timestep density and loss weighting of flow matching; 'none' samples timesteps "
                           "uniformly and weighs every sample alike.")
    flux.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the 'logit_normal' timestep density.")
    flux.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the 'logit_normal' density.")
    flux.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the 'mode' timestep density.")
    flux.add_argument("--lora_layers", type=str, default=None,
                      help="Comma-separated transformer modules to adapt, e.g. 'to_k,to_q,to_v,to_out.0' "
                           "(attention only); default: attention and feed-forward layers of every block.")
    flux.add_argument("--bnb_quantization_config_path", type=str, default=None,
                      help="JSON file of bitsandbytes options (e.g. {\"load_in_4bit\": true, "
                           "\"bnb_4bit_quant_type\": \"nf4\"}) for loading the frozen transformer quantized.")

    logs = parser.add_argument_group("logging, validation and output")
    logs.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    logs.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")
    logs.add_argument("--validation_prompt", default=None,
                      help="A prompt with the trigger; validation draws it with and without the trigger.")
    logs.add_argument("--num_validation_images", type=int, default=4)
    logs.add_argument("--validation_steps", type=int, default=100)
    logs.add_argument("--num_validation_inference_steps", type=int, default=25)
    logs.add_argument("--validation_kps", action="store_true",
                      help="At each validation, log the Knowledge Preservation Score (Eq. 9) of the grid: 1 - the "
                           "harmonic mean of CLIP cosines between the with- and without-trigger images.")
    logs.add_argument("--validation_clip_model", default="ViT-L-14-quickgelu",
                      help="open_clip architecture (or model config .json) for --validation_kps.")
    logs.add_argument("--validation_clip_pretrained", default="openai",
                      help="open_clip pretrained tag or local checkpoint file for --validation_kps.")
    logs.add_argument("--output_kohya_format", action="store_true",
                      help="Also write pytorch_lora_weights_kohya.safetensors for AUTOMATIC1111/ComfyUI.")
    logs.add_argument("--push_to_hub", action="store_true")
    logs.add_argument("--hub_token", default=None)
    logs.add_argument("--hub_model_id", default=None)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the command line; every check here runs before any model is loaded."""
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    sources = [args.instance_data_dir, args.dataset_name, args.concepts_list]
    if sum(source is not None for source in sources) != 1:
        raise InputError("give exactly one of --instance_data_dir, --dataset_name, --concepts_list")
    if args.cat_alpha < 0:
        raise InputError(f"--cat_alpha must be >= 0, got {args.cat_alpha}")
    if args.cat_alpha > 0 and args.trigger_token is None and args.concepts_list is None:
        raise InputError("--trigger_token is required when --cat_alpha > 0 (e.g. --trigger_token sks)")
    if args.trigger_token is not None and not args.trigger_token.strip():
        raise InputError("--trigger_token is empty")
    if args.cat_prompt == "class" and not args.cat_class_word and args.concepts_list is None:
        raise InputError("--cat_prompt class needs --cat_class_word")
    if args.resolution <= 0 or args.resolution % 8:
        raise InputError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.with_prior_preservation and (args.class_data_dir is None or args.class_prompt is None):
        raise InputError("--with_prior_preservation needs --class_data_dir and --class_prompt")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit <= 0:
        raise InputError(f"--checkpoints_total_limit must be positive, got {args.checkpoints_total_limit}")
    if args.rank <= 0:
        raise InputError(f"--rank must be positive, got {args.rank}")
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    for flag in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps",
                 "validation_steps"):
        if getattr(args, flag) <= 0:
            raise InputError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.max_train_steps is not None and args.max_train_steps <= 0:
        raise InputError(f"--max_train_steps must be positive, got {args.max_train_steps}")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        raise InputError(f"--resume_from_checkpoint: {args.resume_from_checkpoint}: no such checkpoint folder")
    if args.cache_latents and (args.random_flip or not args.center_crop):
        raise InputError("--cache_latents needs --center_crop and no --random_flip (cached latents are not re-augmented)")
    if args.pre_compute_text_embeddings and args.train_text_encoder:
        raise InputError("--pre_compute_text_embeddings cannot be used with --train_text_encoder")
    if args.validation_kps and args.validation_prompt is None:
        raise InputError("--validation_kps needs --validation_prompt")
    if args.push_to_hub and args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise InputError("--hub_token with --report_to wandb would expose the token; use `hf auth login`")


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
    """The prompt y on which CAT compares the adapted and the frozen U-Net (Eq. 3).

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
        for concept in concepts:
            for path, caption in load_image_caption_pairs(concept.instance_data_dir, concept.instance_prompt):
                check_image(path, args.resolution, notes)
                examples.append(Example(path, caption, _cat_caption(args, concept, caption, str(path)), str(path),
                                        concept.trigger_token))
    return examples


def _examples_from_dataset(args: argparse.Namespace, concept: Concept, notes: dict) -> list[Example]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(args.dataset_name, args.dataset_config_name, split="train")
    except Exception as error:
        raise InputError(f"--dataset_name {args.dataset_name}: cannot load ({type(error).__name__}: {error})") from None
    for column, flag in ((args.image_column, "--image_column"), (args.caption_column, "--caption_column")):
        if column not in dataset.column_names and not (flag == "--caption_column" and args.instance_prompt):
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
    if args.cat_alpha == 0:
        return caption  # unused: the CAT term is off
    if not contains_trigger(caption, concept.trigger_token):
        raise InputError(f"{name}: caption {caption!r} does not contain the trigger {concept.trigger_token!r}")
    return cat_prompt(caption, concept.trigger_token, args.cat_prompt, concept.class_word)


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


def check_caption_lengths(tokenizer, examples: list[Example], notes: dict) -> None:
    """Note captions longer than the text encoder's limit; refuse one whose trigger would be cut off."""
    limit = tokenizer.model_max_length - 2  # room for the start and end tokens
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


def augment(image, resolution: int, center_crop: bool, random_flip: bool, generator):
    """Resize the short side to ``resolution``, crop a square, maybe flip.

    Returns the tensor in [-1, 1] and SDXL's micro-conditioning for it: the original ``(height, width)`` and
    the crop's top-left corner ``(top, left)``, measured in the flipped image when the image was flipped (as
    diffusers' SDXL scripts do, which flip before cropping).
    """
    original_size = (image.height, image.width)
    image = TF.resize(image, resolution, interpolation=TF.InterpolationMode.BILINEAR)
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
                 seed: int = 0, latent_cache: dict | None = None):
        self.instance_examples, self.class_examples = instance_examples, class_examples or []
        self.resolution, self.seed, self.latent_cache = resolution, seed, latent_cache
        self.center_crop, self.random_flip = center_crop, random_flip

    def __len__(self):
        # As in DreamBooth: an epoch walks the longer of the instance and class sets.
        return max(len(self.instance_examples), len(self.class_examples))

    def pixels_or_latents(self, example: Example, generator):
        if self.latent_cache is not None:
            return self.latent_cache[example.name]
        return augment(open_rgb_image(example.image, example.name), self.resolution, self.center_crop,
                       self.random_flip, generator)

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
            "noise_seed": draw_seed(generator),
        }
        if self.class_examples:
            class_example = self.class_examples[number % len(self.class_examples)]
            pixels, original_size, crop_top_left = self.pixels_or_latents(class_example, generator)
            item.update(class_pixel_values=pixels, class_original_size=original_size,
                        class_crop_top_left=crop_top_left, class_prompt=class_example.caption,
                        class_noise_seed=draw_seed(generator))
        return item


def make_dataset(instance_examples, class_examples, resolution, center_crop, random_flip, seed=0,
                 latent_cache: dict | None = None) -> CATDataset:
    """The training dataset (see ``CATDataset``)."""
    return CATDataset(instance_examples, class_examples, resolution, center_crop, random_flip, seed, latent_cache)


def collate_examples(items: list[dict]) -> dict:
    """Stack a batch; class rows go after the instance rows, whose count is ``num_instance``.

    ``prompts`` are the captions of every row (y_T, then the class prompt), ``cat_prompts`` the CAT prompts y
    of the instance rows.
    """
    fields_ = ["pixel_values", "original_size", "crop_top_left", "prompt", "noise_seed"]
    rows = {name: [item[name] for item in items] for name in fields_}
    if "class_pixel_values" in items[0]:
        for name in fields_:
            rows[name] += [item[f"class_{name}"] for item in items]
    return {
        "pixel_values": torch.stack(rows["pixel_values"]).contiguous().float(),
        "original_sizes": torch.tensor(rows["original_size"], dtype=torch.int64),
        "crops_top_left": torch.tensor(rows["crop_top_left"], dtype=torch.int64),
        "prompts": rows["prompt"],
        "cat_prompts": [item["cat_prompt"] for item in items],
        "noise_seeds": torch.tensor(rows["noise_seed"], dtype=torch.int64),
        "num_instance": len(items),
    }


def prepare_class_examples(args: argparse.Namespace, family, accelerator, weight_dtype) -> list[Example]:
    """DreamBooth's class images: generate the missing ones with the base model, then list them all."""
    class_dir = Path(args.class_data_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    missing = args.num_class_images - len(list_images(class_dir))
    if missing > 0 and accelerator.is_main_process:
        pipeline = family.load_pipeline(dtype=weight_dtype).to(accelerator.device)
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(args.seed or 0)
        start = len(list_images(class_dir))
        logger.info(f"Generating {missing} class images for prior preservation in {class_dir}")
        for offset in tqdm(range(0, missing, args.sample_batch_size), desc="class images"):
            count = min(args.sample_batch_size, missing - offset)
            images = pipeline([args.class_prompt] * count, height=args.resolution, width=args.resolution,
                              generator=generator).images
            for number, image in enumerate(images):
                image.save(class_dir / f"class-{start + offset + number:05d}.png")
        del pipeline
    accelerator.wait_for_everyone()
    paths = list_images(class_dir)[: args.num_class_images]
    return [Example(path, args.class_prompt, args.class_prompt, str(path)) for path in paths]


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
    # Flux.1
    max_sequence_length: int = 512
    guidance_scale: float = 3.5
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    lora_layers: str | None = None
    bnb_quantization_config_path: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "FamilyConfig":
        return cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)})


def device_of(model) -> torch.device:
    return getattr(model, "module", model).device


def tokenize(tokenizer, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                     max_length=max_length or tokenizer.model_max_length).input_ids


class StableDiffusionFamily:
    """SD 1.x/2.x: one CLIP text encoder, a U-Net predicting the noise (or the velocity, SD 2.x 768)."""

    pipeline_class = StableDiffusionPipeline
    denoiser = "unet"
    text_encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)
    trainable_text_encoders = ("text_encoder",)  # what --train_text_encoder adapts
    kohya_layout = "sd"
    pipeline_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    validation_scheduler = DPMSolverMultistepScheduler
    loads_quantized = False  # whether --bnb_quantization_config_path applies

    def __init__(self, config: FamilyConfig):
        self.config = config
        self.source = {"pretrained_model_name_or_path": config.pretrained_model_name_or_path,
                       "revision": config.revision}
        self._tokenizers = None
        if config.bnb_quantization_config_path is not None and not self.loads_quantized:
            raise InputError(f"--bnb_quantization_config_path: a quantized base is supported for Flux.1 only, not "
                             f"{self.pipeline_class.__name__}")

    # Loading ------------------------------------------------------------------------------------------
    def load_tokenizers(self) -> dict:
        if self._tokenizers is None:
            self._tokenizers = {name: AutoTokenizer.from_pretrained(subfolder=name, **self.source)
                                for name in self.tokenizers}
        return self._tokenizers

    def load_text_encoders(self) -> dict:
        return {"text_encoder": CLIPTextModel.from_pretrained(subfolder="text_encoder", variant=self.config.variant,
                                                              **self.source)}

    def load_denoiser(self, weight_dtype=torch.float32):
        # Loaded in float32 and cast by prepare_models; only a quantized base needs the dtype at load time.
        return UNet2DConditionModel.from_pretrained(subfolder="unet", variant=self.config.variant, **self.source)

    def load_vae(self):
        return AutoencoderKL.from_pretrained(subfolder="vae", variant=self.config.variant, **self.source)

    def load_noise_scheduler(self):
        return DDPMScheduler.from_pretrained(subfolder="scheduler", **self.source)

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

    def lora_targets(self, component: str) -> list[str]:
        return UNET_ATTENTION_TARGETS if component == self.denoiser else CLIP_ATTENTION_TARGETS

    def load_pipeline(self, **components):
        """The family's inference pipeline from the base folder, with ``components`` (and ``torch_dtype``) given."""
        return self.pipeline_class.from_pretrained(
            variant=self.config.variant, **self.source, **self.pipeline_kwargs, **components)

    # Conditioning, noisy input, prediction -------------------------------------------------------------
    def encode_prompts(self, text_encoders: dict, prompts: list[str]) -> dict:
        """Prompts -> the denoiser's conditioning, every tensor batch-first."""
        text_encoder = text_encoders["text_encoder"]
        ids = tokenize(self.load_tokenizers()["tokenizer"], prompts).to(device_of(text_encoder))
        return {"encoder_hidden_states": text_encoder(ids, return_dict=False)[0]}

    def encode_latents(self, batch, vae, generators, weight_dtype):
        images = batch["pixel_values"].to(vae.device, dtype=vae.dtype)
        if images.shape[1] == 3:
            latent_dist = vae.encode(images).latent_dist
        else:  # --cache_latents: the batch holds the VAE posterior's parameters (mean and log-variance)
            latent_dist = DiagonalGaussianDistribution(images)
        return (latent_dist.sample(generator=generators) * vae.config.scaling_factor).to(weight_dtype)

    def noisy_latents(self, batch, vae, noise_scheduler, weight_dtype) -> dict:
        """z_t, t, the target and the per-sample loss weights: what every term of Eq. 3 shares.

        Each row draws from its own generator, seeded by the batch's ``noise_seeds``: a sample gets the same
        noise and timestep whatever batch, process or resumed run it lands in.
        """
        device = vae.device
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in batch["noise_seeds"]]
        latents = self.encode_latents(batch, vae, generators, weight_dtype)
        noise = randn_tensor(latents.shape, generator=generators, device=device, dtype=latents.dtype)
        if self.config.noise_offset:
            offset = randn_tensor(latents.shape[:2] + (1, 1), generator=generators, device=device, dtype=latents.dtype)
            noise = noise + self.config.noise_offset * offset
        timesteps = torch.cat([torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=g,
                                             device=device) for g in generators]).long()
        return {"noisy": noise_scheduler.add_noise(latents, noise, timesteps), "timesteps": timesteps,
                "target": self.target(noise_scheduler, latents, noise, timesteps),
                "loss_weights": self.min_snr_weights(noise_scheduler, timesteps)}

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

    def predict(self, unet, z: dict, cond: dict):
        return unet(z["noisy"], z["timesteps"], cond["encoder_hidden_states"], return_dict=False)[0]


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL: two CLIP text encoders (penultimate hidden states concatenated, pooled embedding from the second)
    and the size/crop micro-conditioning ``time_ids``, as diffusers' ``train_dreambooth_lora_sdxl.py``."""

    pipeline_class = StableDiffusionXLPipeline
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    kohya_layout = "sdxl"
    pipeline_kwargs = {"add_watermarker": False}

    def load_text_encoders(self) -> dict:
        return {**super().load_text_encoders(),
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                    subfolder="text_encoder_2", variant=self.config.variant, **self.source)}

    def load_vae(self):
        if self.config.pretrained_vae_model_name_or_path is None:
            return super().load_vae()
        return AutoencoderKL.from_pretrained(self.config.pretrained_vae_model_name_or_path)

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


class FluxFamily(StableDiffusionFamily):
    """Flux.1 as diffusers' ``train_dreambooth_lora_flux.py``: the CLIP pooled embedding and the T5 sequence,
    2x2-packed latents with their position ids, the rectified-flow target ``noise - latents`` with SD3's
    timestep densities and loss weights, and the guidance embedding of the guidance-distilled dev model."""

    pipeline_class = FluxPipeline
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    trainable_text_encoders = ("text_encoder",)  # CLIP; T5 stays frozen (as diffusers)
    kohya_layout = "flux"
    pipeline_kwargs = {}
    validation_scheduler = None  # the pipeline's own flow-matching scheduler
    loads_quantized = True

    def __init__(self, config: FamilyConfig):
        super().__init__(config)
        for flag, value in (("--snr_gamma", config.snr_gamma), ("--noise_offset", config.noise_offset or None)):
            if value is not None:
                raise InputError(f"{flag} is for Stable Diffusion's noise schedules; Flux's flow matching uses "
                                 "--weighting_scheme")
        self.quantization = read_quantization_config(config.bnb_quantization_config_path)

    # Loading ------------------------------------------------------------------------------------------
    def load_tokenizers(self) -> dict:
        tokenizers = super().load_tokenizers()
        # T5 reads --max_sequence_length tokens: the caption-length checks measure against that limit.
        tokenizers["tokenizer_2"].model_max_length = self.config.max_sequence_length
        return tokenizers

    def load_text_encoders(self) -> dict:
        variant = self.config.variant
        return {"text_encoder": CLIPTextModel.from_pretrained(subfolder="text_encoder", variant=variant, **self.source),
                "text_encoder_2": T5EncoderModel.from_pretrained(subfolder="text_encoder_2", variant=variant,
                                                                 **self.source)}

    def load_denoiser(self, weight_dtype=torch.float32):
        if self.quantization is None:
            return FluxTransformer2DModel.from_pretrained(subfolder="transformer", variant=self.config.variant,
                                                          **self.source)
        options = dict(self.quantization)
        if options.get("load_in_4bit"):
            options["bnb_4bit_compute_dtype"] = weight_dtype  # as diffusers' Flux scripts
        try:
            transformer = FluxTransformer2DModel.from_pretrained(
                subfolder="transformer", variant=self.config.variant, quantization_config=BitsAndBytesConfig(**options),
                torch_dtype=weight_dtype, **self.source)
        except (RuntimeError, ImportError) as error:  # e.g. diffusers' "No GPU found. A GPU is needed for ..."
            raise InputError(f"--bnb_quantization_config_path {self.config.bnb_quantization_config_path}: "
                             f"{str(error).strip().splitlines()[0]}") from None
        return self.prepare_quantized(transformer)

    @staticmethod
    def prepare_quantized(transformer):
        """peft's preparation of a k-bit base (frozen, non-quantized parameters upcast), as diffusers does."""
        return prepare_model_for_kbit_training(transformer, use_gradient_checkpointing=False)

    def load_noise_scheduler(self):
        return FlowMatchEulerDiscreteScheduler.from_pretrained(subfolder="scheduler", **self.source)

    def lora_targets(self, component: str) -> list[str]:
        if component != self.denoiser:
            return CLIP_ATTENTION_TARGETS
        if self.config.lora_layers:
            return [layer.strip() for layer in self.config.lora_layers.split(",") if layer.strip()]
        return FLUX_TRANSFORMER_TARGETS

    # Conditioning, noisy input, prediction -------------------------------------------------------------
    def encode_prompts(self, text_encoders: dict, prompts: list[str]) -> dict:
        """CLIP's pooled output and T5's last hidden states of the same prompts (both read the same y)."""
        tokenizers = self.load_tokenizers()
        clip, t5 = text_encoders["text_encoder"], text_encoders["text_encoder_2"]
        clip_ids = tokenize(tokenizers["tokenizer"], prompts).to(device_of(clip))
        t5_ids = tokenize(tokenizers["tokenizer_2"], prompts, self.config.max_sequence_length).to(device_of(t5))
        return {"encoder_hidden_states": t5(t5_ids, return_dict=False)[0],
                "pooled_projections": clip(clip_ids, output_hidden_states=False).pooler_output}

    def encode_latents(self, batch, vae, generators, weight_dtype):
        images = batch["pixel_values"].to(vae.device, dtype=vae.dtype)
        if images.shape[1] == 3:
            latent_dist = vae.encode(images).latent_dist
        else:  # --cache_latents: the VAE posterior's parameters
            latent_dist = DiagonalGaussianDistribution(images)
        latents = latent_dist.sample(generator=generators)
        return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).to(weight_dtype)

    def noisy_latents(self, batch, vae, noise_scheduler, weight_dtype) -> dict:
        """Rectified flow: z_t = (1 - sigma) x + sigma noise, target noise - x; latents stay unpacked here
        (``predict`` packs them), so the target, the loss and the CAT term compare images, not token orders.

        As for SD, each row draws its latent sample, noise and timestep density from its own generator.
        """
        config, device = self.config, vae.device
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in batch["noise_seeds"]]
        latents = self.encode_latents(batch, vae, generators, weight_dtype)
        noise = randn_tensor(latents.shape, generator=generators, device=device, dtype=latents.dtype)
        u = torch.cat([compute_density_for_timestep_sampling(
            weighting_scheme=config.weighting_scheme, batch_size=1, logit_mean=config.logit_mean,
            logit_std=config.logit_std, mode_scale=config.mode_scale, device=device, generator=g) for g in generators])
        indices = (u * noise_scheduler.config.num_train_timesteps).long().cpu()
        timesteps = noise_scheduler.timesteps[indices].to(device)
        sigmas = noise_scheduler.sigmas[indices].to(device, dtype=latents.dtype)
        sigmas_ = sigmas.reshape(-1, 1, 1, 1)
        return {"noisy": (1.0 - sigmas_) * latents + sigmas_ * noise, "timesteps": timesteps,
                "target": noise - latents,
                "loss_weights": compute_loss_weighting_for_sd3(weighting_scheme=config.weighting_scheme, sigmas=sigmas)}

    def predict(self, transformer, z: dict, cond: dict):
        """Pack z_t into 2x2 patches with their image ids, run the transformer, unpack to the latents' shape."""
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


FAMILIES = {
    "StableDiffusionPipeline": StableDiffusionFamily,
    "StableDiffusionXLPipeline": StableDiffusionXLFamily,
    "FluxPipeline": FluxFamily,
}


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


def adapted_components(family, train_text_encoder: bool) -> list[str]:
    """The pipeline components that carry trainable LoRA layers: the denoiser, and the text encoders if asked."""
    return [family.denoiser] + (list(family.trainable_text_encoders) if train_text_encoder else [])


def add_lora_adapters(family, models: dict, rank: int, lora_alpha: float, train_text_encoder: bool) -> None:
    """Attach peft LoRA adapters; their up-projections start at zero, so step 0 is the base model."""
    for component in adapted_components(family, train_text_encoder):
        models[component].add_adapter(LoraConfig(r=rank, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                                                 target_modules=family.lora_targets(component)))


class adapters_disabled:
    """Context manager: run the wrapped models as the frozen base model (peft adapters bypassed).

    With adapters disabled peft's LoRA layers call only their base layer, so the frozen pass computes no
    low-rank branch at all.
    """

    def __init__(self, *models):
        # Under several processes the models arrive wrapped (DistributedDataParallel): reach the peft model.
        models = [getattr(model, "module", model) for model in models]
        self.models = [model for model in models if getattr(model, "peft_config", None)]

    def __enter__(self):
        for model in self.models:
            model.disable_adapters()

    def __exit__(self, *exc):
        for model in self.models:
            model.enable_adapters()


def has_adapters(model) -> bool:
    return bool(getattr(getattr(model, "module", model), "peft_config", None))


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


def encode_latent_cache(family, vae, examples: list[Example], resolution: int, batch_size: int) -> dict:
    """--cache_latents: VAE posterior parameters, original size and crop of every (center-cropped) image."""
    cache = {}
    unique = list({example.name: example for example in examples}.values())
    with torch.no_grad():
        for start in tqdm(range(0, len(unique), batch_size), desc="Caching latents"):
            chunk = unique[start:start + batch_size]
            augmented = [augment(open_rgb_image(e.image, e.name), resolution, True, False, None) for e in chunk]
            pixels = torch.stack([pixels for pixels, _, _ in augmented]).to(vae.device, dtype=vae.dtype)
            parameters = vae.encode(pixels).latent_dist.parameters.cpu()
            cache.update({e.name: (p, size, crop) for e, p, (_, size, crop) in zip(chunk, parameters, augmented)})
    return cache


# ---------------------------------------------------------------------------------------------------------
# 5. Loss
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


@dataclass(frozen=True)
class StepConfig:
    """The options of one training step."""

    cat_alpha: float = 1.0
    cat_mode: str = "lean"  # "lean" or "batched": same gradients, see training_step
    prior_loss_weight: float = 0.0
    weight_dtype: torch.dtype = torch.float32

    @classmethod
    def from_args(cls, args: argparse.Namespace, weight_dtype) -> "StepConfig":
        return cls(args.cat_alpha, args.cat_mode, args.prior_loss_weight if args.with_prior_preservation else 0.0,
                   weight_dtype)


def training_step(batch, family, models: dict, encode_prompts, config: StepConfig, backward) -> dict:
    """Compute one batch's losses and ``backward`` them; return the detached parts for logging.

    Rows ``[:num_instance]`` of the batch are subject images with captions y_T, the rest class images (prior
    preservation). The CAT term uses the subject rows with their trigger-less prompts y, on the same noisy
    latents, timesteps (and any other conditioning of the sample) as the diffusion term (Eq. 3). ``cat_mode``
    trades memory for speed, with the same gradients: ``lean`` backwards the diffusion term before the CAT
    passes run, so their activations are never alive together; ``batched`` runs both adapted passes (y_T and
    y) as one denoiser call and one backward.
    """
    denoiser = models[family.denoiser]
    z = family.noisy_latents(batch, models["vae"], models["noise_scheduler"], config.weight_dtype)
    n, batch_size = batch["num_instance"], z["noisy"].shape[0]
    cond = encode_prompts(batch["prompts"])
    use_cat = config.cat_alpha > 0
    if use_cat and config.cat_mode == "batched":
        cat_cond = encode_prompts(batch["cat_prompts"])
        preds = family.predict(denoiser, join_rows(z, take_rows(z, 0, n)), join_rows(cond, cat_cond))
        model_pred, adapted_pred = preds[:batch_size], preds[batch_size:]
    else:
        model_pred = family.predict(denoiser, z, cond)

    instance, classes = take_rows(z, 0, n), take_rows(z, n)
    loss_diffusion = diffusion_loss(model_pred[:n], instance["target"], instance["loss_weights"])
    loss_prior = torch.zeros((), device=model_pred.device)
    if n < batch_size:
        loss_prior = diffusion_loss(model_pred[n:], classes["target"], classes["loss_weights"])
    loss = loss_diffusion + config.prior_loss_weight * loss_prior
    loss_cat = torch.zeros((), device=model_pred.device)
    if use_cat:
        if config.cat_mode == "lean":
            backward(loss)  # frees the diffusion graph before the CAT passes build theirs
            cat_cond = encode_prompts(batch["cat_prompts"])
            adapted_pred = family.predict(denoiser, instance, cat_cond)
            loss = torch.zeros((), device=model_pred.device)
        frozen_cond = encode_prompts.frozen(batch["cat_prompts"]) if encode_prompts.adapted else cat_cond
        frozen_pred = frozen_prediction(family, denoiser, instance, frozen_cond)
        loss_cat = cat_loss(adapted_pred, frozen_pred)
        loss = loss + config.cat_alpha * loss_cat
    backward(loss)
    total = loss_diffusion + config.prior_loss_weight * loss_prior + config.cat_alpha * loss_cat
    return {"loss": total.detach(), "diffusion": loss_diffusion.detach(), "prior": loss_prior.detach(),
            "cat": loss_cat.detach()}


# ---------------------------------------------------------------------------------------------------------
# 6. Training loop: accelerator, optimizer, checkpoints, validation
# ---------------------------------------------------------------------------------------------------------


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


def weight_dtype_for(accelerator):
    """Frozen weights are held in the mixed-precision dtype; trainable LoRA weights stay in float32."""

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_optimizer(args: argparse.Namespace, parameters, learning_rate: float):

    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise InputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(parameters, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def peft_state_dicts(accelerator, family, models: dict, train_text_encoder: bool) -> dict:
    """The trained LoRA weights in peft's naming, per pipeline component (``{"unet": ..., "text_encoder": ...}``)."""
    return {name: get_peft_model_state_dict(accelerator.unwrap_model(models[name]))
            for name in adapted_components(family, train_text_encoder)}


def lora_state_dicts(accelerator, family, models: dict, train_text_encoder: bool) -> dict:
    """Keyword arguments for the family pipeline's ``save_lora_weights``: layers and their peft metadata."""
    peft_states = peft_state_dicts(accelerator, family, models, train_text_encoder)
    layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(state) for name, state in peft_states.items()}
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


def register_checkpoint_hooks(accelerator, family, models: dict, train_text_encoder: bool) -> None:
    """Make ``accelerator.save_state``/``load_state`` store only the LoRA weights, not the whole base model."""
    components = adapted_components(family, train_text_encoder)

    def save_hook(prepared, weights, output_dir):
        if accelerator.is_main_process:
            family.pipeline_class.save_lora_weights(
                output_dir, **lora_state_dicts(accelerator, family, models, train_text_encoder))
        weights.clear()  # accelerate would otherwise also save every full model

    def load_hook(prepared, input_dir):
        prepared.clear()
        load_lora_checkpoint(Path(input_dir), family, models, components)
        if accelerator.mixed_precision in ("fp16", "bf16"):
            cast_training_params([accelerator.unwrap_model(models[name]) for name in components])

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
# Validation metric: the Knowledge Preservation Score (paper §3, Eqs. 8-11). evaluate_kps.py imports these
# functions from here, so the training-time number and the evaluation script's can never drift apart.
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


def validation_prompts(prompt: str, triggers: list[str]) -> tuple[str, str]:
    """The validation prompt and its trigger-less twin (every trigger of every concept stripped)."""
    without = prompt
    for trigger in triggers:
        without = strip_trigger(without, trigger)
    return prompt, without


def run_validation(accelerator, args: argparse.Namespace, family, models: dict, triggers, step: int, weight_dtype,
                   clip: Clip | None = None) -> Path | None:
    """Draw the validation prompt with and without its trigger (same seeds) and save both rows as one PNG."""
    if not accelerator.is_main_process:
        return None
    with_trigger, without_trigger = validation_prompts(args.validation_prompt, triggers)
    # Text encoders freed after --pre_compute_text_embeddings are absent: the pipeline reloads them.
    components = {name: accelerator.unwrap_model(models[name])
                  for name in (family.denoiser, "vae", *family.text_encoders) if name in models}
    pipeline = family.load_pipeline(**components, **family.load_tokenizers(), dtype=weight_dtype)
    pipeline.to(accelerator.device)  # a no-op for the components passed in
    if family.validation_scheduler is not None:
        pipeline.scheduler = family.validation_scheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    rows = []
    for prompt in (with_trigger, without_trigger):
        generators = [torch.Generator(device="cpu").manual_seed((args.seed or 0) + i)
                      for i in range(args.num_validation_images)]
        with torch.no_grad():
            rows.append(pipeline([prompt] * args.num_validation_images, generator=generators,
                                 num_inference_steps=args.num_validation_inference_steps,
                                 height=args.resolution, width=args.resolution).images)
    if clip is not None:
        kps, clamped = knowledge_preservation_score(clip_image_embeddings(clip, rows[0]),
                                                    clip_image_embeddings(clip, rows[1]))
        accelerator.log({"validation/kps": kps, "validation/s_prev_harmonic_mean": 1.0 - kps,
                         "validation/kps_clamped": clamped}, step=step)
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
    logger.info(f"Validation grid (top: {with_trigger!r}, bottom: {without_trigger!r}): {path}")
    del pipeline
    return path


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


def train(accelerator, args: argparse.Namespace, family, models: dict, encode_prompts, dataloader, sampler,
          optimizer, lr_scheduler, first_step: int, max_train_steps: int, triggers: list[str], weight_dtype
          ) -> tuple[int, Path | None]:
    """Run the optimizer steps from ``first_step`` to ``max_train_steps``; return (last step, last grid)."""
    adapted = [models[name] for name in adapted_components(family, args.train_text_encoder)]
    trainable = [p for model in adapted for p in model.parameters() if p.requires_grad]
    step_config = StepConfig.from_args(args, weight_dtype)
    num_epochs = math.ceil(max_train_steps / math.ceil(len(dataloader) / args.gradient_accumulation_steps))
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    step = first_step
    first_epoch = first_step // steps_per_epoch
    batches_to_skip = (first_step % steps_per_epoch) * args.gradient_accumulation_steps
    last_grid = None
    progress = tqdm(range(max_train_steps), initial=first_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    output_dir = Path(args.output_dir)
    with StopSignals() as stop, progress:
        for epoch in range(first_epoch, num_epochs):
            for model in adapted:
                model.train()
            batches = dataloader
            if epoch == first_epoch and batches_to_skip:
                batches = accelerator.skip_first_batches(dataloader, batches_to_skip)
            # accelerate's loaders pass their own epoch counter (which restarts at 0 in a resumed process) to the
            # sampler when iterated: set it on the loader itself, not only on the sampler.
            sampler.set_epoch(epoch)
            if hasattr(batches, "set_epoch"):
                batches.set_epoch(epoch)
            for batch in batches:
                with accelerator.accumulate(*adapted):
                    losses = training_step(batch, family, models, encode_prompts, step_config,
                                           backward=accelerator.backward)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                step += 1
                progress.update(1)
                logs = {f"loss/{name}": accelerator.reduce(value.detach(), reduction="mean").item()
                        for name, value in losses.items()}
                logs["lr"] = lr_scheduler.get_last_lr()[0]
                accelerator.log(logs, step=step)
                progress.set_postfix(loss=f"{logs['loss/loss']:.4f}", cat=f"{logs['loss/cat']:.2e}")
                checkpoint = None
                if step % args.checkpointing_steps == 0 and step < max_train_steps:
                    checkpoint = save_checkpoint(accelerator, output_dir, step, args.checkpoints_total_limit)
                if args.validation_prompt and (step % args.validation_steps == 0 or step == max_train_steps):
                    last_grid = run_validation(accelerator, args, family, models, triggers, step, weight_dtype,
                                               models.get("clip")) or last_grid
                if step < max_train_steps and stop_requested(accelerator, stop):
                    checkpoint = checkpoint or save_checkpoint(accelerator, output_dir, step,
                                                               args.checkpoints_total_limit)
                    raise TrainingInterrupted(stop.received or signal.SIGTERM, step, checkpoint)
                if step >= max_train_steps:
                    break
            if step >= max_train_steps:
                break
    return step, last_grid


# ---------------------------------------------------------------------------------------------------------
# 7. Save
# ---------------------------------------------------------------------------------------------------------


def save_kohya_weights(output_dir: Path, peft_states: dict, lora_alpha: float) -> Path:
    """Write ``pytorch_lora_weights_kohya.safetensors`` (AUTOMATIC1111 / ComfyUI key names)."""

    prefixed = {f"{component}.{key}": value for component, state in peft_states.items() for key, value in state.items()}
    fixed = {}
    for key, value in convert_state_dict_to_kohya(prefixed).items():
        # diffusers writes "lora_te1_" (SDXL's first encoder); SD 1.x/2.x loaders expect "lora_te_".
        key = key.replace("lora_te1_", "lora_te_")
        if key.endswith(".alpha"):
            value = torch.tensor(float(lora_alpha))  # the converter assumes alpha == rank
        fixed[key] = value.contiguous()
    path = output_dir / "pytorch_lora_weights_kohya.safetensors"
    save_file(fixed, path)
    return path


def write_model_card(args: argparse.Namespace, family, concepts: list[Concept], steps: int, grid: Path | None
                     ) -> Path:
    """``README.md`` in the output folder: base model, triggers, CAT settings, steps and the last grid."""

    output_dir = Path(args.output_dir)
    triggers = ", ".join(f"`{c.trigger_token}`" for c in concepts if c.trigger_token) or "none"
    lines = [
        f"# CAT-LoRA for {args.pretrained_model_name_or_path}",
        "",
        "LoRA weights trained with Contrastive Adapter Training (CAT, arXiv 2404.07554, Eq. 3) by "
        "`train_cat_lora.py`.",
        "",
        f"- Base model: `{args.pretrained_model_name_or_path}`",
        f"- Trigger(s): {triggers}",
        f"- CAT alpha: {args.cat_alpha}; CAT prompt mode: `{args.cat_prompt}`"
        + (f" (class word `{args.cat_class_word}`)" if args.cat_prompt == "class" and args.cat_class_word else ""),
        f"- LoRA rank {args.rank}, alpha {args.lora_alpha}; text encoder trained: {args.train_text_encoder}",
        f"- Steps: {steps}; learning rate {args.learning_rate}; batch size {args.train_batch_size}; "
        f"resolution {args.resolution}; prior preservation: {args.with_prior_preservation}",
    ]
    if grid is not None:
        relative = grid.relative_to(output_dir).as_posix()
        lines += ["", "Last validation (top: with the trigger, bottom: without, same seeds):",
                  "", f"![validation]({relative})"]
    pipeline = family.pipeline_class.__name__
    lines += ["", "```python", f"from diffusers import {pipeline}", "",
              f'pipe = {pipeline}.from_pretrained("{args.pretrained_model_name_or_path}")',
              'pipe.load_lora_weights("path/to/this/folder")', "```"]
    card = load_or_create_model_card(
        repo_id_or_path=args.hub_model_id or output_dir.name, from_training=True, license="creativeml-openrail-m",
        base_model=args.pretrained_model_name_or_path, prompt=args.instance_prompt or args.validation_prompt,
        model_description="\n".join(lines), inference=True,
    )
    family_tag = {"sd": "stable-diffusion", "sdxl": "stable-diffusion-xl", "flux": "flux"}[family.kohya_layout]
    card = populate_model_card(card, tags=["text-to-image", family_tag, "lora", "diffusers", "cat-lora",
                                           "template:sd-lora"])
    path = output_dir / "README.md"
    card.save(str(path))
    return path


def save_final_weights(accelerator, args, family, models: dict, concepts, steps, grid) -> list[Path]:
    output_dir = Path(args.output_dir)
    family.pipeline_class.save_lora_weights(
        output_dir, **lora_state_dicts(accelerator, family, models, args.train_text_encoder))
    written = [output_dir / "pytorch_lora_weights.safetensors"]
    if args.output_kohya_format:
        peft_states = peft_state_dicts(accelerator, family, models, args.train_text_encoder)
        written.append(save_kohya_weights(output_dir, peft_states, args.lora_alpha))
    written.append(write_model_card(args, family, concepts, steps, grid))
    return written


# ---------------------------------------------------------------------------------------------------------
# main: the steps above in order
# ---------------------------------------------------------------------------------------------------------


def check_inputs(args: argparse.Namespace):
    """Step 1: everything that can be checked without loading a model: the model family (from its
    ``model_index.json``), the concepts, examples and data notes."""
    family = model_family(args)
    concepts = load_concepts(args)
    data_notes = {}
    instance_examples = collect_instance_examples(args, concepts, data_notes)
    if args.with_prior_preservation:
        check_class_images(Path(args.class_data_dir), args.num_class_images, args.resolution, data_notes)
    check_validation_prompt(args.validation_prompt, args.cat_alpha, concepts)
    if args.validation_kps:
        resolve_clip_choice(args.validation_clip_model, args.validation_clip_pretrained, CLIP_FLAGS)
    check_output_dir(Path(args.output_dir))
    return family, concepts, instance_examples, data_notes


def check_prompts(family, triggers: list[str], instance_examples: list[Example], data_notes: dict) -> None:
    """Step 2b: the checks that need only the tokenizers (rare triggers, captions within the length limit)."""
    tokenizers = family.load_tokenizers()
    warn_about_triggers(tokenizers[family.tokenizers[0]], triggers)
    for name in family.tokenizers:
        check_caption_lengths(tokenizers[name], instance_examples, data_notes)
    for line in summarize_notes(data_notes):
        logger.warning(line)


def prepare_models(args: argparse.Namespace, family, accelerator, weight_dtype) -> dict:
    """Step 3: the frozen base model in ``weight_dtype`` with trainable float32 LoRA adapters attached."""
    models = family.load_models(weight_dtype)
    for name, model in models.items():
        if name == "noise_scheduler":
            continue
        if getattr(model, "is_quantized", False):  # a quantized base cannot be cast; it only moves
            model.to(accelerator.device)
        else:
            model.to(accelerator.device, dtype=family.vae_dtype(weight_dtype) if name == "vae" else weight_dtype)
    add_lora_adapters(family, models, args.rank, args.lora_alpha, args.train_text_encoder)
    adapted = [models[name] for name in adapted_components(family, args.train_text_encoder)]
    if args.gradient_checkpointing:
        models[family.denoiser].enable_gradient_checkpointing()
        for model in adapted[1:]:
            model.gradient_checkpointing_enable()
    if weight_dtype != torch.float32:
        cast_training_params(adapted, dtype=torch.float32)
    return models


def make_dataloader(args: argparse.Namespace, family, models: dict, instance_examples, class_examples, seed: int):
    """Step 4: the dataloader (with its sampler) and, when asked, the cached prompt conditioning."""
    latent_cache = None
    if args.cache_latents:
        latent_cache = encode_latent_cache(family, models["vae"], instance_examples + class_examples,
                                           args.resolution, args.train_batch_size)
    cached_prompts = None
    if args.pre_compute_text_embeddings:
        prompts = [e.caption for e in instance_examples + class_examples] + [e.cat_caption for e in instance_examples]
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
    dataset = make_dataset(instance_examples, class_examples, args.resolution, args.center_crop, args.random_flip,
                           seed, latent_cache)
    sampler = EpochShuffleSampler(len(dataset), seed)
    # A private generator: creating a dataloader iterator draws a seed from it, which must not shift the global
    # random stream (a resumed run creates its iterator at another point).
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                             collate_fn=collate_examples, num_workers=args.dataloader_num_workers,
                                             generator=torch.Generator().manual_seed(seed))
    return dataloader, sampler, cached_prompts


def make_optimizer_and_schedule(args: argparse.Namespace, family, accelerator, models: dict, num_batches: int):
    """Step 5: AdamW (or 8-bit AdamW) over the LoRA parameters and the lr schedule; returns the step count too."""
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    trainable = [p for name in adapted_components(family, args.train_text_encoder)
                 for p in models[name].parameters() if p.requires_grad]
    optimizer = make_optimizer(args, trainable, learning_rate)
    steps_per_epoch = math.ceil(num_batches / accelerator.num_processes / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes, num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    return optimizer, lr_scheduler, max_train_steps


def main(argv=None) -> list[Path]:
    """Train; return the files written. Raises ``InputError`` for bad input, before writing anything."""
    args = parse_args(argv)
    family, concepts, instance_examples, data_notes = check_inputs(args)
    triggers = sorted({c.trigger_token for c in concepts if c.trigger_token})

    # Step 2: processes, seed, precision; then the checks that need only the tokenizers.
    accelerator = make_accelerator(args)
    seed = args.seed if args.seed is not None else 0
    set_seed(seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = weight_dtype_for(accelerator)
    check_prompts(family, triggers, instance_examples, data_notes)

    models = prepare_models(args, family, accelerator, weight_dtype)
    class_examples = []
    if args.with_prior_preservation:
        class_examples = prepare_class_examples(args, family, accelerator, weight_dtype)
        if not class_examples:
            raise InputError(f"--class_data_dir {args.class_data_dir}: no class images")
    dataloader, sampler, cached_prompts = make_dataloader(args, family, models, instance_examples, class_examples,
                                                          seed)
    optimizer, lr_scheduler, max_train_steps = make_optimizer_and_schedule(args, family, accelerator, models,
                                                                           len(dataloader))

    # Step 6: wrap for the processes, resume, train.
    to_prepare = adapted_components(family, args.train_text_encoder)
    *prepared, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        *(models[name] for name in to_prepare), optimizer, dataloader, lr_scheduler)
    models.update(zip(to_prepare, prepared))
    # Prompts go through the prepared (possibly DDP-wrapped) text encoders, or the cache.
    encode_prompts = cached_prompts or PromptEncoder(family, {name: models[name] for name in family.text_encoders})
    register_checkpoint_hooks(accelerator, family, models, args.train_text_encoder)
    if accelerator.is_main_process:
        accelerator.init_trackers("cat-lora", config=tracker_config(args))
    logger.info(f"{family.pipeline_class.__name__}: {len(instance_examples)} images of {len(concepts)} concept(s), "
                f"triggers {triggers}, CAT alpha {args.cat_alpha} ({args.cat_prompt}), {max_train_steps} steps")
    first_step = resume_checkpoint(accelerator, args)
    if args.validation_kps and accelerator.is_main_process:
        models["clip"] = load_clip(args.validation_clip_model, args.validation_clip_pretrained, accelerator.device,
                                   CLIP_FLAGS)
    try:
        steps, grid = train(accelerator, args, family, models, encode_prompts, dataloader, sampler, optimizer,
                            lr_scheduler, first_step, max_train_steps, triggers, weight_dtype)
    except (TrainingInterrupted, SaveFailed):
        accelerator.end_training()
        raise

    # Step 7: save (main process only).
    accelerator.wait_for_everyone()
    written = []
    if accelerator.is_main_process:
        written = save_final_weights(accelerator, args, family, models, concepts, steps, grid)
        if args.push_to_hub:
            push_to_hub(args)
        for path in written:
            print(f"wrote {path}")
    accelerator.end_training()
    return written


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
