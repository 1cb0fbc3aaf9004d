"""Build complete, tiny Stable Diffusion 1.x and SDXL pipeline directories offline.

The result loads with ``StableDiffusionPipeline.from_pretrained(path)`` exactly like a hub model, but its
weights are random and small, so tests and the README demo run on a CPU with no model hub. The tokenizer
is the real CLIP BPE tokenizer: its vocabulary and merges are derived from ``bpe_simple_vocab_16e6.txt.gz``,
the file open_clip_torch ships inside its package.

Run as a script to write one: ``python tests/tiny_pipeline.py OUT_DIR [--family sdxl]``.
"""

import argparse
import gzip
import json
import os
from pathlib import Path

import open_clip
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CLIP_MAX_LENGTH = 77


def clip_bpe_file() -> Path:
    """Path of the CLIP BPE merges file bundled with open_clip_torch."""

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip_torch does not ship {path.name} at {path}")
    return path


def _bytes_to_unicode() -> dict:
    # CLIP's reversible byte -> printable-character table (same construction as GPT-2's BPE).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_clip_tokenizer_files(out_dir: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of the original CLIP tokenizer (49,408 tokens)."""
    lines = gzip.open(clip_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    # The first line is a version header; CLIP uses the next 49152 - 256 - 2 merges.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def build_clip_tokenizer(out_dir: Path):

    write_clip_tokenizer_files(out_dir)
    return CLIPTokenizer(
        str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=CLIP_MAX_LENGTH
    )


def tiny_vae():
    """A two-block VAE (scale factor 2) of the kind diffusers' fast tests use."""

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
                         norm_num_groups=32, sample_size=32)


def remove_tokenizer_source(out_dir: Path) -> None:
    """The vocabulary files the tokenizer was built from: the saved pipeline has its own copy."""
    for name in ("vocab.json", "merges.txt"):
        os.remove(out_dir / "_tokenizer_src" / name)
    os.rmdir(out_dir / "_tokenizer_src")


def build_tiny_pipeline(out_dir, seed: int = 0, prediction_type: str = "epsilon"):
    """Create and save a tiny random SD 1.x pipeline at ``out_dir``; return the path as a string."""

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = tiny_vae()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    tokenizer = build_clip_tokenizer(out_dir / "_tokenizer_src")
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    remove_tokenizer_source(out_dir)
    # Training scripts take their noise scheduler from the same folder (DDPMScheduler.from_pretrained).
    DDPMScheduler.from_config(scheduler.config)  # validates that the config is usable for training
    return str(out_dir)


def build_tiny_sdxl_pipeline(out_dir, seed: int = 0):
    """Create and save a tiny random SDXL pipeline at ``out_dir``; return the path as a string.

    The two text encoders have different widths (32 and 64), so a mix-up of their hidden states or pooled
    outputs fails on shape instead of passing silently. The U-Net's added-condition input is the second
    encoder's projection (32) plus the six time ids of ``addition_time_embed_dim`` 8.
    """
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    first_width, second_width, projection = 32, 64, 32
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=projection + 6 * 8,
        cross_attention_dim=first_width + second_width,
        norm_num_groups=32,
    )
    vae = tiny_vae()

    def clip_config(width: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=37, num_attention_heads=4,
                              num_hidden_layers=2, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=projection,
                              hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)

    text_encoder = CLIPTextModel(clip_config(first_width))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(second_width))
    tokenizer = build_clip_tokenizer(out_dir / "_tokenizer_src")
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, scheduler=scheduler, add_watermarker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    remove_tokenizer_source(out_dir)
    return str(out_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon")
    parser.add_argument("--family", choices=["sd", "sdxl"], default="sd")
    cli = parser.parse_args()
    if cli.family == "sdxl":
        print(build_tiny_sdxl_pipeline(cli.output_dir, cli.seed))
    else:
        print(build_tiny_pipeline(cli.output_dir, cli.seed, cli.prediction_type))
