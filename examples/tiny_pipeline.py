"""Build complete, tiny Stable Diffusion 1.x, SDXL and Flux.1 pipeline directories offline.

The result loads with ``StableDiffusionPipeline.from_pretrained(path)`` exactly like a hub model, but its
weights are random and small, so tests and the README demo run on a CPU with no model hub. The tokenizer
is the real CLIP BPE tokenizer: its vocabulary and merges are derived from ``bpe_simple_vocab_16e6.txt.gz``,
the file open_clip_torch ships inside its package.

Flux's T5 tokenizer is a small Unigram model built with the ``tokenizers`` library (the only kind that survives
transformers 5's save and reload of ``T5Tokenizer``).

Run as a script to write one: ``python examples/tiny_pipeline.py OUT_DIR [--family sdxl|flux]``.
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


# Words of the test captions get one piece each; anything else falls back to single characters.
T5_WORDS = ("a photo of sks teapot dog cat on the table in red blue green with and an image picture "
            "toy sitting ball").split()


def build_t5_tokenizer(max_length: int = 512):
    """A small T5 tokenizer (Unigram, ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no ``<extra_id_*>`` tokens)."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + word, -2.0) for word in T5_WORDS]
    pieces += [(char, -5.0) for char in string.ascii_letters + string.digits + string.punctuation]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, extra_ids=0, eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>", model_max_length=max_length)


def build_tiny_flux_pipeline(out_dir, seed: int = 0):
    """Create and save a tiny random Flux.1-dev-like pipeline at ``out_dir``; return the path as a string.

    The transformer has one double-stream and one single-stream block and the guidance embedding (as
    Flux.1-dev). T5 (width 48) and CLIP (width 32) have different widths, so a mix-up of the sequence and the
    pooled embedding fails on shape. The VAE has two blocks (scale factor 2) and 4 latent channels, with a
    shift and a scale as Flux's; the scheduler has Flux.1-dev's flow-matching settings.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    t5_width, clip_width, latent_channels = 48, 32, 4
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=latent_channels * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_width, pooled_projection_dim=clip_width,
        guidance_embeds=True, axes_dims_rope=[4, 4, 8],
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=32, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=clip_width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=32, hidden_act="gelu", bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407))
    tokenizer_2 = build_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=t5_width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    tokenizer = build_clip_tokenizer(out_dir / "_tokenizer_src")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        os.remove(out_dir / "_tokenizer_src" / name)
    os.rmdir(out_dir / "_tokenizer_src")
    return str(out_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon")
    parser.add_argument("--family", choices=["sd", "sdxl", "flux"], default="sd")
    cli = parser.parse_args()
    if cli.family == "flux":
        print(build_tiny_flux_pipeline(cli.output_dir, cli.seed))
    elif cli.family == "sdxl":
        print(build_tiny_sdxl_pipeline(cli.output_dir, cli.seed))
    else:
        print(build_tiny_pipeline(cli.output_dir, cli.seed, cli.prediction_type))
