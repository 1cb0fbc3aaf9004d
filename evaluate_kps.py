#!/usr/bin/env python
# Copyright 2026 The CAT-LoRA authors. Licensed under the Apache License, Version 2.0.
"""Score personalized Stable Diffusion LoRAs with CAT's metrics (PS, IS, KPS) and the field's standard ones.

CAT (Park et al., "Contrastive Adapter Training for Personalized Image Generation", arXiv 2404.07554, §3)
evaluates an adapter on items i = (reference image of the subject, caption y_T naming it with the trigger).
y is y_T with the trigger removed as a whole word (``strip_trigger``, the same rule as training) and the
prompt P is y. With the adapter applied and the same seed and settings for both, the model draws I(y_T) and
I(y). SC is cosine similarity (Eq. 10) and H the harmonic mean (Eq. 11):

  s_prompt_i = SC(CLIP_text(P_i), CLIP_img(I(y_T)_i))          PS  = H(s_prompt)        (Eqs. 4, 5)
  s_id_i     = SC(CLIP_img(reference_i), CLIP_img(I(y_T)_i))   IS  = H(s_id)            (Eqs. 6, 7)
  s_prev_i   = SC(CLIP_img(I(y)_i), CLIP_img(I(y_T)_i))        KPS = 1 - H(s_prev)      (Eqs. 8, 9)

PS, IS and KPS use raw cosines (no CLIPScore rescaling). KPS measures one thing: how far apart, in CLIP
image space, the two same-seed pictures I(y_T) and I(y) are (0 when they are identical, higher as they
differ). The paper reads a low KPS as leakage: an adapter that draws the subject whether or not the trigger
is in the prompt. A high KPS does not show that I(y) still looks like what the base model draws for y (an
adapter that damages trigger-less prompts in some other way scores high too), nor that I(y_T) shows the
subject (that is IS). The base model's own KPS (--lora base=none) is a useful reference: how much the
trigger word alone changes the base model's pictures.
The harmonic mean of values <= 0 is undefined: such values are clamped to 1e-6, a warning is printed,
metrics.json records how many were clamped per metric, and the table marks the affected PS/IS/KPS cells
with '*' (one clamped value pulls the harmonic mean down to about n * 1e-6, so such a cell only says that
some cosine was <= 0; read the arithmetic-mean column beside it).
PS_mean, IS_mean and KPS_mean (= 1 - mean(s_prev)) are the arithmetic-mean twins.

The standard personalization metrics (DreamBooth, Ruiz et al. 2023; Custom Diffusion, Kumari et al. 2023):

  CLIP-T  mean SC(CLIP_text(P_i), CLIP_img(I(y_T)_i)): prompt fidelity, the prompt without the trigger
          (numerically the same as PS_mean).
  CLIP-I  mean SC(CLIP_img(g), CLIP_img(r)) over all pairs of generated images g = I(y_T) and reference
          images r of the evaluation set (DreamBooth's pairwise definition; IS_mean is the per-item one).
  DINO    the same pairwise mean with DINO ViT-S/16 CLS-token embeddings (--dino_model). Images are
          prepared as in DINO's and DreamBooth's evaluation: the shorter side resized (bicubic) to 256/224 of
          the model's input size, a center crop of the input size (256 -> 224 for ViT-S/16), then the
          model's image processor normalizes (ImageNet mean/std) without resizing again.
  PRES    DreamBooth's prior-preservation metric: the pairwise DINO mean between the images drawn from the
          class prompt without the trigger, I(y), and the reference images. Lower = less subject leakage.
  CLIP-I masked   (with --masks or --segmenter) CLIP-I on images whose background is removed, as CatVersion
          (Zhao et al. 2023) evaluates: every pixel outside the subject's mask is set to gray (128, 128, 128),
          in the references and in I(y_T), so that backgrounds do not count. Masks come from
          --masks DIR (files) or --segmenter border (for solid backgrounds, as in the toy world).

  ID rate, ID score   (toy world, --subject_judge toyworld) the share of images with the trigger that
          examples/toyworld/judge.py judges to show the subject (its shape, colors and pattern re-rendered where
          it fits best), and the mean of its score in [0, 1] (shape fit x pattern fit).
  Δpx base, same as base   (with --subject_judge and a base entry: the adapter NAME=none, or the one named
          base in folder mode) how far each adapter's images without the trigger moved from the base model's
          at the same seed and prompt: the mean absolute pixel change (0..1), and the share of pairs in which
          the judge reads the same shape, color, size and background.
Drift on prompts unlike the captions (--unrelated_prompts FILE, generate mode; one trigger-less prompt a line): the
base model and each adapter draw every prompt at the same seeds (prompt i, image k: seed + i * n + k), and per adapter

  unrelated cos   mean SC(CLIP_img(I_adapter), CLIP_img(I_base)) over those same-seed pairs (1 = unchanged)
  unrelated Δpx   mean |I_adapter - I_base| over pixels and channels, in [0, 1] (0 = unchanged)

go into metrics.json and the table, the images into unrelated/ with unrelated.jsonl, and unrelated.png shows one
row per model, one column per prompt (its first image).

Two modes:

  generate  --pretrained_model_name_or_path BASE --lora NAME=PATH [--lora ...] and an evaluation set from
            --eval_data_dir DIR (images with captions, the formats training accepts: metadata.jsonl with
            file_name/text, a .txt per image, or --instance_prompt for all) or --eval_prompts FILE.jsonl
            (lines {"caption": "a photo of sks teapot", "reference": "ref/0.png"}, paths relative to FILE).
            PATH is a training output folder (with pytorch_lora_weights.safetensors, and/or the
            <folder>_emb.safetensors of pivotal tuning or textual inversion: then y_T is prompted with the new
            tokens <s0><s1>... in place of the trigger, as the adapter's model card says) or a weights file;
            NAME=none evaluates the base model. The base pipeline is loaded once; adapters are swapped.
            Sample j of every adapter uses seed + j for both prompts. Runs under ``accelerate launch``
            (or torchrun) too: generation is split between processes, the main process scores and writes.
            The images are saved with a pairs.jsonl so the scores can be recomputed in folder mode.
  folder    --pairs FILE.jsonl, images already generated; one line per sample:
            {"adapter": "cat", "caption": "a photo of sks teapot", "reference": "ref/0.png",
             "with_trigger": "cat/0_T.png", "without_trigger": "cat/0.png"}   (paths relative to FILE)

Outputs in --output_dir: metrics.json, per_sample.csv, table.md, grid_<adapter>.png (one row per sample:
reference | with trigger | without trigger), comparison.png (one row per adapter: its first 8 images with the
trigger | the same samples without it), with masks masked_<adapter>.png (masked reference | masked image with the
trigger); the table is printed at the end.

The math (prompt_similarity, identity_similarity, paper_metrics, mean_pairwise_similarity) and the model
helpers (clip_text_embeddings, dino_embeddings, paper_scores) are defined here. cosine_similarity,
harmonic_mean, knowledge_preservation_score, load_clip and clip_image_embeddings are defined in
train_cat_lora.py (which must stay a single self-contained file, and whose --validation_kps uses them) and
imported from there, so training and evaluation share one definition; all are importable from this module.
"""

import argparse
import csv
import json
import logging
import math
import os
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import diffusers
import numpy as np
import open_clip
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from diffusers.utils import logging as diffusers_logging
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file as load_safetensors
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModel

from train_cat_lora import (  # one definition of the trigger rule and of the metric math, shared with training
    CATVERSION_WEIGHT_NAME,
    CLAMP_MIN,
    Clip,
    InputError,
    adapters_disabled,
    clip_image_embeddings,
    contains_trigger,
    cosine_similarity,
    harmonic_mean,
    knowledge_preservation_score,
    load_clip,
    load_catversion,
    load_image_caption_pairs,
    model_family,
    relative_drift,
    replace_trigger,
    resolve_clip_choice,
    strip_trigger,
    unload_catversion,
    use_cpu_processes,
)

logger = logging.getLogger("evaluate_kps")

PROG = "evaluate_kps.py"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Keys of LoRA matrices in the file formats diffusers reads (peft, diffusers, kohya); alphas are not matrices.
LORA_MATRIX_KEY = re.compile(r"(lora[._](A|B|down|up)|lora_(down|up))(\.[^.]+)?\.weight$")
# CLIP-I masked: what replaces the background. CatVersion's repository reads images whose background was removed
# elsewhere (its segmenter and fill are not published); mid-gray is a neutral constant, the same for every image.
MASK_FILL = (128, 128, 128)
# The border segmenter: a pixel can be subject only when some channel differs from the background color by more than
# this (out of 255): above generation noise, and below half the contrast of every toy-world color on its backgrounds.
BORDER_TOLERANCE = 48


# ---------------------------------------------------------------------------------------------------------
# The math not needed by training (pure functions on embeddings). cosine_similarity, harmonic_mean and
# knowledge_preservation_score are imported above from train_cat_lora.py, where --validation_kps uses them.
# ---------------------------------------------------------------------------------------------------------


def mean_pairwise_similarity(a, b) -> float:
    """Mean cosine similarity over all pairs (a_j, b_k): DreamBooth's CLIP-I, DINO and PRES aggregation."""

    a = torch.nn.functional.normalize(torch.atleast_2d(torch.as_tensor(a, dtype=torch.float32)), dim=-1)
    b = torch.nn.functional.normalize(torch.atleast_2d(torch.as_tensor(b, dtype=torch.float32)), dim=-1)
    return float((a @ b.T).mean())


def paired_image_cosine(embeds, base_embeds) -> float:
    """Mean SC over same-seed pairs (row i of each): how close an adapter's images stay to the base model's."""
    return float(cosine_similarity(embeds, base_embeds).mean())


def mean_pixel_change(images, base_images) -> float:
    """Mean absolute difference of same-seed images, over pixels and channels, in [0, 1] (8-bit images / 255)."""
    a = np.stack([np.asarray(image.convert("RGB"), dtype=np.float64) for image in images])
    b = np.stack([np.asarray(image.convert("RGB"), dtype=np.float64) for image in base_images])
    return float(np.abs(a - b).mean() / 255.0)


def prompt_similarity(prompt_text_embeds, with_trigger_embeds) -> tuple[float, int]:
    """PS = H(s_prompt), s_prompt_i = SC(CLIP_text(P_i), CLIP_img(I(y_T)_i)) (paper Eqs. 4-5).

    Returns ``(PS, clamped_count)``. P_i is the caption without its trigger.
    """
    return harmonic_mean(cosine_similarity(prompt_text_embeds, with_trigger_embeds), "s_prompt")


def identity_similarity(reference_embeds, with_trigger_embeds) -> tuple[float, int]:
    """IS = H(s_id), s_id_i = SC(CLIP_img(reference_i), CLIP_img(I(y_T)_i)) (paper Eqs. 6-7).

    Returns ``(IS, clamped_count)``.
    """
    return harmonic_mean(cosine_similarity(reference_embeds, with_trigger_embeds), "s_id")


def paper_metrics(prompt_text_embeds, reference_embeds, with_trigger_embeds, without_trigger_embeds) -> dict:
    """PS, IS, KPS (Eqs. 5, 7, 9), their arithmetic-mean twins and the clamped counts, from embeddings.

    Row i of each (n, d) input belongs to item i: CLIP_text(P_i), CLIP_img(reference_i), CLIP_img(I(y_T)_i)
    and CLIP_img(I(y)_i). Returns {"PS", "IS", "KPS", "PS_mean", "IS_mean", "KPS_mean", "clamped": {"PS",
    "IS", "KPS"}}; the harmonic means warn (RuntimeWarning) when they clamp.
    """
    s_prompt = cosine_similarity(prompt_text_embeds, with_trigger_embeds)
    s_id = cosine_similarity(reference_embeds, with_trigger_embeds)
    s_prev = cosine_similarity(without_trigger_embeds, with_trigger_embeds)
    ps, ps_clamped = prompt_similarity(prompt_text_embeds, with_trigger_embeds)
    is_, is_clamped = identity_similarity(reference_embeds, with_trigger_embeds)
    kps, kps_clamped = knowledge_preservation_score(with_trigger_embeds, without_trigger_embeds)
    return {
        "PS": ps, "IS": is_, "KPS": kps,
        "PS_mean": float(s_prompt.mean()), "IS_mean": float(s_id.mean()), "KPS_mean": 1.0 - float(s_prev.mean()),
        "clamped": {"PS": ps_clamped, "IS": is_clamped, "KPS": kps_clamped},
    }


def identity_rate(verdicts) -> float:
    """ID rate: the share of images with the trigger that the subject judge calls "subject"."""
    verdicts = list(verdicts)
    return sum(v == "subject" for v in verdicts) / len(verdicts)


def base_closeness(pixel_changes, same_readings) -> dict:
    """Δpx base (mean pixel change of the trigger-less images against the base model's, 0..1) and same as base
    (the share of those pairs the subject judge reads alike), from per-pair values."""
    return {"base_pixel_change": float(np.mean(pixel_changes)), "base_same_reading": float(np.mean(same_readings))}


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\nThe math (")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = parser.add_argument_group("evaluation data (exactly one of --pairs, --eval_data_dir, --eval_prompts)")
    data.add_argument("--pairs", type=Path, help="folder mode: jsonl of already generated samples")
    data.add_argument("--eval_data_dir", type=Path, help="generate mode: folder of reference images + captions")
    data.add_argument("--eval_prompts", type=Path, help="generate mode: jsonl with caption and reference")
    data.add_argument("--instance_prompt", help="caption for --eval_data_dir images that have none")
    data.add_argument("--trigger_token", required=True, help="the trigger word, e.g. sks (required)")

    gen = parser.add_argument_group("generation (generate mode)")
    gen.add_argument("--pretrained_model_name_or_path", help="base model: a diffusers pipeline of a family train_cat_lora.py trains (hub id or folder)")
    gen.add_argument("--revision", default=None)
    gen.add_argument("--variant", default=None)
    gen.add_argument(
        "--lora", action="append", default=[], metavar="NAME=PATH",
        help="adapter to evaluate, repeatable; PATH is a training output folder (its LoRA weights and, after "
             "--train_text_encoder_ti, its new-token embeddings: y_T then uses the tokens in place of the trigger) "
             "or a weights file; none = the base model",
    )
    gen.add_argument("--num_images_per_prompt", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0, help="sample j of every adapter uses seed + j")
    gen.add_argument("--num_inference_steps", type=int, default=50)
    gen.add_argument("--guidance_scale", type=float, default=7.5,
                     help="classifier-free guidance scale; for guidance-distilled Flux.1-dev, the value given to its "
                          "guidance embedding (3.5 is diffusers' default there)")
    gen.add_argument("--resolution", type=int, default=512, help="height and width, divisible by 8")
    gen.add_argument("--batch_size", type=int, default=4, help="prompts per pipeline call and per CLIP/DINO batch")
    gen.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                     help="pipeline dtype for generation (metrics are always float32)")

    models = parser.add_argument_group("metric models")
    models.add_argument("--clip_model", default="ViT-L-14-quickgelu",
                        help="open_clip architecture name, or a path to an open_clip model config .json")
    models.add_argument("--clip_pretrained", default="openai", help="open_clip pretrained tag or checkpoint file")
    models.add_argument("--dino_model", default="facebook/dino-vits16",
                        help="transformers id or folder of a DINO ViT (CLS token), or none. Images are resized "
                             "(shorter side, bicubic) to 256/224 of the model's input size and center-cropped to "
                             "it (256 -> 224 for ViT-S/16), as in DINO's and DreamBooth's evaluation")
    models.add_argument("--device", default=None, help="device for the metric models (default: accelerate's)")

    masks = parser.add_argument_group(
        "subject masks, for CLIP-I masked (at most one of --masks, --segmenter; without them nothing is masked)")
    masks.add_argument("--masks", type=Path, metavar="DIR",
                       help="folder mode: a mask for every reference and with-trigger image of --pairs, at the image's "
                            "path relative to the --pairs file with the suffix .png (ref/0.png -> DIR/ref/0.png, "
                            "cat/0_T.jpg -> DIR/cat/0_T.png), the image's size, white (>= 128 in grayscale) = subject")
    masks.add_argument("--segmenter", choices=["border"],
                       help="compute the masks instead: border = all but the background, the region connected "
                            "to the image's border of pixels within the tolerance of its color (the median of the "
                            f"outermost pixels; tolerance: {BORDER_TOLERANCE} in every channel, or 0.4 of the "
                            "subject's median contrast if larger); for solid backgrounds such as the toy world's")

    parser.add_argument("--subject_judge", choices=["toyworld"],
                        help="also judge whether each image shows the subject, for the toy world's subjects "
                             "(examples/toyworld/judge.py; the subject is the one --trigger_token names): adds ID "
                             "rate and ID score, and with a base entry (NAME=none, or the adapter named base in "
                             "folder mode) Δpx base and same as base")
    gen.add_argument("--unrelated_prompts", type=Path, metavar="FILE",
                     help="trigger-less prompts unlike the captions, one a line: each adapter's drift from the base "
                          "model on them, same seeds (columns 'unrelated cos' and 'unrelated Δpx')")
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args(argv)

    sources = [name for name in ("pairs", "eval_data_dir", "eval_prompts") if getattr(args, name) is not None]
    if len(sources) != 1:
        parser.error("give exactly one of --pairs, --eval_data_dir, --eval_prompts")
    if args.pairs is None:
        if not args.pretrained_model_name_or_path:
            parser.error("generate mode (--eval_data_dir/--eval_prompts) needs --pretrained_model_name_or_path")
        if not args.lora:
            parser.error("generate mode needs at least one --lora NAME=PATH (NAME=none for the base model)")
    elif args.lora:
        parser.error("--lora is for generate mode; in folder mode the adapter names come from --pairs")
    if args.unrelated_prompts is not None and args.pairs is not None:
        parser.error("--unrelated_prompts is for generate mode (--eval_data_dir/--eval_prompts)")
    if args.masks is not None and args.segmenter is not None:
        parser.error("give at most one of --masks, --segmenter")
    if args.masks is not None and args.pairs is None:
        parser.error("--masks is for folder mode (--pairs): generated images have no mask files; use --segmenter")
    if args.resolution <= 0 or args.resolution % 8:
        parser.error(f"--resolution {args.resolution}: must be a positive multiple of 8")
    for name in ("num_images_per_prompt", "num_inference_steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not args.trigger_token.strip() or re.search(r"\s", args.trigger_token):
        parser.error("--trigger_token must be a single word")
    return args


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One evaluation item: a reference image and its caption y_T; ``prompt`` is y = P (trigger removed)."""

    caption: str
    prompt: str
    reference: Path


@dataclass
class Sample:
    """One scored sample of one adapter: an item and the two images drawn for it."""

    adapter: str
    item: int
    image: int
    caption: str
    prompt: str
    reference: Path
    with_trigger: Any = None  # PIL image
    without_trigger: Any = None  # PIL image
    with_trigger_path: Path | None = None
    without_trigger_path: Path | None = None
    seed: int | None = None
    scores: dict = field(default_factory=dict)
    with_trigger_mask: Any = None  # boolean (height, width) array, True = subject; with --masks or --segmenter


def check_caption(caption: str, trigger: str, where: str) -> str:
    """Return y = caption without trigger; InputError naming ``where`` if the trigger is not in it."""
    if not contains_trigger(caption, trigger):
        raise InputError(f"{where}: caption {caption!r} does not contain the trigger {trigger!r}")
    return strip_trigger(caption, trigger)


def check_image_file(path: Path, where: str) -> Path:
    """InputError naming ``where`` unless ``path`` is a readable image."""

    if not path.is_file():
        raise InputError(f"{where}: image {path} not found")
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"{where}: {path} is not a readable image ({error})") from None
    return path


def read_jsonl(path: Path, required: tuple[str, ...], flag: str) -> list[tuple[str, dict]]:
    """Records of a jsonl file as (``file:line``, dict); InputError for a missing file or a bad line."""
    if not path.is_file():
        raise InputError(f"{flag} {path}: no such file")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{where}: not valid JSON ({error})") from None
        missing = [key for key in required if not isinstance(record, dict) or not isinstance(record.get(key), str)]
        if missing:
            raise InputError(f"{where}: expected a JSON object with string fields {', '.join(required)}")
        records.append((where, record))
    if not records:
        raise InputError(f"{flag} {path}: empty evaluation set")
    return records


def load_eval_items(eval_data_dir: Path | None, eval_prompts: Path | None, trigger: str,
                    instance_prompt: str | None = None) -> list[Item]:
    """The evaluation set of generate mode, from a captioned image folder or a prompts jsonl."""
    items = []
    if eval_data_dir is not None:
        if not eval_data_dir.is_dir():
            raise InputError(f"--eval_data_dir {eval_data_dir}: no such folder")
        for image, caption in load_image_caption_pairs(eval_data_dir, instance_prompt):
            prompt = check_caption(caption, trigger, str(image))
            items.append(Item(caption, prompt, check_image_file(image, str(image))))
    else:
        for where, record in read_jsonl(eval_prompts, ("caption", "reference"), "--eval_prompts"):
            prompt = check_caption(record["caption"], trigger, where)
            reference = check_image_file(eval_prompts.parent / record["reference"], where)
            items.append(Item(record["caption"], prompt, reference))
    if not items:
        raise InputError(f"{eval_data_dir or eval_prompts}: empty evaluation set")
    return items


def load_unrelated_prompts(path: Path, trigger: str) -> list[Item]:
    """--unrelated_prompts: one prompt a line (blank lines and # comments skipped), none with the trigger."""
    if not path.is_file():
        raise InputError(f"--unrelated_prompts: {path}: no such file")
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    items = []
    for n, line in lines:
        if line and not line.startswith("#"):
            if contains_trigger(line, trigger):
                raise InputError(f"--unrelated_prompts: {path}: line {n} {line!r} contains the trigger {trigger!r}")
            items.append(Item(line, line, None))
    if not items:
        raise InputError(f"--unrelated_prompts: {path}: no prompts")
    return items


def load_pairs(pairs_file: Path, trigger: str) -> list[Sample]:
    """Folder mode: the samples listed in ``pairs_file``, images loaded, grouped by adapter in file order."""

    keys = ("adapter", "caption", "reference", "with_trigger", "without_trigger")
    samples, counts = [], {}
    for where, record in read_jsonl(pairs_file, keys, "--pairs"):
        adapter = record["adapter"]
        if not ADAPTER_NAME_PATTERN.match(adapter):
            raise InputError(f"{where}: adapter name {adapter!r} must be letters, digits, '_', '.', '-'")
        prompt = check_caption(record["caption"], trigger, where)
        paths = {key: check_image_file(pairs_file.parent / record[key], where) for key in keys[2:]}
        index = counts.get(adapter, 0)
        counts[adapter] = index + 1
        samples.append(Sample(
            adapter, index, 0, record["caption"], prompt, paths["reference"],
            with_trigger=Image.open(paths["with_trigger"]).convert("RGB"),
            without_trigger=Image.open(paths["without_trigger"]).convert("RGB"),
            with_trigger_path=paths["with_trigger"], without_trigger_path=paths["without_trigger"],
        ))
    order = list(counts)
    return sorted(samples, key=lambda s: order.index(s.adapter))


# ---------------------------------------------------------------------------------------------------------
# Subject masks (CLIP-I masked): boolean (height, width) arrays, True = subject
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskChoice:
    """Where the subject masks come from: mask files under ``folder``, named after the images' paths relative to
    ``pairs_file`` (--masks), or a ``segmenter`` (--segmenter)."""

    folder: Path | None = None
    pairs_file: Path | None = None
    segmenter: str | None = None


def mask_choice(args: argparse.Namespace) -> MaskChoice | None:
    """The masks the flags ask for; None without --masks and --segmenter (nothing is masked)."""
    if args.masks is None and args.segmenter is None:
        return None
    if args.masks is not None and not args.masks.is_dir():
        raise InputError(f"--masks {args.masks}: no such folder")
    return MaskChoice(args.masks, args.pairs, args.segmenter)


def border_mask(image, tolerance: int = BORDER_TOLERANCE) -> np.ndarray:
    """The subject of an image on a solid background: everything but the background, which is the region of
    background-colored pixels connected to the image's border.

    The background color is the median of the outermost ring of pixels. A pixel has another color when it differs
    from it by more than ``tolerance`` in some channel and by more than 0.4 of the subject's median contrast (so an
    anti-aliased edge pixel counts when about half of it is covered). Pixels enclosed by the subject are subject
    even when their color is the background's, and so are lines one pixel wide that reach into it from the
    background (a pixel with subject on both sides): a blend of two subject colors, where they meet, can have the
    background's color.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    ring = np.zeros(pixels.shape[:2], dtype=bool)
    ring[[0, -1], :] = ring[:, [0, -1]] = True
    contrast = np.abs(pixels - np.median(pixels[ring], axis=0)).max(axis=-1)
    colored = contrast > tolerance
    if colored.any():
        colored = contrast > max(tolerance, 0.4 * np.median(contrast[colored]))
    background = ring & ~colored
    while True:  # flood the background from the border, through pixels of its color
        grown = grow(background) & ~colored
        if np.array_equal(grown, background):
            break
        background = grown
    subject = ~background
    between = np.zeros_like(subject)  # background pixels with subject on both sides, above and below or left and right
    between[1:-1] |= subject[:-2] & subject[2:]
    between[:, 1:-1] |= subject[:, :-2] & subject[:, 2:]
    return subject | between


def grow(mask: np.ndarray) -> np.ndarray:
    """``mask`` and its 4-connected neighbors (a dilation by one pixel)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def apply_mask(image, mask: np.ndarray):
    """The image with every pixel outside ``mask`` set to MASK_FILL (an RGB PIL image)."""
    pixels = np.asarray(image.convert("RGB"))
    return Image.fromarray(np.where(mask[..., None], pixels, np.asarray(MASK_FILL, dtype=np.uint8)))


def read_mask_file(choice: MaskChoice, image_path: Path, image_size: tuple[int, int]) -> np.ndarray:
    """The mask file of ``image_path`` under --masks; InputError if it is missing, unreadable, of another size than
    the image or empty."""
    relative = Path(os.path.relpath(image_path, choice.pairs_file.parent))
    if relative.is_absolute() or ".." in relative.parts:
        raise InputError(f"--masks {choice.folder}: {image_path} lies outside the folder of --pairs, so it has no "
                         "mask path (the rule is the image's path relative to the --pairs file)")
    path = choice.folder / relative.with_suffix(".png")
    if not path.is_file():
        raise InputError(f"--masks {choice.folder}: no mask {path} for {image_path}")
    try:
        with Image.open(path) as file:
            mask = np.asarray(file.convert("L")) >= 128
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"--masks: {path} is not a readable image ({error})") from None
    width, height = image_size
    if mask.shape != (height, width):
        raise InputError(f"--masks: {path} is {mask.shape[1]}x{mask.shape[0]}, its image {image_path} is "
                         f"{width}x{height}")
    if not mask.any():
        raise InputError(f"--masks: {path} is empty (no white pixel), so {image_path} would have no subject")
    return mask


def subject_mask(choice: MaskChoice, image, image_path: Path | None) -> np.ndarray:
    """The mask of one image, from its file (--masks) or the segmenter."""
    if choice.segmenter == "border":
        return border_mask(image)
    return read_mask_file(choice, image_path, image.size)


def mask_references(choice: MaskChoice, references: list[Path]) -> dict[Path, np.ndarray]:
    """The mask of every reference image; InputError when one has no subject (a reference is the user's input)."""
    masks = {}
    for path in dict.fromkeys(references):
        with Image.open(path) as image:
            masks[path] = subject_mask(choice, image, path)
        if not masks[path].any():
            raise InputError(f"{path}: --segmenter {choice.segmenter} finds no subject in this reference image "
                             "(every pixel has the background's color)")
    return masks


def mask_generated(choice: MaskChoice, samples: list[Sample]) -> None:
    """Set ``with_trigger_mask`` of every sample. A generated image in which the segmenter finds no subject keeps
    its empty mask (it is scored as a plain gray image) and is counted; mask files must not be empty."""
    for s in samples:
        s.with_trigger_mask = subject_mask(choice, s.with_trigger, s.with_trigger_path)
    for adapter in dict.fromkeys(s.adapter for s in samples):
        empty = sum(not s.with_trigger_mask.any() for s in samples if s.adapter == adapter)
        if empty:
            logger.warning("%s: --segmenter %s finds no subject in %d of its images with the trigger; CLIP-I masked "
                           "scores them as plain gray images", adapter, choice.segmenter, empty)


# ---------------------------------------------------------------------------------------------------------
# The subject judge of the toy world (examples/toyworld/judge.py): ID rate, ID score, closeness to the base model
# ---------------------------------------------------------------------------------------------------------

TOYWORLD_DIR = Path(__file__).resolve().parent / "examples" / "toyworld"
BASE_ENTRY = "base"  # in folder mode, the adapter that the others' trigger-less images are compared with


@dataclass(frozen=True)
class SubjectJudge:
    """The judge module, the subject it looks for, and the base entry (None: no base-closeness columns)."""

    module: Any
    subject: Any
    base: str | None


def load_subject_judge(choice: str, trigger: str):
    """(judge module, subject) of --subject_judge; InputError when the module is absent or the trigger names no
    toy-world subject. The module lives with the toy world, outside the installed package."""
    if not (TOYWORLD_DIR / "judge.py").is_file():
        raise InputError(f"--subject_judge {choice}: needs {TOYWORLD_DIR / 'judge.py'} (the repository's "
                         "examples/toyworld/, which is not installed with the package)")
    if str(TOYWORLD_DIR) not in sys.path:
        sys.path.insert(0, str(TOYWORLD_DIR))
    import judge  # noqa: PLC0415 - only with --subject_judge

    if trigger not in judge.SUBJECTS:
        raise InputError(f"--subject_judge {choice}: --trigger_token {trigger} is not a toy-world subject (one of "
                         f"{', '.join(judge.SUBJECTS)})")
    return judge, judge.SUBJECTS[trigger]


def base_entry(adapters: dict | None, samples: list) -> str | None:
    """The base model's entry: in generate mode the first NAME=none, in folder mode the adapter named BASE_ENTRY."""
    if adapters is not None:
        return next((name for name, files in adapters.items() if files is None), None)
    return BASE_ENTRY if any(s.adapter == BASE_ENTRY for s in samples) else None


def check_judge_inputs(samples: list, base: str | None) -> None:
    """InputError unless the images are square (the judge renders square toy-world images) and, with a base
    entry, every adapter's samples pair with the base's (the same captions in the same order)."""
    for s in samples:
        for image, path in ((s.with_trigger, s.with_trigger_path), (s.without_trigger, s.without_trigger_path)):
            if image is not None and image.size[0] != image.size[1]:
                raise InputError(f"--subject_judge: {path} is {image.size[0]}x{image.size[1]}; the toy world's "
                                 "images are square")
    if base is None:
        return
    captions = {}
    for s in samples:
        captions.setdefault(s.adapter, []).append(s.caption)
    for adapter, own in captions.items():
        if own != captions[base]:
            raise InputError(f"--subject_judge: the samples of {adapter!r} do not pair with those of {base!r} (the "
                             "same captions in the same order), so their closeness to the base model is undefined")


def judge_samples(samples: list, metrics: dict, judge: SubjectJudge) -> None:
    """Add ID rate and ID score (and, with a base entry, Δpx base and same as base) to each adapter's metrics and
    the per-image values to ``sample.scores``. The base entry's own closeness cells are None."""
    def pixels(image):
        return np.asarray(image.convert("RGB"))

    base = [s for s in samples if s.adapter == judge.base]
    for adapter, result in metrics.items():
        group = [s for s in samples if s.adapter == adapter]
        judgements = [judge.module.judge(pixels(s.with_trigger), judge.subject) for s in group]
        for s, j in zip(group, judgements):
            s.scores.update(judge_verdict=j.verdict, judge_score=j.score)
        result.update(ID_rate=identity_rate(j.verdict for j in judgements),
                      ID_score=float(np.mean([j.score for j in judgements])))
        if judge.base is None:
            continue
        if adapter == judge.base:
            result.update(base_pixel_change=None, base_same_reading=None)
            continue
        changes = judge.module.base_closeness([pixels(s.without_trigger) for s in group],
                                              [pixels(b.without_trigger) for b in base])
        for s, change in zip(group, changes):
            s.scores.update(base_pixel_change=change.pixel_change, base_same_reading=change.same_reading)
        result.update(base_closeness([c.pixel_change for c in changes], [c.same_reading for c in changes]))


@dataclass(frozen=True)
class AdapterFiles:
    """What one ``--lora`` names: LoRA weights, and the new-token embeddings of pivotal tuning or textual inversion
    (train_cat_lora.py --train_text_encoder_ti writes ``<folder>_emb.safetensors``; with --train_transformer_frac 0
    there is no LoRA file at all)."""

    lora: Path | None
    embeddings: Path | None = None
    catversion: Path | None = None  # a folder with catversion.safetensors (train_cat_lora.py --adapter catversion)

    def __str__(self) -> str:
        return " + ".join(str(path) for path in (self.lora, self.embeddings, self.catversion) if path is not None)


def parse_lora_specs(specs: list[str]) -> dict[str, AdapterFiles | None]:
    """``--lora NAME=PATH`` values as {name: its files, or None for the base model}, in the given order."""
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--lora {spec}: expected NAME=PATH (or NAME=none for the base model)")
        if not ADAPTER_NAME_PATTERN.match(name):
            raise InputError(f"--lora {spec}: the name must be letters, digits, '_', '.', '-'")
        if name in adapters:
            raise InputError(f"--lora {spec}: the name {name!r} is used twice")
        if path.lower() == "none":
            adapters[name] = None
            continue
        path = Path(path)
        if (path / CATVERSION_WEIGHT_NAME).is_file():
            adapters[name] = AdapterFiles(None, catversion=path)
        elif path.is_dir():
            lora, embeddings = path / LORA_WEIGHT_NAME, path / f"{path.resolve().name}_emb.safetensors"
            files = AdapterFiles(lora if lora.is_file() else None, embeddings if embeddings.is_file() else None)
            if files.lora is None and files.embeddings is None:
                raise InputError(f"--lora {spec}: {path} has no {LORA_WEIGHT_NAME} (nor {embeddings.name})")
            if files.embeddings is not None and len(list((path / "embeddings").glob("*.safetensors"))) > 1:
                raise InputError(f"--lora {spec}: {embeddings.name} holds several --token_abstraction's tokens; "
                                 "evaluate one concept's embeddings at a time")
            adapters[name] = files
        elif path.is_file():
            adapters[name] = AdapterFiles(path)
        else:
            raise InputError(f"--lora {spec}: {path} not found")
    return adapters


# ---------------------------------------------------------------------------------------------------------
# Models (load_clip and clip_image_embeddings are imported from train_cat_lora.py)
# ---------------------------------------------------------------------------------------------------------


def clip_text_embeddings(clip: Clip, texts: list[str], batch_size: int = 16):
    """L2-normalized float32 CLIP text embeddings (n, d) of a list of strings."""

    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            tokens = clip.tokenizer(list(texts[start : start + batch_size])).to(clip.device)
            out.append(clip.model.encode_text(tokens).float())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()


class Dino(NamedTuple):
    model: Any
    processor: Any
    device: Any


def load_dino(name_or_path: str, device="cpu") -> Dino | None:
    """A transformers DINO ViT (float32, eval mode) and its image processor; None for ``none``."""
    if name_or_path.lower() == "none":
        return None

    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
        model = AutoModel.from_pretrained(name_or_path, dtype=torch.float32)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"--dino_model {name_or_path}: could not load ({first_line})") from None
    return Dino(model.to(device).eval().requires_grad_(False), processor, torch.device(device))


# DINO's (and DreamBooth's) evaluation transform: Resize(256) then CenterCrop(224), i.e. resize the shorter
# side to 256/224 of the model's input size, then crop the input size from the center.
DINO_RESIZE_RATIO = 256 / 224


def dino_input_size(processor) -> int:
    """The square input size the DINO image processor is configured for (224 for facebook/dino-vits16)."""
    size = processor.size  # a dict (or transformers' SizeDict): {"height", "width"} or {"shortest_edge"}
    height, width = size.get("height"), size.get("width")
    if height and width:
        if height != width:
            raise InputError(f"--dino_model: expected a square input size, the image processor has {height}x{width}")
        return int(height)
    if size.get("shortest_edge"):
        return int(size["shortest_edge"])
    raise InputError(f"--dino_model: cannot read the input size from the image processor ({size})")


def resize_and_center_crop(image, crop: int):
    """Resize the shorter side of a PIL image to round(crop * 256 / 224) (bicubic), then center-crop crop x crop."""

    image = image.convert("RGB")
    shorter = round(crop * DINO_RESIZE_RATIO)
    width, height = image.size
    scale = shorter / min(width, height)
    new_width, new_height = max(crop, round(width * scale)), max(crop, round(height * scale))
    image = image.resize((new_width, new_height), Image.BICUBIC)
    left, top = (new_width - crop) // 2, (new_height - crop) // 2
    return image.crop((left, top, left + crop, top + crop))


def dino_embeddings(dino: Dino, images, batch_size: int = 16):
    """L2-normalized float32 DINO CLS-token embeddings (n, d) of a list of PIL images.

    Each image is resized and center-cropped by :func:`resize_and_center_crop` to the model's input size;
    the image processor then only rescales and normalizes (``do_resize=False``).
    """

    crop = dino_input_size(dino.processor)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = [resize_and_center_crop(im, crop) for im in images[start : start + batch_size]]
            pixels = dino.processor(images=batch, do_resize=False, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(dino.device)
            out.append(dino.model(pixel_values=pixels).last_hidden_state[:, 0].float())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()


def paper_scores(clip: Clip, prompts: list[str], reference_images, with_trigger_images, without_trigger_images,
                 batch_size: int = 16) -> dict:
    """PS, IS and KPS (Eqs. 4-9) of one adapter from PIL images, with the clamped counts.

    ``prompts[i]`` is P_i (the caption without trigger), the images are lists of the same length: the
    reference, I(y_T) and I(y) of item i. The script computes its numbers with the same :func:`paper_metrics`.
    """
    text = clip_text_embeddings(clip, prompts, batch_size)
    reference = clip_image_embeddings(clip, reference_images, batch_size)
    with_trigger = clip_image_embeddings(clip, with_trigger_images, batch_size)
    without_trigger = clip_image_embeddings(clip, without_trigger_images, batch_size)
    metrics = paper_metrics(text, reference, with_trigger, without_trigger)
    return {key: metrics[key] for key in ("PS", "IS", "KPS", "clamped")}


def masked_clip_i(clip: Clip, reference_images, generated_images, reference_masks=None, generated_masks=None,
                  batch_size: int = 16) -> float:
    """CLIP-I masked: the mean cosine over all pairs (generated, reference) of CLIP embeddings of the images with
    their background set to MASK_FILL. The masks are boolean (height, width) arrays, one per image (True =
    subject); None computes them with :func:`border_mask`. The script's column is this function."""
    if reference_masks is None:
        reference_masks = [border_mask(image) for image in reference_images]
    if generated_masks is None:
        generated_masks = [border_mask(image) for image in generated_images]
    references = clip_image_embeddings(clip, list(map(apply_mask, reference_images, reference_masks)), batch_size)
    generated = clip_image_embeddings(clip, list(map(apply_mask, generated_images, generated_masks)), batch_size)
    return mean_pairwise_similarity(generated, references)


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------


def prediction_drift(family, pipe, lora_dir, batch: dict, prompts: list[str]):
    """How far a LoRA moves the denoiser's prediction on ``prompts`` (e.g. trigger-less ones), per sample:
    ``||pred_adapted - pred_base||^2`` (mean over elements) and the same relative to the base prediction's power
    (``relative_drift``, the unit of --cat_drift_budget), at the noisy latents of ``batch`` (the training step's
    own conditioning, noisy input and prediction, so it works for every family). The LoRA stays loaded in ``pipe``.
    """
    denoiser = getattr(pipe, family.denoiser)
    encoders = {name: getattr(pipe, name) for name in family.text_encoders}
    with torch.no_grad():
        z = family.noisy_latents(batch, pipe.vae, family.load_noise_scheduler(), torch.float32)
        base = family.predict(denoiser, z, family.encode_prompts(encoders, prompts))
        pipe.load_lora_weights(lora_dir)
        adapted = family.predict(denoiser, z, family.encode_prompts(encoders, prompts))
    squared = (adapted - base).float().pow(2).mean(dim=list(range(1, base.ndim)))
    return squared, relative_drift(adapted, base)


def process_state():
    """accelerate's PartialState; on machines without an accelerator, several processes share the CPU (gloo)."""

    return PartialState(cpu=use_cpu_processes())


def load_pipeline(family, mixed_precision: str = "no", device="cpu"):
    """The base pipeline of the model's family (train_cat_lora.model_family), loaded once; SD's safety checker off
    (black images would skew scores)."""

    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    try:
        pipe = family.load_pipeline(dtype=dtype)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        source = family.config.pretrained_model_name_or_path
        raise InputError(f"--pretrained_model_name_or_path {source}: could not load ({first_line})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_adapter(pipe, family, name: str, files: AdapterFiles) -> list[str]:
    """Apply an adapter's LoRA and embeddings (or CatVersion tokens) to ``pipe``; returns the new tokens (none
    without embeddings)."""
    if files.catversion is not None:
        if not family.supports_catversion:
            raise InputError(f"--lora {name}: a CatVersion adapter needs an SD 1.x/2.x base, not {family.label}")
        load_catversion(pipe.text_encoder, files.catversion)
    if files.lora is not None:
        load_lora(pipe, name, files.lora)
    if files.embeddings is None:
        return []
    return load_embeddings(pipe, family, name, files.embeddings)


def unload_adapter(pipe, family, files: AdapterFiles, tokens: list[str]) -> None:
    if files.catversion is not None:
        unload_catversion(pipe.text_encoder)
    if files.lora is not None:
        pipe.unload_lora_weights()
    for encoder_name in family.embedding_file_keys if tokens else ():
        tokenizer_name = family.tokenizer_of(encoder_name)
        pipe.unload_textual_inversion(tokens=tokens, tokenizer=getattr(pipe, tokenizer_name),
                                      text_encoder=getattr(pipe, encoder_name))


def load_embeddings(pipe, family, name: str, path: Path) -> list[str]:
    """Add the new tokens <s0><s1>... of ``path`` (diffusers' pivotal-tuning file: one key per text encoder) to the
    pipeline's tokenizers and text encoders, as the model card's lines do; returns the tokens."""
    where = f"--lora {name}: {path}"
    try:
        state_dict = load_safetensors(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the user's input
        raise InputError(f"{where}: not an embeddings file ({type(error).__name__}: {error})") from None
    keys = getattr(family, "embedding_file_keys", {})
    missing = [key for key in keys.values() if key not in state_dict]
    if not keys or missing:
        raise InputError(f"{where}: expected the keys {sorted(keys.values())} of this model family, found "
                         f"{sorted(state_dict)}")
    tokens = [f"<s{i}>" for i in range(len(next(iter(state_dict.values()))))]
    for encoder_name, key in keys.items():
        tokenizer_name = family.tokenizer_of(encoder_name)
        encoder = getattr(pipe, encoder_name)
        if state_dict[key].shape != (len(tokens), encoder.get_input_embeddings().weight.shape[1]):
            raise InputError(f"{where}: {key} has shape {tuple(state_dict[key].shape)}, {encoder_name} needs "
                             f"({len(tokens)}, {encoder.get_input_embeddings().weight.shape[1]})")
        pipe.load_textual_inversion(state_dict[key], token=tokens, text_encoder=encoder,
                                    tokenizer=getattr(pipe, tokenizer_name))
    return tokens


def load_lora(pipe, name: str, path: Path) -> None:
    """Apply the LoRA at ``path`` to ``pipe`` as adapter ``name``; InputError if it does not fit the model.

    Fitting means every LoRA matrix in the file lands on a layer of the base model with the right shape
    (diffusers only warns about keys that match no layer, which would evaluate a partial adapter).
    """

    where = f"--lora {name}={path}"
    name = re.sub(r"\W", "_", name)  # peft refuses '.' in adapter names (e.g. "alpha0.1"); one is loaded at a time
    try:
        loaded = pipe.lora_state_dict(str(path.parent), weight_name=path.name)
        # SD/SDXL loaders return (state dict, network alphas); Flux's returns the state dict alone.
        state_dict = loaded[0] if isinstance(loaded, tuple) else loaded
    except Exception as error:  # noqa: BLE001 - any unreadable file is the user's input
        raise InputError(f"{where}: not a LoRA weights file ({type(error).__name__}: {error})") from None
    in_file = sum(bool(LORA_MATRIX_KEY.search(key)) for key in state_dict)
    if in_file == 0:
        raise InputError(f"{where}: no LoRA weights in the file")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # our own check below replaces diffusers' key warnings
    try:
        # By path, not from ``state_dict``: the file's metadata carries the LoraConfig (e.g. lora_alpha).
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as error:
        pipe.unload_lora_weights()
        detail = str(error).strip().splitlines()
        detail = next((line.strip() for line in detail if "mismatch" in line), detail[0] if detail else "")
        raise InputError(f"{where}: does not fit the base model ({detail})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pattern = re.compile(rf"\.lora_[AB]\.{re.escape(name)}\.weight$")
    loaded = sum(
        bool(pattern.search(key))
        for component in (getattr(pipe, name, None) for name in ("unet", "transformer", "text_encoder", "text_encoder_2"))
        if component is not None
        for key, _ in component.named_parameters()
    )
    if loaded < in_file:
        pipe.unload_lora_weights()
        raise InputError(
            f"{where}: does not fit the base model ({in_file - loaded} of {in_file} LoRA weights match no layer)"
        )


def check_adapters(pipe, family, adapters: dict[str, AdapterFiles | None]) -> None:
    """Load and unload every adapter once before generating, so a bad one fails before any image is drawn."""
    for name, files in adapters.items():
        if files is not None:
            unload_adapter(pipe, family, files, load_adapter(pipe, family, name, files))


def plan_samples(adapters, items: list[Item], num_images_per_prompt: int, seed: int) -> list[Sample]:
    """Every (adapter, item, image) sample; sample j of each adapter uses seed + j, for both prompts."""
    samples = []
    for adapter in adapters:
        for i, item in enumerate(items):
            for k in range(num_images_per_prompt):
                j = i * num_images_per_prompt + k
                samples.append(Sample(adapter, i, k, item.caption, item.prompt, item.reference, seed=seed + j))
    return samples


def generate_images(pipe, family, adapters, samples: list[Sample], state, batch_size: int, num_inference_steps: int,
                    guidance_scale: float, resolution: int, trigger: str, variants=("T", "y")) -> None:
    """Draw I(y_T) and I(y) for every sample, this process's share of them; the main process gets all.

    Each adapter is applied with ``load_lora_weights`` (and ``load_textual_inversion``) and removed again on the
    one base pipeline. An adapter with new-token embeddings draws I(y_T) with the trigger replaced by its tokens
    (<s0><s1>...), as its model card says to prompt; y holds neither. Jobs are split between processes
    (accelerate) and the images gathered. ``variants=("T",)`` draws only the caption, adapter on
    (--unrelated_prompts).
    """

    jobs = {name: [(n, variant) for n, s in enumerate(samples) if s.adapter == name for variant in variants]
            for name in adapters}
    shares = {}
    for name, adapter_jobs in jobs.items():
        with state.split_between_processes(adapter_jobs) as share:
            shares[name] = list(share)
    total = sum(math.ceil(len(share) / batch_size) for share in shares.values())
    results = []
    with tqdm(total=total, desc="generating", disable=not state.is_local_main_process) as bar:
        for name, share in shares.items():
            tokens = load_adapter(pipe, family, name, adapters[name]) if adapters[name] is not None else []
            # A CatVersion adapter has no trigger: I(y_T) is y with the adapter on, I(y) is y with it off.
            catversion = adapters[name] is not None and adapters[name].catversion is not None
            for start in range(0, len(share), batch_size):
                batch = share[start : start + batch_size]
                for part in ([[job for job in batch if job[1] == v] for v in ("T", "y")] if catversion else [batch]):
                    if not part:
                        continue
                    prompts = [(replace_trigger(samples[n].caption, trigger, "".join(tokens)) if tokens
                                else samples[n].caption) if variant == "T" and not catversion else samples[n].prompt
                               for n, variant in part]
                    generators = [torch.Generator("cpu").manual_seed(samples[n].seed) for n, _ in part]
                    with adapters_disabled(*(pipe.text_encoder,) if catversion and part[0][1] == "y" else ()):
                        images = pipe(
                            prompt=prompts, generator=generators, num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, height=resolution, width=resolution,
                        ).images
                    results.extend((n, variant, image) for (n, variant), image in zip(part, images))
                bar.update()
            if adapters[name] is not None:
                unload_adapter(pipe, family, adapters[name], tokens)
    for n, variant, image in gather_object(results):
        if variant == "T":
            samples[n].with_trigger = image
        else:
            samples[n].without_trigger = image


# ---------------------------------------------------------------------------------------------------------
# Embeddings and metrics
# ---------------------------------------------------------------------------------------------------------


def score_samples(samples: list[Sample], clip: Clip, dino: Dino | None, batch_size: int,
                  reference_masks: dict[Path, np.ndarray] | None = None) -> dict[str, dict]:
    """Per-sample similarities (stored in ``sample.scores``) and per-adapter metrics, in adapter order.

    With ``reference_masks`` (and every sample's ``with_trigger_mask``), each adapter also gets CLIP-I masked and
    the count of its images with the trigger whose mask is empty.
    """

    references = sorted({s.reference for s in samples})
    reference_images = [Image.open(path).convert("RGB") for path in references]
    prompts = sorted({s.prompt for s in samples})

    clip_ref = dict(zip(references, clip_image_embeddings(clip, reference_images, batch_size)))
    clip_text = dict(zip(prompts, clip_text_embeddings(clip, prompts, batch_size)))
    clip_wt = clip_image_embeddings(clip, [s.with_trigger for s in samples], batch_size)
    clip_wo = clip_image_embeddings(clip, [s.without_trigger for s in samples], batch_size)
    if dino is not None:
        dino_ref = dict(zip(references, dino_embeddings(dino, reference_images, batch_size)))
        dino_wt = dino_embeddings(dino, [s.with_trigger for s in samples], batch_size)
        dino_wo = dino_embeddings(dino, [s.without_trigger for s in samples], batch_size)

    metrics = {}
    for adapter in dict.fromkeys(s.adapter for s in samples):
        idx = [n for n, s in enumerate(samples) if s.adapter == adapter]
        group = [samples[n] for n in idx]
        text = torch.stack([clip_text[s.prompt] for s in group])
        ref = torch.stack([clip_ref[s.reference] for s in group])
        wt, wo = clip_wt[idx], clip_wo[idx]
        s_prompt, s_id, s_prev = cosine_similarity(text, wt), cosine_similarity(ref, wt), cosine_similarity(wo, wt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            paper = paper_metrics(text, ref, wt, wo)
        for warning in caught:
            logger.warning("%s: %s", adapter, warning.message)
        own_refs = sorted({s.reference for s in group})
        masked = {} if reference_masks is None else {
            "CLIP-I_masked": masked_clip_i(
                clip, [reference_images[references.index(r)] for r in own_refs], [s.with_trigger for s in group],
                [reference_masks[r] for r in own_refs], [s.with_trigger_mask for s in group], batch_size),
            "empty_masks": sum(not s.with_trigger_mask.any() for s in group),
        }
        result = {
            "n": len(group),
            "PS": paper["PS"], "IS": paper["IS"], "KPS": paper["KPS"],
            "PS_mean": paper["PS_mean"], "IS_mean": paper["IS_mean"], "KPS_mean": paper["KPS_mean"],
            "CLIP-T": paper["PS_mean"],
            "CLIP-I": mean_pairwise_similarity(wt, torch.stack([clip_ref[r] for r in own_refs])),
            **masked,
            "DINO": None, "PRES": None,
            "clamped": paper["clamped"],
        }
        for s, a, b, c in zip(group, s_prompt.tolist(), s_id.tolist(), s_prev.tolist()):
            s.scores = {"s_prompt": a, "s_id": b, "s_prev": c, "dino_id": None, "dino_pres": None}
        if dino is not None:
            d_ref = torch.stack([dino_ref[r] for r in own_refs])
            result["DINO"] = mean_pairwise_similarity(dino_wt[idx], d_ref)
            result["PRES"] = mean_pairwise_similarity(dino_wo[idx], d_ref)
            paired = torch.stack([dino_ref[s.reference] for s in group])
            for s, a, b in zip(group, cosine_similarity(paired, dino_wt[idx]).tolist(),
                                cosine_similarity(paired, dino_wo[idx]).tolist()):
                s.scores.update(dino_id=a, dino_pres=b)
        metrics[adapter] = result
    return metrics


def unrelated_scores(samples: list[Sample], base: str, clip: Clip, batch_size: int) -> dict[str, dict]:
    """--unrelated_prompts: per adapter, ``unrelated_cosine`` and ``unrelated_pixel_change`` of its images (in
    ``with_trigger``) against the base model's (adapter ``base``) at the same prompt and seed."""
    embeds = clip_image_embeddings(clip, [s.with_trigger for s in samples], batch_size)
    of_base = {(s.item, s.image): n for n, s in enumerate(samples) if s.adapter == base}
    scores = {}
    for adapter in dict.fromkeys(s.adapter for s in samples):
        idx = [n for n, s in enumerate(samples) if s.adapter == adapter]
        pair = [of_base[samples[n].item, samples[n].image] for n in idx]
        scores[adapter] = {"unrelated_cosine": paired_image_cosine(embeds[idx], embeds[pair]),
                           "unrelated_pixel_change": mean_pixel_change([samples[n].with_trigger for n in idx],
                                                                       [samples[n].with_trigger for n in pair])}
    return scores


def write_unrelated(output_dir: Path, samples: list[Sample], tile: int = 64) -> None:
    """unrelated/<adapter>/<prompt>_<image>.png, unrelated.jsonl, and unrelated.png: one row per model, one column per
    prompt (its first image), same seeds down each column."""
    from PIL import ImageDraw

    lines = []
    for s in samples:
        path = output_dir / "unrelated" / s.adapter / f"{s.item:04d}_{s.image:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        s.with_trigger.save(path)
        lines.append({"adapter": s.adapter, "prompt": s.prompt, "seed": s.seed,
                      "image": os.path.relpath(path, output_dir)})
    (output_dir / "unrelated.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    adapters = list(dict.fromkeys(s.adapter for s in samples))
    firsts = [s for s in samples if s.image == 0]
    columns = max(s.item for s in samples) + 1
    grid = Image.new("RGB", (COMPARISON_LABEL_WIDTH + columns * tile, len(adapters) * tile), "white")
    draw = ImageDraw.Draw(grid)
    for r, adapter in enumerate(adapters):
        draw.text((4, r * tile + tile // 2 - 6), adapter[:18], fill="black")
        for s in (s for s in firsts if s.adapter == adapter):
            grid.paste(s.with_trigger.convert("RGB").resize((tile, tile), Image.NEAREST),
                       (COMPARISON_LABEL_WIDTH + s.item * tile, r * tile))
    grid.save(output_dir / "unrelated.png")


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------

TABLE_COLUMNS = [
    ("PS (5)", "PS"), ("IS (7)", "IS"), ("KPS (9)", "KPS"), ("PS mean", "PS_mean"), ("IS mean", "IS_mean"),
    ("KPS mean", "KPS_mean"), ("CLIP-T", "CLIP-T"), ("CLIP-I", "CLIP-I"), ("DINO", "DINO"), ("PRES ↓", "PRES"),
]
MASKED_COLUMN = ("CLIP-I masked", "CLIP-I_masked")  # after CLIP-I, when the metrics have it
JUDGE_COLUMNS = [("ID rate", "ID_rate"), ("ID score", "ID_score")]  # after IS, with --subject_judge
BASE_COLUMNS = [("Δpx base ↓", "base_pixel_change"), ("same as base", "base_same_reading")]  # after KPS, with a base
UNRELATED_COLUMNS = [("unrelated cos", "unrelated_cosine"), ("unrelated Δpx", "unrelated_pixel_change")]  # after KPS


CLAMP_MARK = "*"


def format_table(metrics: dict[str, dict]) -> str:
    """Markdown table, one row per adapter, in the style of the paper's Table 1.

    A PS, IS or KPS cell whose harmonic mean clamped some values (cosine <= 0) ends with ``*``, and a
    footnote under the table gives, per marked cell, how many of the n values were clamped. The CLIP-I masked
    column is there only when the metrics have it (--masks or --segmenter), ID rate and ID score only with
    --subject_judge, Δpx base and same as base only with it and a base entry.
    """
    columns = list(TABLE_COLUMNS)
    if any(MASKED_COLUMN[1] in m for m in metrics.values()):
        columns.insert(columns.index(("CLIP-I", "CLIP-I")) + 1, MASKED_COLUMN)
    for after, extra in ((("KPS (9)", "KPS"), BASE_COLUMNS), (("IS (7)", "IS"), JUDGE_COLUMNS)):
        if any(extra[0][1] in m for m in metrics.values()):
            at = columns.index(after) + 1
            columns[at:at] = extra
    if any(UNRELATED_COLUMNS[0][1] in m for m in metrics.values()):
        at = columns.index(("KPS mean", "KPS_mean")) + 1
        columns[at:at] = UNRELATED_COLUMNS
    head = "| Method | n | " + " | ".join(title for title, _ in columns) + " | clamped PS/IS/KPS |"
    rule = "|---|---:|" + "---:|" * len(columns) + "---:|"
    rows, notes = [], []
    for adapter, m in metrics.items():
        cells = []
        for _, key in columns:
            if m.get(key) is None:
                cells.append("-")
                continue
            cell = f"{m[key]:.4f}"
            clamped = m["clamped"].get(key, 0)
            if clamped:
                cell += CLAMP_MARK
                notes.append(f"{adapter} {key}: {clamped} of {m['n']}")
            cells.append(cell)
        cells.append("/".join(str(m["clamped"][key]) for key in ("PS", "IS", "KPS")))
        rows.append(f"| {adapter} | {m['n']} | " + " | ".join(cells) + " |")
    lines = [head, rule, *rows]
    if notes:
        lines += [
            "",
            f"{CLAMP_MARK} harmonic mean over values of which some were <= 0 and clamped to {CLAMP_MIN:g} "
            f"({'; '.join(notes)} clamped). One clamped value pulls the harmonic mean to about n * {CLAMP_MIN:g}, "
            "so a marked cell only says that some cosine was <= 0: compare the arithmetic-mean column instead.",
        ]
    return "\n".join(lines) + "\n"


def make_grid(samples: list[Sample], max_tile: int = 256):
    """One row per sample: reference | with trigger | without trigger."""

    tile = min(max_tile, max(samples[0].with_trigger.size))
    grid = Image.new("RGB", (3 * tile, len(samples) * tile), "white")
    for row, s in enumerate(samples):
        with Image.open(s.reference) as reference:
            images = [reference.convert("RGB"), s.with_trigger, s.without_trigger]
            for col, image in enumerate(images):
                grid.paste(image.convert("RGB").resize((tile, tile), Image.BICUBIC), (col * tile, row * tile))
    return grid


def make_masked_grid(samples: list[Sample], reference_masks: dict[Path, np.ndarray], max_tile: int = 256):
    """What CLIP-I masked compares, one row per sample: the masked reference | the masked image with the trigger."""
    tile = min(max_tile, max(samples[0].with_trigger.size))
    grid = Image.new("RGB", (2 * tile, len(samples) * tile), "white")
    for row, s in enumerate(samples):
        with Image.open(s.reference) as reference:
            images = [apply_mask(reference, reference_masks[s.reference]),
                      apply_mask(s.with_trigger, s.with_trigger_mask)]
        for col, image in enumerate(images):
            grid.paste(image.resize((tile, tile), Image.NEAREST), (col * tile, row * tile))
    return grid


COMPARISON_LABEL_WIDTH, COMPARISON_HEADER, COMPARISON_GAP = 120, 18, 12


def make_comparison(samples: list[Sample], per_side: int = 8, tile: int = 64):
    """The picture to read at a glance: one row per adapter (in the given order), its first ``per_side`` images
    with the trigger on the left, the same samples (same seeds) without it on the right."""
    from PIL import ImageDraw

    adapters = list(dict.fromkeys(s.adapter for s in samples))
    rows = {a: [s for s in samples if s.adapter == a][:per_side] for a in adapters}
    n = max(len(r) for r in rows.values())
    side = n * tile
    grid = Image.new("RGB", (COMPARISON_LABEL_WIDTH + 2 * side + COMPARISON_GAP,
                             COMPARISON_HEADER + len(adapters) * tile), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((COMPARISON_LABEL_WIDTH, 3), "with the trigger (y_T)", fill="black")
    draw.text((COMPARISON_LABEL_WIDTH + side + COMPARISON_GAP, 3), "without it (y), same seeds", fill="black")
    for r, adapter in enumerate(adapters):
        top = COMPARISON_HEADER + r * tile
        draw.text((4, top + tile // 2 - 6), adapter[:18], fill="black")
        for c, s in enumerate(rows[adapter]):
            for left, image in ((COMPARISON_LABEL_WIDTH, s.with_trigger),
                                (COMPARISON_LABEL_WIDTH + side + COMPARISON_GAP, s.without_trigger)):
                grid.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (left + c * tile, top))
    return grid


# Per-sample columns of the subject judge: the verdict and score of the image with the trigger; the trigger-less
# image's change against the base model's.
JUDGE_SAMPLE_KEYS = ("judge_verdict", "judge_score", "base_pixel_change", "base_same_reading")


def write_outputs(output_dir: Path, samples: list[Sample], metrics: dict, settings: dict, save_images: bool,
                  reference_masks: dict[Path, np.ndarray] | None = None) -> str:
    """Write metrics.json, per_sample.csv, table.md, grid_<adapter>.png (with masks also masked_<adapter>.png; and,
    after generation, the images with a pairs.jsonl for folder mode) into ``output_dir``; return the table."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if save_images:
        pairs = []
        for s in samples:
            folder = output_dir / "images" / s.adapter
            folder.mkdir(parents=True, exist_ok=True)
            s.with_trigger_path = folder / f"{s.item:04d}_{s.image:02d}_T.png"
            s.without_trigger_path = folder / f"{s.item:04d}_{s.image:02d}.png"
            s.with_trigger.save(s.with_trigger_path)
            s.without_trigger.save(s.without_trigger_path)
            pairs.append({
                "adapter": s.adapter, "caption": s.caption,
                "reference": os.path.relpath(s.reference.resolve(), output_dir.resolve()),
                "with_trigger": os.path.relpath(s.with_trigger_path, output_dir),
                "without_trigger": os.path.relpath(s.without_trigger_path, output_dir),
            })
        (output_dir / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")

    document = {"settings": settings, "adapters": metrics}
    (output_dir / "metrics.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")

    columns = ["adapter", "item", "image", "seed", "caption", "prompt", "reference", "with_trigger",
               "without_trigger", "s_prompt", "s_id", "s_prev", "dino_id", "dino_pres"]
    columns += [key for key in JUDGE_SAMPLE_KEYS if any(key in s.scores for s in samples)]
    with open(output_dir / "per_sample.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for s in samples:
            writer.writerow({
                "adapter": s.adapter, "item": s.item, "image": s.image, "seed": s.seed, "caption": s.caption,
                "prompt": s.prompt, "reference": s.reference, "with_trigger": s.with_trigger_path or "",
                "without_trigger": s.without_trigger_path or "", **s.scores,
            })

    table = format_table(metrics)
    (output_dir / "table.md").write_text(table, encoding="utf-8")
    for adapter in metrics:
        make_grid([s for s in samples if s.adapter == adapter]).save(output_dir / f"grid_{adapter}.png")
        if reference_masks is not None:
            make_masked_grid([s for s in samples if s.adapter == adapter], reference_masks).save(
                output_dir / f"masked_{adapter}.png")
    make_comparison(samples).save(output_dir / "comparison.png")
    return table


def collect_settings(args: argparse.Namespace, clip: Clip, adapters: dict | None,
                     subject_judge: SubjectJudge | None = None) -> dict:
    """Every setting that shaped the numbers, for metrics.json."""

    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    settings.update(
        mode="folder" if args.pairs is not None else "generate",
        clip_model_resolved=clip.name,
        clip_pretrained=clip.pretrained,
        harmonic_mean_clamp_min=CLAMP_MIN,
        dino_preprocessing=(None if args.dino_model.lower() == "none" else
                            "shorter side resized (bicubic) to 256/224 of the input size, center crop of the "
                            "input size, ImageNet mean/std (the image processor's)"),
        versions={"open_clip": open_clip.__version__, "torch": torch.__version__},
    )
    if args.masks is None and args.segmenter is None:
        settings.pop("masks")
        settings.pop("segmenter")  # unmasked runs write the settings they always did
    else:
        settings["mask_fill"] = list(MASK_FILL)
        if args.segmenter == "border":
            settings["border_tolerance"] = BORDER_TOLERANCE
    if subject_judge is None:
        settings.pop("subject_judge", None)  # runs without the judge write the settings they always did
    else:
        settings["subject_judge_settings"] = asdict(subject_judge.module.JudgeSettings())
        settings["base_entry"] = subject_judge.base
    if adapters is not None:

        settings["lora"] = {name: (str(files) if files else None) for name, files in adapters.items()}
        settings["versions"]["diffusers"] = diffusers.__version__
    if args.pairs is not None:
        for key in ("seed", "num_inference_steps", "guidance_scale", "resolution", "num_images_per_prompt",
                    "mixed_precision", "pretrained_model_name_or_path", "revision", "variant"):
            settings.pop(key, None)  # not used: the images were made elsewhere
    return settings


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    """Run the evaluation; returns the per-adapter metrics (on non-main processes: {})."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    args = parse_args(argv)

    # Data: everything the user gave is checked before any model is loaded.
    generate = args.pairs is None
    if generate:
        items = load_eval_items(args.eval_data_dir, args.eval_prompts, args.trigger_token, args.instance_prompt)
        adapters = parse_lora_specs(args.lora)
        unrelated = None if args.unrelated_prompts is None else load_unrelated_prompts(args.unrelated_prompts,
                                                                                         args.trigger_token)
    else:
        samples = load_pairs(args.pairs, args.trigger_token)
        adapters = None
    judge_and_subject = None if args.subject_judge is None else load_subject_judge(args.subject_judge,
                                                                                     args.trigger_token)
    masks = mask_choice(args)
    reference_masks = None
    if masks is not None:  # a bad mask stops here; generated images are segmented once drawn
        reference_masks = mask_references(masks, [i.reference for i in items] if generate else
                                          [s.reference for s in samples])
        if not generate:
            mask_generated(masks, samples)
    resolve_clip_choice(args.clip_model, args.clip_pretrained)
    family = model_family(args) if generate else None  # SD 1.x/2.x, SDXL, ... from model_index.json; nothing heavy

    state = process_state()
    device = args.device or state.device

    # Models: the base pipeline once, every adapter checked against it, then the metric models.
    if generate:
        pipe = load_pipeline(family, args.mixed_precision, state.device)
        check_adapters(pipe, family, adapters)
        samples = plan_samples(adapters, items, args.num_images_per_prompt, args.seed)
    subject_judge = None
    if judge_and_subject is not None:
        subject_judge = SubjectJudge(*judge_and_subject, base_entry(adapters, samples))
        check_judge_inputs(samples, subject_judge.base)
    if not state.is_main_process and not generate:
        return {}
    clip = dino = None
    if state.is_main_process:
        clip = load_clip(args.clip_model, args.clip_pretrained, device)
        dino = load_dino(args.dino_model, device)

    # Generation (all processes), then embeddings, metrics and outputs on the main process.
    if generate:
        if state.is_main_process:
            logger.info("generating %d images for %d adapters on %d process(es)", 2 * len(samples),
                        len(adapters), state.num_processes)
        generate_images(pipe, family, adapters, samples, state, args.batch_size, args.num_inference_steps,
                        args.guidance_scale, args.resolution, args.trigger_token)
        if unrelated is not None:  # the base model draws them too, as the reference
            base = next((name for name, files in adapters.items() if files is None),
                        "base" if "base" not in adapters else "base_model")
            drawn = plan_samples({**adapters, base: None}, unrelated, args.num_images_per_prompt, args.seed)
            generate_images(pipe, family, {**adapters, base: None}, drawn, state, args.batch_size,
                            args.num_inference_steps, args.guidance_scale, args.resolution, args.trigger_token,
                            variants=("T",))
        if not state.is_main_process:
            return {}
        if masks is not None:
            mask_generated(masks, samples)
    metrics = score_samples(samples, clip, dino, args.batch_size, reference_masks)
    if subject_judge is not None:
        judge_samples(samples, metrics, subject_judge)
    settings = collect_settings(args, clip, adapters, subject_judge)
    if generate and unrelated is not None:
        for name, scores in unrelated_scores(drawn, base, clip, args.batch_size).items():
            metrics.get(name, {}).update(scores)
        write_unrelated(args.output_dir, drawn)
    table = write_outputs(args.output_dir, samples, metrics, settings, save_images=generate,
                          reference_masks=reference_masks)
    print(table, end="")
    logger.info("wrote %s", args.output_dir)
    return metrics


def cli(argv=None) -> None:
    """The command (``python evaluate_kps.py`` and the installed ``evaluate-kps``)."""
    try:
        main(argv)
    except InputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        # Under several processes, close the process group before the interpreter exits: left to interpreter
        # teardown, a process that finished early was seen aborting ("terminate called without an active
        # exception", SIGABRT) and failing the whole launch.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli()
