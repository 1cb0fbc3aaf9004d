"""Load the toy evaluation CLIP (open_clip) offline and classify images zero-shot by shape and color.

The committed model is a folder with ``open_clip_config.json`` and ``open_clip_model.safetensors``; open_clip
builds it without any download:

    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:examples/toyworld/models/toy-clip")
    tokenizer = open_clip.get_tokenizer("local-dir:examples/toyworld/models/toy-clip")

Images are 32x32 RGB; the preprocessing is ToTensor + Normalize(0.5, 0.5), i.e. pixels mapped to [-1, 1].
"""

import math
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


# Why the judge's cosines lie in [0, 1]: both towers end with a LayerNorm and a linear map, e = A n + b, where n is
# the normalized (pre-affine) vector: zero mean and norm at most sqrt(width). So component j of any embedding is at
# least b_j - sqrt(width) * ||A_j - mean(A_j)||. Training keeps that bound >= 0 for every component of both towers
# (make_embeddings_nonnegative after each step): every embedding is non-negative whatever the input, hence every
# cosine, image-image or image-text, is in [0, 1], as the paper's Eqs. 5, 7 and 9 assume. open_clip's own
# CLIP class computes the embeddings, so evaluate_kps.py loads the judge as any open_clip model.


def _affine_bounds(ln, weight: torch.Tensor, bias, width: int):
    """(slope A (embed x width), offset b (embed), lower bound of each component) of e = weight @ ln(x) + bias."""
    slope = weight * ln.weight[None, :]
    offset = weight @ ln.bias + (bias if bias is not None else 0.0)
    spread = (slope - slope.mean(dim=1, keepdim=True)).norm(dim=1)
    return slope, offset, offset - math.sqrt(width) * spread


def embedding_lower_bounds(model) -> dict:
    """{"image": tensor(embed), "text": tensor(embed)}: the smallest value each embedding component can take, for
    any image or text. All >= 0 means every cosine of the judge is in [0, 1]."""
    with torch.no_grad():
        visual = model.visual
        image = _affine_bounds(visual.ln_post, visual.proj.t().float(), None, visual.proj.shape[0])[2]
        proj = model.text_projection
        if not isinstance(proj, torch.nn.Linear):
            raise ValueError("the toy CLIP's text projection must be a Linear layer with a bias (proj_bias)")
        text = _affine_bounds(model.ln_final, proj.weight.float(), proj.bias.float(), proj.weight.shape[1])[2]
    return {"image": image, "text": text}


@torch.no_grad()
def make_embeddings_nonnegative(model, margin: float = 1e-3):
    """Raise the towers' offsets just enough that every embedding component is >= margin for any input.

    Text: the projection's bias. Image (no bias in open_clip's ViT): the final LayerNorm's bias, by the
    least-norm change whose image under the projection is the missing amount.
    """
    bounds = embedding_lower_bounds(model)
    model.text_projection.bias += (margin - bounds["text"]).clamp(min=0)
    missing = (margin - bounds["image"]).clamp(min=0)
    if missing.any():
        change = torch.linalg.lstsq(model.visual.proj.t().float(), missing[:, None].float()).solution[:, 0]
        model.visual.ln_post.bias += change.to(model.visual.ln_post.bias.dtype)


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
