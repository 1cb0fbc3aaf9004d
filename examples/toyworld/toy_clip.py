"""Load the toy evaluation CLIP (open_clip) offline and classify images zero-shot by shape and color.

The committed model is a folder with ``open_clip_config.json`` and ``open_clip_model.safetensors``; open_clip
builds it without any download:

    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:examples/toyworld/models/toy-clip")
    tokenizer = open_clip.get_tokenizer("local-dir:examples/toyworld/models/toy-clip")

Images are 32x32 RGB; the preprocessing is ToTensor + Normalize(0.5, 0.5), i.e. pixels mapped to [-1, 1].
"""

from pathlib import Path

import numpy as np
import torch

import world

HERE = Path(__file__).resolve().parent
DEFAULT_CLIP_DIR = HERE / "models" / "toy-clip"


def load_toy_clip(clip_dir=DEFAULT_CLIP_DIR):
    """(model in eval mode, tokenizer) of the toy CLIP."""
    import open_clip

    name = f"local-dir:{Path(clip_dir).resolve()}"
    model = open_clip.create_model(name)
    return model.eval(), open_clip.get_tokenizer(name)


def to_clip_input(images) -> torch.Tensor:
    """uint8 NHWC arrays, or float NHWC in [0, 1] (diffusers output_type="np") -> NCHW in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    return x.float().permute(0, 3, 1, 2) * 2.0 - 1.0


@torch.no_grad()
def zero_shot(model, tokenizer, x: torch.Tensor):
    """Predicted (shapes, colors) for images x (NCHW in [-1, 1]).

    Each image is matched against the 24 prompts "a photo of a {color} {shape}"; the best prompt gives both.
    """
    pairs = [(s, c) for s in world.SHAPES for c in world.COLORS]
    txt = model.encode_text(tokenizer([f"a photo of a {c} {s}" for s, c in pairs]), normalize=True)
    img = model.encode_image(x, normalize=True)
    best = (img @ txt.t()).argmax(dim=1).tolist()
    return [pairs[b][0] for b in best], [pairs[b][1] for b in best]
