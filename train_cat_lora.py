#!/usr/bin/env python
# Copyright 2026 The CAT-LoRA authors. Licensed under the Apache License, Version 2.0.
"""Train a LoRA on Stable Diffusion 1.x/2.x with Contrastive Adapter Training (CAT).

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
import json
import logging
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class InputError(Exception):
    """Bad input from the user: reported as one line naming the flag or file, with exit status 2."""


# ---------------------------------------------------------------------------------------------------------
# Trigger handling (pure functions; evaluate_kps.py imports these so both scripts share one definition)
# ---------------------------------------------------------------------------------------------------------


def _trigger_pattern(trigger: str) -> re.Pattern:
    # A trigger is a whole word: not preceded or followed by a word character ("sksx" and "xsks" stay),
    # while punctuation right after it ("sks,") still counts as a word boundary.
    return re.compile(r"(?<!\w)" + re.escape(trigger) + r"(?!\w)")


def contains_trigger(caption: str, trigger: str) -> bool:
    """True when ``trigger`` occurs in ``caption`` as a whole word."""
    return bool(_trigger_pattern(trigger).search(caption))


def _tidy(caption: str) -> str:
    caption = re.sub(r"\s+", " ", caption).strip()
    # Removing a word can leave " ," or a leading comma behind: close the gap, drop the orphan.
    caption = re.sub(r"\s+([,.;:!?])", r"\1", caption)
    caption = re.sub(r"^[,;:]\s*", "", caption)
    return caption


def replace_trigger(caption: str, trigger: str, replacement: str) -> str:
    """Replace every whole-word occurrence of ``trigger`` with ``replacement`` and tidy the whitespace."""
    return _tidy(_trigger_pattern(trigger).sub(replacement, caption))


def strip_trigger(caption: str, trigger: str) -> str:
    """The paper's y from y_T (Eq. 3): the caption with its trigger word removed.

    The trigger is removed as a whole word, never as a substring, and whitespace is collapsed:
    ``"a photo of sks dog"`` -> ``"a photo of dog"``, ``"sks, a dog"`` -> ``"a dog"``,
    ``"a sksx dog"`` is left unchanged.
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
# Captions on disk
# ---------------------------------------------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (the order is part of the random stream)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


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
        for number, line in enumerate(metadata_file.read_text(encoding="utf-8").splitlines(), start=1):
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
            caption = caption_file.read_text(encoding="utf-8").strip()
        elif default_caption is not None:
            caption = default_caption
        else:
            raise InputError(
                f"{image}: no caption (add {caption_file.name}, a metadata.jsonl entry, or --instance_prompt)"
            )
        pairs.append((image, caption))
    return pairs
