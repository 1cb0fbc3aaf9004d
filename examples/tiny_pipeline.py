"""Build complete, tiny SD 1.x, SDXL, Flux.1, SD3, Qwen-Image, Z-Image and FLUX.2 pipeline directories offline.

The result loads with ``DiffusionPipeline.from_pretrained(path)`` exactly like a hub model, but its weights are
random and small, so tests and the README demo run on a CPU with no model hub. The CLIP tokenizer is the real CLIP
BPE tokenizer: its vocabulary and merges are derived from ``bpe_simple_vocab_16e6.txt.gz``, the file
open_clip_torch ships inside its package.

The T5 tokenizer (Flux.1, SD3) is a small Unigram model built with the ``tokenizers`` library (the only kind that
survives transformers 5's save and reload of ``T5Tokenizer``). The Qwen tokenizer (Qwen-Image, Z-Image, FLUX.2
[klein]) and the Mistral one inside FLUX.2 [dev]'s ``PixtralProcessor`` are small byte-level BPEs learnt here on
the test captions' words and the pipelines' prompt templates.

All the new families' VAEs down-sample by 2 and their transformers work on 2x2 patches: a 32x32 image is a 16x16
latent and an 8x8 grid of tokens.

Run as a script to write one: ``python examples/tiny_pipeline.py OUT_DIR [--family sd|sdxl|flux|sd3|qwenimage|
zimage|flux2_klein|flux2]``.
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


# ---------------------------------------------------------------------------------------------------------------
# Stable Diffusion 3, Qwen-Image, Z-Image and FLUX.2: tokenizers first, then one builder per family.
# ---------------------------------------------------------------------------------------------------------------

# The system prompt of QwenImagePipeline's template (``prompt_template_encode``): its words get one token each, so
# the template's prefix is 34 tokens long, as with the real Qwen2.5-VL tokenizer, and the pipeline's
# ``prompt_template_encode_start_idx`` (34) drops exactly the prefix. The builder checks this.
QWEN_IMAGE_SYSTEM_PROMPT = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                            "relationships of the objects and background:")
# Qwen's special tokens, in the order of the real vocabulary (<|endoftext|> 151643, <|im_start|> 151644, ...);
# the vision ones are there so that Qwen2.5-VL's image/video token ids point at tokens no caption produces.
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                       "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Qwen3's reasoning markers are added tokens but not special ones (Flux2KleinPipeline's template writes an empty
# "<think>\n\n</think>\n\n" block, enable_thinking=False).
QWEN3_THINK_TOKENS = ("<think>", "</think>")
# Qwen3's chat template, reduced to what the pipelines use (text messages, add_generation_prompt, enable_thinking):
# for these it renders the same string as the original.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') -%}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def learn_byte_level_bpe(texts, pre_tokenizer):
    """Vocabulary and merges of a byte-level BPE learnt on ``texts`` until every pre-token is one token.

    A plain BPE learner (the most frequent pair first, ties broken by the pairs' text), so the vocabulary is a
    pure function of the texts. It starts with the 256 byte characters: any text can still be encoded.
    """
    from collections import Counter

    words = Counter(tuple(piece) for text in texts for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    merges = []
    while True:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    vocab = {char: i for i, char in enumerate(_bytes_to_unicode().values())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab, merges


def build_qwen_tokenizer(chat_template: bool = False, words=None):
    """A small ``Qwen2Tokenizer`` (byte-level BPE, ~450 tokens) for Qwen2.5-VL and Qwen3 text encoders.

    The words of the test captions, of QwenImagePipeline's system prompt and of the chat markup are single tokens,
    with and without a leading space; anything else falls back to byte tokens. ``Qwen2Tokenizer.__init__``
    rebuilds the normalizer, pre-tokenizer and decoder itself, and on reload transformers 5 passes it only the
    vocabulary and merges from tokenizer.json (plus the added tokens): the BPE is therefore learnt with the same
    pre-tokenizer, so the saved tokenizer encodes exactly as the one built here. ``chat_template`` adds a Qwen3
    chat template (for the pipelines that call ``apply_chat_template``). Pad is ``<|endoftext|>``, eos
    ``<|im_end|>``, padding on the right, as Qwen's. ``words``: the caption words made single tokens (default: the
    test captions' ``T5_WORDS``; the toy world's Z-Image model passes its own vocabulary).
    """
    from tokenizers import AddedToken, Regex, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # (The default list's first word, "a", has no " a" piece of its own; a given list's first word gets one.)
    lead = "" if words is None else " "
    words = list(T5_WORDS if words is None else words) + ["system", "user", "assistant"]
    texts = [QWEN_IMAGE_SYSTEM_PROMPT, lead + " ".join(words), "\n".join(words), "\n\n"]
    vocab, merges = learn_byte_level_bpe(texts, pre_tokenizer)
    for token in QWEN_SPECIAL_TOKENS + QWEN3_THINK_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               unk_token=None, extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
                               model_max_length=131072)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in QWEN3_THINK_TOKENS])
    if chat_template:
        tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def _save_pipeline(pipe, out_dir: Path) -> str:
    pipe.save_pretrained(out_dir, safe_serialization=True)
    if (out_dir / "_tokenizer_src").is_dir():
        remove_tokenizer_source(out_dir)
    return str(out_dir)


def build_tiny_sd3_pipeline(out_dir, seed: int = 0):
    """Create and save a tiny random Stable Diffusion 3 pipeline at ``out_dir``; return the path as a string.

    Three text encoders of three widths, as SD3's (CLIP-L 768, CLIP-G 1280, T5 4096): CLIP-L 16, CLIP-G 32 and
    T5 64. The pipeline concatenates the CLIPs' penultimate hidden states (16 + 32 = 48), zero-pads them to T5's
    width and appends T5's sequence (joint_attention_dim 64); the pooled input is the two projections (16 + 32 =
    48). A mix-up of the encoders or a missing pad fails on shape. The VAE has two blocks (scale factor 2) and
    SD3's 16 latent channels, shift and scale factor; the transformer's patch size is 2 (SD3's), so a 32x32 image
    is a 16x16 latent and an 8x8 grid of patches. Scheduler: SD3's flow matching with shift 3.
    """
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import T5Config, T5EncoderModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    clip_l_width, clip_g_width, t5_width, latent_channels = 16, 32, 64, 16
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=latent_channels, out_channels=latent_channels, num_layers=1,
        attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=t5_width,
        pooled_projection_dim=clip_l_width + clip_g_width, pos_embed_max_size=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=32, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,
    )

    def clip(width: int):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_attention_heads=2,
            num_hidden_layers=2, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=width, hidden_act="gelu",
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))

    text_encoder, text_encoder_2 = clip(clip_l_width), clip(clip_g_width)
    tokenizer = build_clip_tokenizer(out_dir / "_tokenizer_src")
    # SD3's second CLIP tokenizer pads with "!" (id 0), as SDXL's; the first pads with <|endoftext|>.
    tokenizer_2 = CLIPTokenizer(str(out_dir / "_tokenizer_src" / "vocab.json"),
                                str(out_dir / "_tokenizer_src" / "merges.txt"), pad_token="!",
                                model_max_length=CLIP_MAX_LENGTH)
    tokenizer_3 = build_t5_tokenizer()
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=t5_width, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return _save_pipeline(pipe, out_dir)


def build_tiny_qwenimage_pipeline(out_dir, seed: int = 0):
    """Create and save a tiny random Qwen-Image pipeline at ``out_dir``; return the path as a string.

    Text encoder: a one-layer Qwen2.5-VL (width 32, with a one-block vision tower the pipeline never calls); the
    pipeline reads its last hidden state (``hidden_states[-1]``) after dropping the 34 tokens of its template's
    prefix. The transformer packs 2x2 latent patches (in_channels 64 = 16 latent channels x 4). The VAE is
    Qwen-Image's (Wan-style, causal 3-D convolutions) with one down-sampling (``vae_scale_factor`` 2) and its 16
    latent channels with the real ``latents_mean``/``latents_std``; a 32x32 image is a 16x16 latent and an 8x8
    grid of tokens. The scheduler has Qwen-Image's settings (dynamic exponential shift, shift_terminal 0.02).
    """
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    text_width, latent_channels = 32, 16
    tokenizer = build_qwen_tokenizer(chat_template=False)
    token_id = tokenizer.convert_tokens_to_ids
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
            # head_dim 16: the multimodal RoPE sections (t, h, w) cover its 8 frequencies (Qwen's 16/24/24 of 64).
            rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]}, rope_theta=1000000.0,
            bos_token_id=token_id("<|endoftext|>"), eos_token_id=token_id("<|im_end|>"),
            pad_token_id=token_id("<|endoftext|>")),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=text_width,
                           fullatt_block_indexes=[0]),
        image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
    )).eval()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=latent_channels * 4, out_channels=latent_channels, num_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=text_width, axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=latent_channels, dim_mult=[1, 2], num_res_blocks=1,
                                 temperal_downsample=[False])
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    if len(tokenizer(prefix).input_ids) != pipe.prompt_template_encode_start_idx:
        raise RuntimeError(f"the prompt template's prefix is {len(tokenizer(prefix).input_ids)} tokens, but "
                           f"QwenImagePipeline drops {pipe.prompt_template_encode_start_idx}")
    return _save_pipeline(pipe, out_dir)


def build_tiny_zimage_pipeline(out_dir, seed: int = 0):
    """Create and save a tiny random Z-Image pipeline at ``out_dir``; return the path as a string.

    Text encoder: a two-layer ``Qwen3Model`` (width 32); the pipeline formats the prompt with the tokenizer's
    chat template and reads the penultimate hidden state (``hidden_states[-2]``, the first layer's output here;
    Z-Image's Qwen3-4B is 2560 wide), keeping only the unpadded tokens. The transformer (one main and one refiner
    layer) patchifies 2x2 itself, so in_channels is the VAE's 16 latent channels. The VAE is an ``AutoencoderKL``
    with Flux.1's shift and scale factor (Z-Image uses Flux.1's VAE), two blocks: ``vae_scale_factor`` 2, a 32x32
    image is a 16x16 latent and an 8x8 grid of tokens. Scheduler: Z-Image-Turbo's (shift 3, no dynamic shift).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    text_width, latent_channels = 32, 16
    tokenizer = build_qwen_tokenizer(chat_template=True)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=latent_channels, dim=32, n_layers=1,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=text_width, axes_dims=[4, 6, 6],
        axes_lens=[1024, 64, 64],
    )
    # The padding embeddings (image and caption sequences are padded to multiples of 32) start as zeros in
    # diffusers 0.42 and as torch.empty (random memory, possibly NaN) in earlier releases: give them values.
    with torch.no_grad():
        transformer.x_pad_token.normal_(std=0.02)
        transformer.cap_pad_token.normal_(std=0.02)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=32, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    return _save_pipeline(pipe, out_dir)


def _tiny_flux2_parts(text_width: int, latent_channels: int, guidance_embeds: bool) -> tuple:
    """The transformer, VAE and scheduler that FLUX.2 [klein] and [dev] share (the text encoders differ); the
    transformer reads three stacked hidden layers of the text encoder."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=latent_channels * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * text_width, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    )
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=32,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )
    return transformer, vae, scheduler


def build_tiny_flux2_klein_pipeline(out_dir, seed: int = 0):
    """Create and save a tiny random FLUX.2 [klein] pipeline at ``out_dir``; return the path as a string.

    Text encoder: ``Qwen3ForCausalLM`` of width 32 with 28 layers, because the pipeline stacks the hidden states
    9, 18 and 27 (``text_encoder_out_layers`` default) into a 3 x 32 = 96-wide sequence (joint_attention_dim 96;
    Klein 4B's Qwen3-4B gives 3 x 2560); the prompt goes through the chat template with ``enable_thinking=False``.
    The transformer has one double- and one single-stream block, no guidance embedding (as Klein). The VAE is
    FLUX.2's (``AutoencoderKLFlux2``, 32 latent channels, a batch norm over 2x2-patchified latents) with two
    blocks: ``vae_scale_factor`` 2, a 32x32 image is a 16x16x32 latent, patchified to 8x8x128 (in_channels 128).
    """
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    text_width, latent_channels = 32, 32
    tokenizer = build_qwen_tokenizer(chat_template=True)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=64, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    transformer, vae, scheduler = _tiny_flux2_parts(text_width, latent_channels, guidance_embeds=False)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)
    return _save_pipeline(pipe, out_dir)


# Mistral's "tekken" pre-tokenization pattern (as in Mistral-Small-3.1's tekken.json; tiktoken-like, no English
# contractions).
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                  r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
# The first 20 control tokens of Mistral-Small-3.1's vocabulary, at their ids (<s> 1, </s> 2, [IMG] 10, <pad> 11...).
MISTRAL_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                          "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                          "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                          "[TOOL_CONTENT]")
# Mistral-Small-3.1's chat template, reduced to system and user turns of text and images (what Flux2Pipeline
# renders): <s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{- '[SYSTEM_PROMPT]' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '[INST]' -}}{%- endif -%}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- else -%}{{- '[IMG]' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if message['role'] == 'system' -%}{{- '[/SYSTEM_PROMPT]' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '[/INST]' -}}"
    "{%- else -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)


def build_mistral_processor(patch_size: int = 14, image_size: int = 56):
    """A small ``PixtralProcessor`` (Mistral-Small-3.1's processor, the "tokenizer" of FLUX.2 [dev]).

    Its tokenizer is a byte-level BPE with Mistral's pre-tokenization and control tokens, learnt on the test
    captions' words and on Flux2Pipeline's system message (one token a word), kept as a plain ``TokenizersBackend``
    so that tokenizer.json is reloaded as written (no ``mistral-common``, no tekken.json). The image processor
    only serves prompt upsampling with images, which the tests do not use; its patch size and longest edge
    match the tiny vision tower.
    """
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PixtralProcessor, TokenizersBackend
    from transformers.models.pixtral.image_processing_pixtral import PixtralImageProcessor

    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TEKKEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    vocab, merges = learn_byte_level_bpe([SYSTEM_MESSAGE, " ".join(T5_WORDS), "\n".join(T5_WORDS)], pre_tokenizer)
    vocab = {token: i + len(MISTRAL_SPECIAL_TOKENS) for token, i in vocab.items()}
    vocab.update({token: i for i, token in enumerate(MISTRAL_SPECIAL_TOKENS)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in MISTRAL_SPECIAL_TOKENS])
    tokenizer = TokenizersBackend(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", model_max_length=131072)
    image_processor = PixtralImageProcessor(patch_size={"height": patch_size, "width": patch_size},
                                            size={"longest_edge": image_size})
    return PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                            spatial_merge_size=2, chat_template=MISTRAL_CHAT_TEMPLATE)


def build_tiny_flux2_pipeline(out_dir, seed: int = 0):
    """Create and save a tiny random FLUX.2 [dev] pipeline at ``out_dir``; return the path as a string.

    Text encoder: ``Mistral3ForConditionalGeneration`` (as Mistral-Small-3.1) with a text model of width 32 and
    31 layers, because the pipeline stacks the hidden states 10, 20 and 30 (``text_encoder_out_layers`` default)
    into a 3 x 32 = 96-wide sequence (joint_attention_dim 96; the real one is 3 x 5120), and a one-layer Pixtral
    vision tower the pipeline never calls for text-to-image. The prompt is rendered with Flux2Pipeline's system
    message by the processor's chat template, so ``max_sequence_length`` must leave room for it (37 tokens with
    "a photo of sks teapot"). Transformer, VAE and scheduler as ``build_tiny_flux2_klein_pipeline``'s, except
    the guidance embedding (FLUX.2 [dev] is guidance-distilled).
    """
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    text_width, latent_channels, patch_size, image_size = 32, 32, 14, 56
    processor = build_mistral_processor(patch_size, image_size)
    token_id = processor.tokenizer.convert_tokens_to_ids
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(
            model_type="mistral", vocab_size=len(processor.tokenizer), hidden_size=text_width, intermediate_size=64,
            num_hidden_layers=31, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            max_position_embeddings=2048, rope_theta=1000000000.0, sliding_window=None, bos_token_id=token_id("<s>"),
            eos_token_id=token_id("</s>"), pad_token_id=token_id("<pad>")),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=image_size, patch_size=patch_size),
        image_token_index=token_id("[IMG]"), spatial_merge_size=2, vision_feature_layer=-1,
    )).eval()
    transformer, vae, scheduler = _tiny_flux2_parts(text_width, latent_channels, guidance_embeds=True)
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=processor,
                         transformer=transformer)
    return _save_pipeline(pipe, out_dir)


# Caption tokens the tiny pipelines read in tests and benchmarks: --max_sequence_length is this plus what the
# family's prompt template takes (FLUX.2 [dev]'s system message alone is 31 tokens). At the default 512 the text
# would be 8x the tiny transformers' 64 image tokens.
CAPTION_TOKENS = 16


def tiny_sequence_length(family) -> int:
    """--max_sequence_length for a tiny pipeline of ``family`` (a train_cat_lora family object)."""
    template = getattr(family, "template_tokens", None)
    return CAPTION_TOKENS + (template() if template else 0)


BUILDERS = {
    "sd": build_tiny_pipeline,
    "sdxl": build_tiny_sdxl_pipeline,
    "flux": build_tiny_flux_pipeline,
    "sd3": build_tiny_sd3_pipeline,
    "qwenimage": build_tiny_qwenimage_pipeline,
    "zimage": build_tiny_zimage_pipeline,
    "flux2_klein": build_tiny_flux2_klein_pipeline,
    "flux2": build_tiny_flux2_pipeline,
}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon",
                        help="SD 1.x only")
    parser.add_argument("--family", choices=list(BUILDERS), default="sd")
    cli = parser.parse_args()
    if cli.family == "sd":
        print(build_tiny_pipeline(cli.output_dir, cli.seed, cli.prediction_type))
    else:
        print(BUILDERS[cli.family](cli.output_dir, cli.seed))
