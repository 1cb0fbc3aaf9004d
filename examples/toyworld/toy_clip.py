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


# Why the judge's cosines lie in [0, 1] (the paper's Eqs. 5, 7 and 9 assume similarities in [0, 1]): training
# penalises negative embedding components, and raise_embedding_offsets then shifts all image embeddings by one
# constant vector, and all text embeddings by another, so that every component is positive on a large and varied
# calibration set (world images, patterned shapes, noise; captions, names, random token strings). open_clip's own
# CLIP class computes the embeddings (the shifts live in the text projection's bias and the image tower's final
# LayerNorm bias), so evaluate_kps.py loads the judge as any open_clip model. This is checked on fresh images
# and tokenized texts in tests/test_toyworld_v2.py, not proven for every input (raw random id sequences without
# an end-of-text token can still give slightly negative components): a worst-case bound (LayerNorm output norm
# <= sqrt(width)) is so loose that enforcing it during training collapsed every image to one embedding.


@torch.no_grad()
def raise_embedding_offsets(model, images: torch.Tensor, texts: torch.Tensor, margin: float = 0.02,
                            batch_size: int = 512) -> dict:
    """Shift image and text embeddings by constant vectors so that each component is >= margin x the median
    embedding norm on these images (NCHW in [-1, 1]) and token ids. Returns the shifts' norms."""
    def features(encode, data):
        return torch.cat([encode(data[i:i + batch_size]).float() for i in range(0, len(data), batch_size)])

    image_f, text_f = features(model.encode_image, images), features(model.encode_text, texts)
    need_image = (margin * image_f.norm(dim=1).median() - image_f.min(dim=0).values).clamp(min=0)
    need_text = (margin * text_f.norm(dim=1).median() - text_f.min(dim=0).values).clamp(min=0)
    model.text_projection.bias += need_text.to(model.text_projection.bias.dtype)
    # The image tower has no bias after its projection: move its final LayerNorm's bias by the least-norm change
    # whose projection is the shift.
    change = torch.linalg.lstsq(model.visual.proj.t().float(), need_image[:, None]).solution[:, 0]
    model.visual.ln_post.bias += change.to(model.visual.ln_post.bias.dtype)
    return {"image": need_image.norm().item(), "text": need_text.norm().item()}


def negative_mass(features: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the summed negative components of L2-normalized features (0 when all are >= 0)."""
    return torch.relu(-torch.nn.functional.normalize(features, dim=-1)).sum(dim=-1).mean()


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


@torch.no_grad()
def shows_subject(model, subject_images, base_images, images) -> torch.Tensor:
    """Per image, whether the judge calls it the subject: closer (cosine) to the mean embedding of the subject's
    training images than to the mean embedding of the base model's images (of the same captions, without the
    trigger). Images as uint8 NHWC or float NHWC in [0, 1]. Used by check_binding.py and reproduce_table1.py."""
    def unit_mean(x):
        return torch.nn.functional.normalize(model.encode_image(to_clip_input(x), normalize=True).mean(0), dim=0)

    embeddings = model.encode_image(to_clip_input(images), normalize=True)
    return embeddings @ unit_mean(subject_images) > embeddings @ unit_mean(base_images)
