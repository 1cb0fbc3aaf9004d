"""Pretrain the toy world's base model and its evaluation CLIP, on the CPU, from scratch.

Stages (run in this order; each resumes from its last checkpoint in --work_dir if interrupted):

  vae     AutoencoderKL, 32x32 RGB -> 16x16x4 latents (reconstruction + a small KL term).
  unet    UNet2DConditionModel + CLIPTextModel (real CLIP BPE tokenizer) trained jointly on VAE latents,
          epsilon prediction with SD's noise schedule, 10% empty captions for classifier-free guidance, EMA.
  clip    A small open_clip model (ViT image tower, text transformer) trained contrastively on the world and on
          captioned two-color patterned shapes.
  export  Writes the diffusers StableDiffusionPipeline (EMA weights) to --pipeline_dir and the open_clip
          config + weights to --clip_dir.

Every stage runs through one loop, train_loop (resume, step, log, checkpoint). The v2 models (README.md) add
rare-word names to the unet stage's captions (--name_caption_prob) with a word-recognition term for the text
encoder (--word_loss_weight), and a non-negative judge (--clip_nonneg_weight, then calibrated offsets).

Shape x color pairs in world.HELD_OUT_PAIRS are never shown to the VAE, UNet or text encoder; the evaluation
CLIP sees the whole world (it is the judge, not the model under test).

Example (the exact commands that made the committed models are in README.md):
  python pretrain.py --stage vae --threads 1
  nohup python pretrain.py --stage unet --steps 7250 --threads 1 > _work/unet.log 2>&1 &
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import world
from toy_clip import negative_mass, raise_embedding_offsets, zero_shot

HERE = Path(__file__).resolve().parent

RESOLUTION = 32
# The words the unet stage's word-recognition term looks for (--word_loss_weight).
WORD_VOCAB = (*world.SHAPES, *world.COLORS, *world.SIZES, *world.BACKGROUNDS, "photo", "shape",
              *world.BOUND_NAMES, *world.WEAK_NAMES, *world.PLAIN_NAMES)
TEXT_HIDDEN = 64
CLIP_MAX_LENGTH = 77


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def world_data(work_dir: Path, n: int, seed: int, exclude_pairs=world.HELD_OUT_PAIRS):
    """Images (uint8 N x 32 x 32 x 3) and scenes of the training set, cached in work_dir."""
    tag = "heldout" if exclude_pairs else "all"
    path = work_dir / f"data_{tag}_{n}_{seed}.npz"
    if path.exists():
        data = np.load(path, allow_pickle=False)
        scenes = [world.Scene(*row[:4], float(row[4]), float(row[5])) for row in json.loads(str(data["scenes"]))]
        return data["images"], scenes
    images, _, scenes = world.make_dataset(n, seed, RESOLUTION, exclude_pairs)
    rows = [[s.shape, s.color, s.size, s.background, s.cx, s.cy] for s in scenes]
    np.savez(path, images=images, scenes=json.dumps(rows))
    return images, scenes


def pattern_data(work_dir: Path, n: int, seed: int):
    """Two-color patterned shapes (uint8 N x 32 x 32 x 3) and their captions, cached in work_dir.

    The stream is world.random_patterned_sample from seed + 7: the images the v1 decoder stage drew (it cached
    the images alone, as patterns_{n}_{seed}.npy)."""
    path = work_dir / f"patterns_captioned_{n}_{seed}.npz"
    if path.exists():
        data = np.load(path, allow_pickle=False)
        return data["images"], json.loads(str(data["captions"]))
    rng = np.random.default_rng(seed + 7)
    samples = [world.random_patterned_sample(rng, RESOLUTION) for _ in tqdm(range(n), desc="render patterns")]
    images, captions = np.stack([s[0] for s in samples]), [s[1] for s in samples]
    np.savez(path, images=images, captions=json.dumps(captions))
    return images, captions


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RESOLUTION,
        mid_block_add_attention=False,
    )


def make_unet(channels):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        # No attention at the 16x16 level (2.4x faster on the CPU); text cross-attention at 8x8 and 4x4.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=4 * TEXT_HIDDEN,
            num_attention_heads=4,
            num_hidden_layers=3,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def make_tokenizer(work_dir: Path):
    from tiny_pipeline import build_clip_tokenizer

    return build_clip_tokenizer(work_dir / "tokenizer")


def noise_scheduler_config():
    # Stable Diffusion 1.x's training schedule.
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": RESOLUTION, "layers": 3, "width": 64, "head_width": 16, "patch_size": 4},
    # proj_bias: the text-side offset that keeps embedding components > 0 (toy_clip.raise_embedding_offsets).
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2,
                 "proj_bias": True},
}
CLIP_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                   "resize_mode": "shortest"}


# ---------------------------------------------------------------------------------------------------------
# Checkpoints and the training loop every stage uses
# ---------------------------------------------------------------------------------------------------------


def save_ckpt(path: Path, state: dict):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_ckpt(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def ema_updater(ema_params, params, ema_decay: float):
    """train_loop's ``after_step``: EMA of ``params`` in ``ema_params``, with a decay warming up to ``ema_decay``."""
    def update_ema(step):
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)

    return update_ema


def train_loop(desc: str, ckpt_path: Path, modules: dict, opt, steps: int, seed: int, lr_at, loss_fn, *,
               ckpt_every: int, clip_grad_params=None, after_step=None, extra_state=None, on_checkpoint=None):
    """The training loop of every stage: resume, step, log, checkpoint.

    modules: {checkpoint key: module} saved and resumed with the optimizer ("opt") and the step count ("step").
    lr_at(step) -> learning rate. loss_fn(gen, rng) -> (loss tensor, {name: float} to show on the progress bar),
    with gen a torch.Generator and rng a numpy Generator seeded with seed. A checkpoint keeps both streams' states
    ("rng"), so a run resumed from it is bit-exact the uninterrupted run (same threads); a checkpoint without them
    (written before v5, or seeded from an exported model) restarts the streams from seed + the step resumed from.
    after_step(step) runs after each optimizer step (EMA, constraints); on_checkpoint(step) after each checkpoint
    is written.
    """
    ckpt = load_ckpt(ckpt_path)
    start = 0
    if ckpt:
        for key, module in modules.items():
            module.load_state_dict(ckpt[key])
        if "opt" in ckpt:  # a checkpoint seeded from an exported model has none: the optimizer starts fresh
            opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
        print(f"{desc}: resumed from step {start}")
    gen = torch.Generator().manual_seed(seed + start)
    rng = np.random.default_rng(seed + start)
    if ckpt and "rng" in ckpt:  # the random streams where they stood: the resumed run is the uninterrupted one
        gen.set_state(ckpt["rng"]["torch"])
        rng.bit_generator.state = ckpt["rng"]["numpy"]
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc, mininterval=5)
    t0, losses = time.time(), []
    for step in bar:
        lr = lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        loss, logs = loss_fn(gen, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_params is not None:
            torch.nn.utils.clip_grad_norm_(clip_grad_params, 1.0)
        opt.step()
        if after_step is not None:
            after_step(step)
        losses.append(loss.item())
        if (step + 1) % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{lr:.2e}",
                            s_per_step=f"{(time.time() - t0) / (step - start + 1):.3f}",
                            **{k: f"{v:.4g}" for k, v in logs.items()})
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            save_ckpt(ckpt_path, {**{key: module.state_dict() for key, module in modules.items()},
                                  "opt": opt.state_dict(), "step": step + 1, **(extra_state or {}),
                                  "rng": {"torch": gen.get_state(), "numpy": rng.bit_generator.state}})
            print(f"{desc} step {step + 1}: loss(last 500) {np.mean(losses[-500:]):.4f}, "
                  f"{(time.time() - t0) / (step - start + 1):.3f} s/step", flush=True)
            if on_checkpoint is not None:
                on_checkpoint(step + 1)
    return start


def cosine_lr(base: float, steps: int, warmup: int = 0):
    """Linear warm-up over `warmup` steps (none at 0), times a cosine decay to 0 over `steps`."""
    return lambda step: base * min(1.0, (step + 1) / warmup if warmup else 1.0) * 0.5 * (
        1 + math.cos(math.pi * step / steps))


# ---------------------------------------------------------------------------------------------------------
# Stage 1: VAE
# ---------------------------------------------------------------------------------------------------------


def train_vae(args, work_dir: Path):
    images, _ = world_data(work_dir, args.num_images, args.seed)
    x_all = to_tensor(images)
    torch.manual_seed(args.seed)
    vae = make_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ckpt_path = work_dir / "vae.pt"

    def loss_fn(gen, rng):
        x = x_all[torch.randint(len(x_all), (args.batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=gen)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()  # per latent dimension
        return rec + args.vae_kl_weight * kl, {"rec": rec.item(), "kl": kl.item()}

    train_loop("vae", ckpt_path, {"model": vae}, opt, args.vae_steps, args.seed,
               cosine_lr(args.vae_lr, args.vae_steps, warmup=100), loss_fn, ckpt_every=args.ckpt_every)
    # Latent scale, as in SD: scaling_factor = 1 / std of the latents.
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(x_all[i:i + 256]).latent_dist.mean for i in range(0, 4096, 256)])
        recon = vae.decode(z[:256]).sample
    scale = 1.0 / z.std().item()
    mse = F.mse_loss(recon, x_all[:256]).item()
    print(f"vae: latent std {z.std().item():.4f} -> scaling_factor {scale:.4f}; reconstruction MSE {mse:.5f}")
    ckpt = load_ckpt(ckpt_path)
    ckpt["scaling_factor"] = scale
    save_ckpt(ckpt_path, ckpt)


def train_vae_decoder(args, work_dir: Path):
    """Fine-tune the VAE decoder alone on world images and two-color patterned shapes.

    The encoder stays frozen, so every latent (and the UNet trained on them) is unchanged; the decoder learns to
    draw patterns, which the personal concepts need and the solid-colored world never showed. The weights before
    this stage are kept as vae_world.pt.
    """
    vae_path, ckpt_path = work_dir / "vae.pt", work_dir / "vae_decoder.pt"
    base = load_ckpt(vae_path)
    if base is None or "scaling_factor" not in base:
        raise SystemExit("run --stage vae first")
    if not (work_dir / "vae_world.pt").exists():
        save_ckpt(work_dir / "vae_world.pt", base)
    base = load_ckpt(work_dir / "vae_world.pt")
    images, _ = world_data(work_dir, args.num_images, args.seed)
    x_world, x_pattern = to_tensor(images), to_tensor(pattern_data(work_dir, args.num_images // 2, args.seed)[0])
    vae = make_vae()
    vae.load_state_dict(base["model"])
    vae.requires_grad_(False)
    trainable = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for param in trainable:
        param.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=args.vae_decoder_lr, weight_decay=0.0)
    half = args.batch_size // 2

    def loss_fn(gen, rng):
        x = torch.cat([x_world[torch.randint(len(x_world), (half,), generator=gen)],
                       x_pattern[torch.randint(len(x_pattern), (args.batch_size - half,), generator=gen)]])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=gen)
        recon = vae.decode(z).sample
        return F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x), {}

    train_loop("vae decoder", ckpt_path, {"model": vae}, opt, args.vae_decoder_steps, args.seed + 1000,
               cosine_lr(args.vae_decoder_lr, args.vae_decoder_steps), loss_fn, ckpt_every=args.ckpt_every)
    vae.eval()
    with torch.no_grad():
        for name, x in (("world", x_world[:256]), ("patterns", x_pattern[:256])):
            mse = F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x).item()
            print(f"vae decoder: reconstruction MSE on {name} {mse:.5f}")
    save_ckpt(vae_path, {**base, "model": vae.state_dict(), "decoder_steps": args.vae_decoder_steps})


def load_vae(work_dir: Path):
    ckpt = load_ckpt(work_dir / "vae.pt")
    if ckpt is None or "scaling_factor" not in ckpt:
        raise SystemExit("run --stage vae first")
    vae = make_vae()
    vae.load_state_dict(ckpt["model"])
    vae.register_to_config(scaling_factor=ckpt["scaling_factor"])
    return vae.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------
# Stage 2: UNet + text encoder
# ---------------------------------------------------------------------------------------------------------


def encode_cached(vae, images: np.ndarray, path: Path):
    """Posterior mean and std of every image under the (frozen) VAE encoder, cached at path."""
    if path.exists():
        cached = torch.load(path)
        return cached["mean"], cached["std"]
    x_all = to_tensor(images)
    means, stds = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(x_all), 256), desc=f"encode {path.stem}"):
            dist = vae.encode(x_all[i:i + 256]).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    torch.save({"mean": mean, "std": std}, path)
    return mean, std


def encoded_latents(args, work_dir: Path, vae):
    """Posterior mean and std of every training image (cached), plus the scenes."""
    images, scenes = world_data(work_dir, args.num_images, args.seed)
    return (*encode_cached(vae, images, work_dir / f"latents_{args.num_images}_{args.seed}.pt"), scenes)


# The unet stage's patterned shapes come from their own stream: seed + 21 (the decoder's is seed, the judge's
# seed + 11); world.random_pattern_look never draws a concept's own look.
UNET_PATTERN_SEED_OFFSET = 21


def encoded_pattern_latents(args, work_dir: Path, vae):
    """Posterior mean and std of the unet stage's patterned shapes (cached), plus their captions."""
    n, seed = args.num_images // 2, args.seed + UNET_PATTERN_SEED_OFFSET
    images, captions = pattern_data(work_dir, n, seed)
    return (*encode_cached(vae, images, work_dir / f"pattern_latents_{n}_{seed}.pt"), captions)


def tokenize(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def mix_in_patterns(latents, captions: list, patterns, scale: float, prob: float, empty_prob: float, gen, rng):
    """Replace each row of the batch, with probability prob, by a two-color patterned shape (in place).

    patterns = (latent means, latent stds, captions). A replaced row's caption is the pattern's own, the look
    alone half of the time ("a split green and purple triangle", without " on a ... background"), or empty with
    empty_prob. So the base model can draw two-tone looks, as SD can draw the kind of look a personal subject
    has before any fine-tuning; captions that name no pattern keep meaning solid shapes. Returns the rows replaced.
    """
    mean, std, texts = patterns
    rows = (torch.rand(len(captions), generator=gen) < prob).nonzero().flatten()
    pick = torch.randint(len(mean), (len(rows),), generator=gen)
    latents[rows] = (mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=gen)) * scale
    for row, i in zip(rows.tolist(), pick.tolist()):
        text = texts[i] if rng.random() < 0.5 else texts[i].split(" on a ")[0]
        captions[row] = text if rng.random() >= empty_prob else ""
    return rows


def train_unet(args, work_dir: Path):
    from diffusers import DDPMScheduler

    vae = load_vae(work_dir)
    lat_mean, lat_std, scenes = encoded_latents(args, work_dir, vae)
    scale = vae.config.scaling_factor
    tokenizer = make_tokenizer(work_dir)
    torch.manual_seed(args.seed)
    unet = make_unet(args.unet_channels).train()
    text_encoder = make_text_encoder().train()
    print(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, text encoder "
          f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M")
    # The word-recognition head (not exported): from the mean of the encoder's output over all positions, which
    # caption words are present. It asks the text encoder, as CLIP's contrastive training asks CLIP's, to pass on
    # every word of a caption, names with little or no visual meaning included; the diffusion loss alone teaches
    # it to drop them.
    word_head = torch.nn.Linear(TEXT_HIDDEN, len(WORD_VOCAB))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = unet_optimizer(args, unet, text_encoder, extra=list(word_head.parameters()) if args.word_loss_weight else [])
    ema_unet = make_unet(args.unet_channels).requires_grad_(False)
    ema_text = make_text_encoder().requires_grad_(False)
    ema_unet.load_state_dict(unet.state_dict())
    ema_text.load_state_dict(text_encoder.state_dict())
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    noise_sched = DDPMScheduler(**{k: v for k, v in noise_scheduler_config().items() if k != "set_alpha_to_one"})
    alphas_cumprod = noise_sched.alphas_cumprod

    if args.pattern_caption_prob:
        pat_mean, pat_std, pat_captions = encoded_pattern_latents(args, work_dir, vae)

    def loss_fn(gen, rng):
        idx = torch.randint(len(lat_mean), (args.batch_size,), generator=gen)
        latents = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scale
        captions = [world.named_caption(scenes[i], rng, args.name_caption_prob, args.color_only_caption_prob,
                                        args.standalone_names, args.weak_match_prob, args.weak_name_size)
                    if rng.random() >= args.empty_caption_prob else ""
                    for i in idx.tolist()]
        if args.pattern_caption_prob:
            mix_in_patterns(latents, captions, (pat_mean, pat_std, pat_captions), scale, args.pattern_caption_prob,
                            args.empty_caption_prob, gen, rng)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch_size,), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        cond = text_encoder(tokenize(tokenizer, captions))[0]
        diffusion = F.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise)
        if not args.word_loss_weight:
            return diffusion, {}
        present = torch.tensor([[w in set(c.split()) for w in WORD_VOCAB] for c in captions], dtype=torch.float32)
        # Unit-norm rows: the head cannot amplify a faint signal, the encoder's output itself has to move.
        logits = F.linear(cond.mean(dim=1), F.normalize(word_head.weight, dim=1), word_head.bias)
        words = F.binary_cross_entropy_with_logits(logits, present)
        return diffusion + args.word_loss_weight * words, {"diffusion": diffusion.item(), "words": words.item()}

    update_ema = ema_updater(ema_params, params, args.ema_decay)

    def export(step):
        if args.export_every_ckpt:
            export_pipeline(args, work_dir)

    # Warm-up, then constant: any checkpoint's EMA weights are a finished model, so a run stopped early
    # (the CPU budget) is reproduced exactly by --steps <its step count>.
    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text}
    if args.word_loss_weight:
        modules["word_head"] = word_head
        ckpt = load_ckpt(work_dir / "unet.pt")
        if ckpt is not None and "word_head" not in ckpt:  # seeded from an exported model: a fresh head
            save_ckpt(work_dir / "unet.pt", {**ckpt, "word_head": word_head.state_dict()})
    train_loop("unet", work_dir / "unet.pt", modules, opt,
               args.steps, args.seed * 1000, lambda step: args.lr * min(1.0, (step + 1) / 200), loss_fn,
               ckpt_every=args.ckpt_every, clip_grad_params=params, after_step=update_ema,
               extra_state={"unet_channels": list(args.unet_channels)}, on_checkpoint=export)


def unet_optimizer(args, unet, text_encoder, extra=()):
    """AdamW over the UNet and the text encoder; with --embedding_lr_mult != 1 the token embedding is a second
    group with that multiple of the learning rate (rare-word rows only get a gradient when their word is drawn)."""
    if args.embedding_lr_mult == 1:
        return torch.optim.AdamW(list(unet.parameters()) + list(text_encoder.parameters()) + list(extra),
                                 lr=args.lr, weight_decay=1e-2)
    embedding = text_encoder.get_input_embeddings().weight
    rest = [p for p in list(unet.parameters()) + list(text_encoder.parameters()) + list(extra)
            if p is not embedding]
    return torch.optim.AdamW([{"params": rest}, {"params": [embedding], "lr_mult": args.embedding_lr_mult}],
                             lr=args.lr, weight_decay=1e-2)


def name_token_ids(tokenizer) -> list[int]:
    """The token ids of world's rare-word names (each is one BPE token)."""
    return [tokenizer(name).input_ids[1] for name in world.BOUND_NAMES + world.WEAK_NAMES + world.PLAIN_NAMES]


def seed_from_pipeline(args, work_dir: Path):
    """Start the unet stage from an exported pipeline (its EMA weights) instead of from scratch.

    Writes vae.pt and a step-0 unet.pt whose live and EMA weights are the pipeline's; the optimizer starts
    fresh (with its warm-up). Used to continue pretraining the committed model when _work/ was not kept.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    source = Path(args.init_from)
    if (work_dir / "unet.pt").exists():
        raise SystemExit(f"--init_from: {work_dir / 'unet.pt'} exists already; remove it or drop --init_from")
    vae = AutoencoderKL.from_pretrained(source / "vae")
    save_ckpt(work_dir / "vae.pt", {"model": vae.state_dict(), "step": args.vae_steps,
                                    "scaling_factor": vae.config.scaling_factor})
    unet = UNet2DConditionModel.from_pretrained(source / "unet").state_dict()
    text = CLIPTextModel.from_pretrained(source / "text_encoder").state_dict()
    if args.name_init_norm:
        # A name's row starts as a random direction with the typical norm of the words world captions use
        # (unused rows sit at a third of it after pretraining), so the text encoder's layers see it from the start.
        embedding = text[next(k for k in text if k.endswith("token_embedding.weight"))]
        tokenizer = make_tokenizer(work_dir)
        used = torch.tensor([tokenizer(w).input_ids[1] for w in
                             [*world.SHAPES, *world.COLORS, *world.SIZES, *world.BACKGROUNDS, "photo", "background"]])
        norm = embedding[used].norm(dim=1).median()
        names = torch.tensor(name_token_ids(tokenizer))
        rows = torch.randn(len(names), embedding.shape[1], generator=torch.Generator().manual_seed(args.seed))
        embedding[names] = rows / rows.norm(dim=1, keepdim=True) * norm
        print(f"{len(names)} name rows set to norm {norm:.3f}")
    save_ckpt(work_dir / "unet.pt", {"unet": unet, "text_encoder": text, "ema_unet": unet, "ema_text": text,
                                     "step": 0, "unet_channels": list(args.unet_channels)})
    print(f"unet stage seeded from {source}")


# ---------------------------------------------------------------------------------------------------------
# Stage 2b (v5): a Z-Image pipeline, flow-matching transformer + Qwen3 text encoder
# ---------------------------------------------------------------------------------------------------------

# Every word the world's captions use, made one token each by the v5 tokenizer (a byte-level BPE learnt on them,
# tiny_pipeline.build_qwen_tokenizer): shapes, colors, sizes, backgrounds, the pattern words, the caption
# templates' words and the 100 rare-word names (the concepts' triggers among them).
ZIMAGE_WORDS = tuple(dict.fromkeys((
    *world.SHAPES, *world.COLORS, *world.SIZES, *world.BACKGROUNDS, *world.PATTERN_WORDS.values(),
    *world.PATTERN_PALETTE, "a", "photo", "of", "on", "background", "shape", "and", *world.BOUND_NAMES, *world.WEAK_NAMES,
    *world.PLAIN_NAMES)))
# Caption tokens (chat template included) the zimage stage pads to: the longest world caption is 20. The
# pipeline pads to --max_sequence_length (512) instead; with right padding and a causal text encoder the
# unpadded rows are the same (tests/test_toy_v5.py checks it).
ZIMAGE_MAX_TOKENS = 48


def make_zimage_tokenizer():
    from tiny_pipeline import build_qwen_tokenizer

    return build_qwen_tokenizer(chat_template=True, words=ZIMAGE_WORDS)


def zimage_scheduler():
    """Z-Image's scheduler class, without the resolution shift (a 32x32 image is 64 tokens; Z-Image-Turbo's shift 3
    is for ~4,096): sigma uniform in training (train_cat_lora.py's flow matching, --weighting_scheme none)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def make_zimage_text_encoder(width: int, layers: int, vocab_size: int, pad_id: int, eos_id: int):
    """A Qwen3Model. ZImagePipeline reads hidden_states[-2], so the last of ``layers`` feeds nothing (as in Z-Image,
    whose Qwen3-4B's last layer is unused too); ``layers`` - 1 layers make the caption features."""
    from transformers import Qwen3Config, Qwen3Model

    heads = max(1, width // 32)
    return Qwen3Model(Qwen3Config(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=width // heads, max_position_embeddings=512,
        pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None, tie_word_embeddings=False))


def make_zimage_transformer(dim: int, layers: int, text_width: int, seed: int):
    """ZImageTransformer2DModel on the toy VAE's 4-channel 16x16 latents: 2x2 patches, an 8x8 grid of 64 tokens;
    heads of 32 channels, RoPE axes (caption/frame, row, column) splitting them 8/12/12 as Z-Image's 32/48/48."""
    from diffusers import ZImageTransformer2DModel

    heads = dim // 32
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=dim, n_layers=layers, n_refiner_layers=1,
        n_heads=heads, n_kv_heads=heads, cap_feat_dim=text_width, axes_dims=[8, 12, 12], axes_lens=[512, 32, 32])
    with torch.no_grad():  # the padding embeddings (zeros in diffusers 0.42, uninitialised memory before)
        gen = torch.Generator().manual_seed(seed)
        transformer.x_pad_token.copy_(torch.randn(transformer.x_pad_token.shape, generator=gen) * 0.02)
        transformer.cap_pad_token.copy_(torch.randn(transformer.cap_pad_token.shape, generator=gen) * 0.02)
    return transformer


def zimage_models(args, tokenizer):
    torch.manual_seed(args.seed)
    text_encoder = make_zimage_text_encoder(args.zimage_text_width, args.zimage_text_layers, len(tokenizer),
                                            tokenizer.pad_token_id, tokenizer.eos_token_id)
    transformer = make_zimage_transformer(args.zimage_dim, args.zimage_layers, args.zimage_text_width, args.seed)
    return transformer, text_encoder


def zimage_vae(source: Path):
    """The v4 toy VAE (AutoencoderKL, 32x32 RGB -> 16x16x4), as Z-Image uses Flux.1's: shift_factor 0 written out,
    since ZImagePipeline adds vae.config.shift_factor when it decodes."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(source)
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def zimage_text_pipeline(text_encoder, tokenizer):
    """A ZImagePipeline that only encodes prompts (its _encode_prompt: chat template, hidden_states[-2], padding
    dropped), so the pretraining reads captions exactly as the pipeline and train_cat_lora.py do."""
    from diffusers import ZImagePipeline

    return ZImagePipeline(scheduler=zimage_scheduler(), vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=None)


def zimage_predict(transformer, noisy, timesteps, captions):
    """The flow (noise - x) as train_cat_lora.ZImageFamily.predict reads it: the transformer takes lists of
    (channels, 1 frame, h, w) images and of caption features, the time running from noise (0) to clean (1), and
    predicts the negated flow."""
    pred = transformer(list(noisy.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, captions, return_dict=False)[0]
    return -torch.stack(pred).squeeze(2)


def zimage_noisy(latents, gen, sigmas_table, timesteps_table):
    """Flow matching as train_cat_lora.FlowMatchingObjective (--weighting_scheme none): u uniform, the scheduler's
    sigma and timestep at index u x 1000, z_t = (1 - sigma) x + sigma noise, target noise - x."""
    noise = torch.randn(latents.shape, generator=gen)
    index = (torch.rand(len(latents), generator=gen) * 1000).long()
    sigmas = sigmas_table[index].view(-1, 1, 1, 1)
    return (1 - sigmas) * latents + sigmas * noise, timesteps_table[index], noise - latents


def zimage_tables(scheduler):
    """The training sigmas and timesteps, 1,000 each (index u x 1000), as the scheduler holds them before
    set_timesteps (no terminal sigma yet)."""
    sigmas, timesteps = scheduler.sigmas.clone(), scheduler.timesteps.clone()
    assert len(sigmas) == len(timesteps) == scheduler.config.num_train_timesteps, (len(sigmas), len(timesteps))
    return sigmas, timesteps


def git_commit_checkpoint(path: Path, step: int):
    """Commit the checkpoint file (only it: ``git commit --only``) in the repository it lies in; retried while
    another git command holds the index; a failure is reported, never fatal to the training."""
    import subprocess

    for attempt in range(10):
        add = subprocess.run(["git", "add", path.name], cwd=path.parent, capture_output=True, text=True)
        done = add.returncode == 0 and subprocess.run(
            ["git", "commit", "-q", "-m", f"toy world v5: pretraining checkpoint, step {step}", "--only", path.name],
            cwd=path.parent, capture_output=True, text=True)
        if done and done.returncode == 0:
            print(f"checkpoint step {step} committed", flush=True)
            return True
        time.sleep(3 * (attempt + 1))
    print(f"checkpoint step {step}: git commit failed ({(done or add).stderr.strip()[:200]})", flush=True)
    return False


def train_zimage(args, work_dir: Path):
    work_dir.mkdir(parents=True, exist_ok=True)
    vae = zimage_vae(Path(args.zimage_vae))
    images, scenes = world_data(work_dir, args.num_images, args.seed)
    lat_mean, _ = encode_cached(vae, images, work_dir / f"latents_{args.num_images}_{args.seed}_v4vae.pt")
    scale = vae.config.scaling_factor
    tokenizer = make_zimage_tokenizer()
    transformer, text_encoder = zimage_models(args, tokenizer)
    transformer.train()
    text_encoder.train()
    print(f"transformer {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f} M params, text encoder "
          f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M, vocabulary {len(tokenizer)}")
    text_pipe = zimage_text_pipeline(text_encoder, tokenizer)
    word_head = torch.nn.Linear(args.zimage_text_width, len(WORD_VOCAB))
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = unet_optimizer(args, transformer, text_encoder, extra=list(word_head.parameters()))
    ema_transformer, ema_text = zimage_models(args, tokenizer)
    ema_transformer.requires_grad_(False).load_state_dict(transformer.state_dict())
    ema_text.requires_grad_(False).load_state_dict(text_encoder.state_dict())
    ema_params = list(ema_transformer.parameters()) + list(ema_text.parameters())
    sched = zimage_scheduler()
    sigmas_table, timesteps_table = zimage_tables(sched)
    if args.pattern_caption_prob:
        pat_mean, _, pat_captions = encoded_pattern_latents(args, work_dir, vae)
        # Z-Image trains on the posterior's mode (train_cat_lora.ZImageFamily.encode_latents): no sampling noise.
        patterns = (pat_mean, torch.zeros_like(pat_mean), pat_captions)

    def loss_fn(gen, rng):
        idx = torch.randint(len(lat_mean), (args.batch_size,), generator=gen)
        latents = lat_mean[idx] * scale
        captions = [world.named_caption(scenes[i], rng, args.name_caption_prob, args.color_only_caption_prob,
                                        args.standalone_names, args.weak_match_prob, args.weak_name_size)
                    if rng.random() >= args.empty_caption_prob else ""
                    for i in idx.tolist()]
        if args.pattern_caption_prob:
            mix_in_patterns(latents, captions, patterns, scale, args.pattern_caption_prob, args.empty_caption_prob,
                            gen, rng)
        noisy, timesteps, target = zimage_noisy(latents, gen, sigmas_table, timesteps_table)
        cond = text_pipe._encode_prompt(list(captions), device=torch.device("cpu"),
                                        max_sequence_length=ZIMAGE_MAX_TOKENS)
        flow = F.mse_loss(zimage_predict(transformer, noisy, timesteps, cond), target)
        if not args.word_loss_weight:
            return flow, {}
        # The word-recognition term (v2): which caption words are present, from the mean of the caption features
        # the transformer reads (the unpadded rows of hidden_states[-2]).
        present = torch.tensor([[w in set(c.split()) for w in WORD_VOCAB] for c in captions], dtype=torch.float32)
        pooled = torch.stack([row.mean(dim=0) for row in cond])
        logits = F.linear(pooled, F.normalize(word_head.weight, dim=1), word_head.bias)
        words = F.binary_cross_entropy_with_logits(logits, present)
        return flow + args.word_loss_weight * words, {"flow": flow.item(), "words": words.item()}

    update_ema = ema_updater(ema_params, params, args.ema_decay)

    ckpt_path = Path(args.zimage_ckpt_dir) / "zimage.pt"
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)

    def on_checkpoint(step):
        if args.git_commit_checkpoints:
            git_commit_checkpoint(ckpt_path, step)

    # Warm-up, then constant: any checkpoint's EMA weights are a finished model.
    modules = {"transformer": transformer, "text_encoder": text_encoder, "ema_transformer": ema_transformer,
               "ema_text": ema_text, "word_head": word_head}
    train_loop("zimage", ckpt_path, modules, opt, args.steps, args.seed * 1000,
               lambda step: args.lr * min(1.0, (step + 1) / args.warmup_steps), loss_fn,
               ckpt_every=args.ckpt_every, clip_grad_params=params, after_step=update_ema,
               extra_state={"zimage_config": zimage_config(args)}, on_checkpoint=on_checkpoint)


def zimage_config(args) -> dict:
    return {"dim": args.zimage_dim, "layers": args.zimage_layers, "text_width": args.zimage_text_width,
            "text_layers": args.zimage_text_layers, "seed": args.seed}


def export_zimage(ckpt_path: Path, vae_source: Path, out_dir: Path):
    """Write the ZImagePipeline folder (EMA weights) from a zimage checkpoint; return the pipeline."""
    from diffusers import ZImagePipeline

    ckpt = load_ckpt(ckpt_path)
    config = ckpt["zimage_config"]
    tokenizer = make_zimage_tokenizer()
    args = argparse.Namespace(seed=config["seed"], zimage_dim=config["dim"], zimage_layers=config["layers"],
                              zimage_text_width=config["text_width"], zimage_text_layers=config["text_layers"])
    transformer, text_encoder = zimage_models(args, tokenizer)
    transformer.load_state_dict(ckpt["ema_transformer"])
    text_encoder.load_state_dict(ckpt["ema_text"])
    pipe = ZImagePipeline(scheduler=zimage_scheduler(), vae=zimage_vae(vae_source), text_encoder=text_encoder.eval(),
                          tokenizer=tokenizer, transformer=transformer.eval())
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    print(f"z-image pipeline (step {ckpt['step']}) -> {out_dir}")
    return pipe


# ---------------------------------------------------------------------------------------------------------
# Stage 3: evaluation CLIP (open_clip)
# ---------------------------------------------------------------------------------------------------------


def train_clip(args, work_dir: Path):
    import open_clip

    world_images, scenes = world_data(work_dir, args.num_images, args.seed + 1, exclude_pairs=())
    pattern_images, pattern_captions = pattern_data(work_dir, args.num_images // 2, args.seed + 11)
    # The CLIP's preprocessing is (x - 0.5) / 0.5, i.e. the same [-1, 1] range.
    x_world, x_pattern = to_tensor(world_images), to_tensor(pattern_images)
    # open_clip's bundled CLIP BPE tokenizer (no download); captions are short, so 16 tokens suffice.
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CLIP_CONFIG["text_cfg"]["context_length"])
    torch.manual_seed(args.seed)
    model = open_clip.CLIP(**CLIP_CONFIG)
    ckpt_path = work_dir / "clip.pt"
    if args.clip_init_from and not ckpt_path.exists():
        init_clip_from(model, Path(args.clip_init_from))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.clip_lr, weight_decay=0.05)
    n_pattern = round(args.clip_batch_size * args.clip_pattern_share)

    def loss_fn(gen, rng):
        w_idx = torch.randint(len(x_world), (args.clip_batch_size - n_pattern,), generator=gen).tolist()
        p_idx = torch.randint(len(x_pattern), (n_pattern,), generator=gen).tolist()
        x = degrade(torch.cat([x_world[w_idx], x_pattern[p_idx]]), gen)
        # A patterned shape is captioned with or without its background, as world captions are.
        captions = [world.caption(scenes[i], rng) for i in w_idx] + [
            pattern_captions[i] if rng.random() < 0.5 else pattern_captions[i].split(" on a ")[0] for i in p_idx]
        img_f, txt_f, logit_scale = model(x, tokenizer(captions))
        logits = logit_scale * img_f @ txt_f.t()
        # Several images in a batch can match a caption: the target spreads over every caption that is
        # true of the image (same caption text, or a caption whose named attributes all hold).
        truth = [scenes[i] for i in w_idx] + [pattern_captions[i] for i in p_idx]
        match = torch.tensor([[caption_true(image, c) for c in captions] for image in truth], dtype=torch.float32)
        contrastive = 0.5 * (soft_ce(logits, match) + soft_ce(logits.t(), match.t()))
        # Embeddings with non-negative components, so that every cosine is in [0, 1] (see toy_clip).
        negative = negative_mass(img_f) + negative_mass(txt_f)
        return contrastive + args.clip_nonneg_weight * negative, {"scale": logit_scale.item(),
                                                                   "negative": negative.item()}

    train_loop("clip", ckpt_path, {"model": model}, opt, args.clip_steps, args.seed + 7,
               cosine_lr(args.clip_lr, args.clip_steps, warmup=100), loss_fn, ckpt_every=args.ckpt_every)
    model.eval()
    ckpt = load_ckpt(ckpt_path)
    if not ckpt.get("calibrated"):
        shifts = raise_embedding_offsets(model, *clip_calibration_data(x_world, x_pattern, scenes, pattern_captions,
                                                                       tokenizer, args.seed))
        print(f"embedding offsets raised by {shifts['image']:.4f} (image), {shifts['text']:.4f} (text)")
        save_ckpt(ckpt_path, {**ckpt, "model": model.state_dict(), "calibrated": True,
                              "model_before_calibration": ckpt["model"]})
    # Sanity check: zero-shot shape / color accuracy on fresh world images, held-out pairs included.
    test_images, _, test_scenes = world.make_dataset(600, args.seed + 99, RESOLUTION, exclude_pairs=())
    shapes, colors = zero_shot(model, tokenizer, to_tensor(test_images))
    print(f"clip zero-shot on real world images: shape {np.mean([s == t.shape for s, t in zip(shapes, test_scenes)]):.3f}, "
          f"color {np.mean([c == t.color for c, t in zip(colors, test_scenes)]):.3f}")


def clip_calibration_data(x_world, x_pattern, scenes, pattern_captions, tokenizer, seed: int):
    """(images, token ids) on which the judge's embeddings are made positive: world images and patterned shapes,
    clean and degraded, uniform noise, blends of two images; every caption kind, the names, random token strings."""
    gen = torch.Generator().manual_seed(seed + 5)
    rng = np.random.default_rng(seed + 5)
    world_x, pattern_x = x_world[:3000], x_pattern[:3000]
    blends = 0.5 * (world_x[:1000] + pattern_x[:1000])
    noise = torch.rand(1000, *x_world.shape[1:], generator=gen) * 2 - 1
    images = torch.cat([world_x, pattern_x, degrade(torch.cat([world_x, pattern_x]), gen), blends, noise])
    names = world.BOUND_NAMES + world.WEAK_NAMES + world.PLAIN_NAMES
    texts = ([world.caption(s, rng) for s in scenes[:3000]] + pattern_captions[:2000]
             + [world.named_caption(s, rng, 1.0) for s in scenes[3000:5000]]
             + [f"a photo of {n} {s}" for n in names for s in world.SHAPES] + list(names))
    tokens = tokenizer(texts)
    random_tokens = torch.randint(1, 49406, (2000, tokens.shape[1]), generator=gen)
    return images, torch.cat([tokens, random_tokens])


def init_clip_from(model, clip_dir: Path):
    """Start from an exported toy CLIP; a v1 judge's bias-free text projection (width x embed) becomes the
    Linear layer's weight, with a zero bias."""
    from safetensors.torch import load_file

    state = {k: v.float() for k, v in load_file(clip_dir / "open_clip_model.safetensors").items()}
    if "text_projection" in state:
        state["text_projection.weight"] = state.pop("text_projection").t().contiguous()
        state["text_projection.bias"] = torch.zeros(state["text_projection.weight"].shape[0])
    model.load_state_dict(state)
    print(f"clip stage initialised from {clip_dir}")


def degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur and noise 3/4 of the images, by random amounts: the judge must see through the soft edges and
    speckle of generated images, not only the crisp renders (colors are left exact: they are classes)."""
    n = len(x)
    blur3 = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    blur5 = F.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    amount = torch.rand(n, 1, 1, 1, generator=gen)
    wide = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).float()
    blurred = x + amount * (wide * blur5 + (1 - wide) * blur3 - x)
    noisy = blurred + 0.12 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    keep = (torch.rand(n, 1, 1, 1, generator=gen) < 0.25).float()
    return (keep * x + (1 - keep) * noisy).clamp(-1, 1)


def caption_true(image, text: str) -> bool:
    """Whether a caption is true of an image: a world Scene, or a patterned shape given by its full caption."""
    if isinstance(image, str):  # a patterned shape: its own pattern caption, or a world caption naming only
        look, background = image.split(" on a ")  # its shape and background
        if text in (image, look):
            return True
        words = set(text.split())
        return (not words & (set(world.COLORS) | set(world.SIZES) | set(world.PATTERN_WORDS.values()))
                and words & set(world.SHAPES) == {look.split()[-1]}
                and words & set(world.BACKGROUNDS) <= {background.split()[0]})
    scene = image
    words = set(text.split())
    if words & set(world.PATTERN_WORDS.values()):
        return False
    for attr, vocab in ((scene.shape, world.SHAPES), (scene.color, world.COLORS),
                        (scene.size, world.SIZES), (scene.background, world.BACKGROUNDS)):
        named = words & set(vocab)
        if named and named != {attr}:
            return False
    return True


def soft_ce(logits, match):
    target = match / match.sum(dim=1, keepdim=True)
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


# ---------------------------------------------------------------------------------------------------------
# Stage 4: export
# ---------------------------------------------------------------------------------------------------------


def export_pipeline(args, work_dir: Path, out_dir=None):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    ckpt = load_ckpt(work_dir / "unet.pt")
    vae = load_vae(work_dir)
    unet = make_unet(ckpt["unet_channels"])
    unet.load_state_dict(ckpt["ema_unet"])
    text_encoder = make_text_encoder()
    text_encoder.load_state_dict(ckpt["ema_text"])
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=make_tokenizer(work_dir), unet=unet.eval(),
        scheduler=DDIMScheduler(**noise_scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    out_dir = Path(out_dir or args.pipeline_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    print(f"pipeline (step {ckpt['step']}) -> {out_dir}")
    return pipe


def export_clip(args, work_dir: Path):
    from safetensors.torch import save_file

    ckpt = load_ckpt(work_dir / "clip.pt")
    out = Path(args.clip_dir)
    out.mkdir(parents=True, exist_ok=True)
    # float32: rounding to float16 could push the embeddings' lower bound below 0.
    state = {k: v.contiguous() for k, v in ckpt["model"].items()}
    save_file(state, out / "open_clip_model.safetensors")
    config = {"model_cfg": CLIP_CONFIG, "preprocess_cfg": CLIP_PREPROCESS}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"clip (step {ckpt['step']}) -> {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--stage", choices=["vae", "unet", "clip", "vae_decoder", "export", "zimage", "export_zimage"],
                        required=True)
    parser.add_argument("--work_dir", default=str(HERE / "_work"), help="Checkpoints and caches (not committed).")
    parser.add_argument("--pipeline_dir", default=str(HERE / "models" / "toy-sd"))
    parser.add_argument("--clip_dir", default=str(HERE / "models" / "toy-clip"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (leave cores for others).")
    parser.add_argument("--num_images", type=int, default=40000, help="Size of the rendered training set.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--ckpt_every", type=int, default=250)
    parser.add_argument("--vae_steps", type=int, default=1000)
    parser.add_argument("--vae_lr", type=float, default=2e-3)
    parser.add_argument("--vae_kl_weight", type=float, default=1e-4)
    parser.add_argument("--vae_decoder_steps", type=int, default=4000, help="--stage vae_decoder steps.")
    parser.add_argument("--vae_decoder_lr", type=float, default=5e-4)
    parser.add_argument("--unet_channels", type=int, nargs=3, default=[32, 64, 64])
    parser.add_argument("--steps", type=int, default=7250, help="UNet + text encoder steps.")
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--empty_caption_prob", type=float, default=0.1)
    parser.add_argument("--color_only_caption_prob", type=float, default=0.0,
                        help="Share of captions that name the color without the shape (\"a blue shape\").")
    parser.add_argument("--name_caption_prob", type=float, default=0.0,
                        help="Share of captions with a rare-word name before the shape (world.named_caption); "
                             "at 0 no random number is drawn for it (the v1 caption stream).")
    parser.add_argument("--standalone_names", action="store_true",
                        help="Names stand alone for their meaning (world.named_caption standalone=True): bound names "
                             "always replace the attributes they mean, weak names come without the background word.")
    parser.add_argument("--weak_match_prob", type=float, default=0.5,
                        help="How often a weak name is one that prefers the scene's background (and size).")
    parser.add_argument("--weak_name_size", action="store_true",
                        help="Weak names prefer a size as well as a background (world.WEAK_NAME_SIZE).")
    parser.add_argument("--pattern_caption_prob", type=float, default=0.0,
                        help="unet stage: share of each batch that is captioned two-color patterned shapes.")
    parser.add_argument("--word_loss_weight", type=float, default=0.0,
                        help="unet stage: weight of the word-recognition term (which caption words are present, "
                             "read from the text encoder's mean output); 0 = off, the v1 loss.")
    parser.add_argument("--embedding_lr_mult", type=float, default=1.0,
                        help="unet stage: learning-rate multiple for the text encoder's token embedding.")
    parser.add_argument("--name_init_norm", action="store_true",
                        help="with --init_from: start the rare-word names' embedding rows at a used word's norm.")
    parser.add_argument("--init_from", default=None,
                        help="unet stage: start from this exported pipeline folder instead of from scratch.")
    parser.add_argument("--export_every_ckpt", action="store_true",
                        help="Also export the pipeline at every UNet checkpoint (to --pipeline_dir).")
    parser.add_argument("--warmup_steps", type=int, default=200, help="zimage stage: linear learning-rate warm-up.")
    parser.add_argument("--zimage_dim", type=int, default=96, help="zimage stage: transformer width (heads of 32).")
    parser.add_argument("--zimage_layers", type=int, default=4, help="zimage stage: main transformer layers "
                        "(plus one noise-refiner and one context-refiner layer).")
    parser.add_argument("--zimage_text_width", type=int, default=64, help="zimage stage: Qwen3 width.")
    parser.add_argument("--zimage_text_layers", type=int, default=3,
                        help="zimage stage: Qwen3 layers (the pipeline reads the penultimate one's output).")
    parser.add_argument("--zimage_vae", default=str(HERE / "models" / "toy-sd" / "vae"),
                        help="zimage stage: the (frozen) VAE folder, v4's by default.")
    parser.add_argument("--zimage_ckpt_dir", default=str(HERE / "models" / "v5-checkpoint"),
                        help="zimage stage: where its checkpoint (zimage.pt, resumable bit-exact) is written.")
    parser.add_argument("--zimage_pipeline_dir", default=str(HERE / "models" / "toy-zimage"),
                        help="export_zimage: the ZImagePipeline folder written.")
    parser.add_argument("--git_commit_checkpoints", action="store_true",
                        help="zimage stage: git-commit the checkpoint file each time it is written.")
    parser.add_argument("--clip_steps", type=int, default=2500)
    parser.add_argument("--clip_lr", type=float, default=1e-3)
    parser.add_argument("--clip_batch_size", type=int, default=64)
    parser.add_argument("--clip_pattern_share", type=float, default=0.5,
                        help="Share of each judge batch that is patterned shapes (the rest: world images).")
    parser.add_argument("--clip_nonneg_weight", type=float, default=1.0,
                        help="Weight of the judge's penalty on negative embedding components.")
    parser.add_argument("--clip_init_from", default=None,
                        help="clip stage: start from this exported toy CLIP folder instead of from scratch.")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    torch.set_num_threads(args.threads)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if args.stage == "vae":
        train_vae(args, work_dir)
    elif args.stage == "unet":
        if args.init_from:
            seed_from_pipeline(args, work_dir)
        train_unet(args, work_dir)
    elif args.stage == "clip":
        train_clip(args, work_dir)
    elif args.stage == "vae_decoder":
        train_vae_decoder(args, work_dir)
    elif args.stage == "zimage":
        train_zimage(args, work_dir)
    elif args.stage == "export_zimage":
        export_zimage(Path(args.zimage_ckpt_dir) / "zimage.pt", Path(args.zimage_vae), Path(args.zimage_pipeline_dir))
    else:
        if (work_dir / "unet.pt").exists():
            export_pipeline(args, work_dir)
        if (work_dir / "clip.pt").exists():
            export_clip(args, work_dir)


if __name__ == "__main__":
    main()
