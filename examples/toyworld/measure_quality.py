"""Measure the toy base model: does it draw the right shape and color, on combinations it never saw?

For every shape x color pair, draws --per_pair images with the prompt "a photo of a {color} {shape}" at fixed
seeds, classifies them zero-shot with the toy CLIP, and prints shape / color accuracy separately for the pairs
held out of pretraining (world.HELD_OUT_PAIRS) and for the seen pairs. Also checks the toy CLIP itself on
real world images, and can write a sample grid PNG.

  python measure_quality.py --grid samples.png
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import world
from toy_clip import DEFAULT_CLIP_DIR, load_toy_clip, to_clip_input, zero_shot

HERE = Path(__file__).resolve().parent

DEFAULT_PIPELINE_DIR = HERE / "models" / "toy-sd"
DEFAULT_CONCEPTS_JSON = HERE / "concepts" / "concepts.json"


def load_pipeline(path=DEFAULT_PIPELINE_DIR):
    """The pipeline its model_index.json names: v4's StableDiffusionPipeline, v5's ZImagePipeline."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str, n: int, seed: int, steps: int = 25, guidance: float = 4.0) -> np.ndarray:
    """n images (float NHWC in [0, 1]) for one prompt, deterministic in seed."""
    generator = torch.Generator().manual_seed(seed)
    out = pipe(prompt, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=guidance,
               height=32, width=32, generator=generator, output_type="np")
    return out.images


def concept_captions(concepts_json=DEFAULT_CONCEPTS_JSON):
    """{trigger: [captions with the trigger]}: each concept's instance prompt and its held-out eval captions."""
    concepts_json = Path(concepts_json)
    out = {}
    for concept in json.loads(concepts_json.read_text()):
        trigger = concept["trigger_token"]
        eval_file = concepts_json.parent / "eval" / f"{concept['instance_data_dir']}.jsonl"
        evals = [json.loads(line)["caption"] for line in eval_file.read_text().splitlines() if line.strip()]
        out[trigger] = [concept["instance_prompt"], *evals]
    return out


def is_zimage(pipe) -> bool:
    return type(pipe).__name__ == "ZImagePipeline"


def zimage_caption_features(pipe, texts, length: int = 48) -> torch.Tensor:
    """v5: the caption features the transformer reads (the pipeline's _encode_prompt rows), zero-padded to
    ``length`` positions, as CLIP's 77 positions are for v4 (the rows' lengths differ with the caption)."""
    rows = pipe._encode_prompt(list(texts), device=torch.device("cpu"), max_sequence_length=length)
    out = torch.zeros(len(rows), length, rows[0].shape[1])
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


@torch.no_grad()
def trigger_insertion_ratios(tokenizer, text_encoder, captions_by_trigger, encode=None) -> dict:
    """Per trigger: how much inserting it changes the text encoder's output, relative to inserting a color word.

    For each caption with the trigger, y = the caption without it; the change of inserting a word w is
    ||E(y with w) - E(y)|| / ||E(y)||, E = the encoder's last hidden states over all 77 positions (what the UNet
    attends to). The color change is the mean over the 6 world colors put where the trigger was. Returns
    {trigger: {"trigger": mean trigger change, "color": mean color change, "ratio": trigger / color}}.
    ``encode(texts) -> (len(texts), features)`` replaces E (v5: zimage_caption_features, flattened).
    """
    if encode is None:
        def encode(texts):
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            return text_encoder(ids)[0].flatten(1)

    def change(texts, base):
        return ((encode(texts) - base).norm(dim=1) / base.norm(dim=1)).mean().item()

    out = {}
    for trigger, captions in captions_by_trigger.items():
        trigger_changes, color_changes = [], []
        for text in captions:
            words = text.split()
            at = words.index(trigger)
            base = encode([" ".join(words[:at] + words[at + 1:])])
            trigger_changes.append(change([text], base))
            color_changes.append(change([" ".join(words[:at] + [c] + words[at + 1:]) for c in world.COLORS], base))
        t, c = float(np.mean(trigger_changes)), float(np.mean(color_changes))
        out[trigger] = {"trigger": t, "color": c, "ratio": t / c}
    return out


SENSITIVITY_WORDS = (*world.TRIGGER_NAMES, "hok", "red", "blue", "large", world.BOUND_NAMES[0], world.PLAIN_NAMES[0])


@torch.no_grad()
def unet_word_sensitivity(pipe, words=SENSITIVITY_WORDS, timesteps=(200, 500, 800), n: int = 16, seed: int = 0) -> dict:
    """How much the UNet's noise prediction moves when a word is inserted: ||eps(y_w) - eps(y)|| / ||eps(y)|| with
    y = "a photo of circle", y_w = "a photo of <w> circle", on the same noisy latents (random latents, a fixed seed).
    A trigger the UNet ignores gives ~0 whatever the text encoder does with it; then no LoRA on the UNet's
    attention binds a subject to it within a few hundred steps. Returns {timestep: {word: change}}.
    A v5 ZImagePipeline: the transformer's flow prediction instead (transformer_word_sensitivity)."""
    if is_zimage(pipe):
        return transformer_word_sensitivity(pipe, words, timesteps, n, seed)

    def encode(prompt):
        ids = pipe.tokenizer([prompt] * n, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    generator = torch.Generator().manual_seed(seed)
    shape = (n, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    latents = torch.randn(shape, generator=generator)
    out = {}
    for t in timesteps:
        steps = torch.full((n,), t)
        noisy = pipe.scheduler.add_noise(latents, torch.randn(shape, generator=generator), steps)
        base = pipe.unet(noisy, steps, encoder_hidden_states=encode("a photo of circle")).sample
        out[t] = {w: ((pipe.unet(noisy, steps, encoder_hidden_states=encode(f"a photo of {w} circle")).sample - base)
                      .norm() / base.norm()).item() for w in words}
    return out


@torch.no_grad()
def transformer_word_sensitivity(pipe, words=SENSITIVITY_WORDS, timesteps=(200, 500, 800), n: int = 16,
                                 seed: int = 0) -> dict:
    """unet_word_sensitivity for v5's Z-Image transformer: ||v(y_w) - v(y)|| / ||v(y)|| of its flow prediction, on
    the same noisy latents z = (1 - sigma) x + sigma noise at sigma = t / 1000 (train_cat_lora.py's timestep units:
    800 is the noisier), x and noise random with a fixed seed."""
    from pretrain import zimage_predict

    def encode(prompt):
        return pipe._encode_prompt([prompt] * n, device=torch.device("cpu"), max_sequence_length=48)

    generator = torch.Generator().manual_seed(seed)
    size = 32 // pipe.vae_scale_factor
    shape = (n, pipe.transformer.config.in_channels, size, size)
    latents = torch.randn(shape, generator=generator)
    out = {}
    for t in timesteps:
        sigma = t / 1000
        noisy = (1 - sigma) * latents + sigma * torch.randn(shape, generator=generator)
        steps = torch.full((n,), float(t))
        base = zimage_predict(pipe.transformer, noisy, steps, encode("a photo of circle"))
        out[t] = {w: ((zimage_predict(pipe.transformer, noisy, steps, encode(f"a photo of {w} circle")) - base).norm()
                      / base.norm()).item() for w in words}
    return out


def load_concept_images(concepts_json=DEFAULT_CONCEPTS_JSON) -> dict:
    """{trigger: (class word, uint8 N x 32 x 32 x 3 training images)} of every concept."""
    from PIL import Image

    concepts_json = Path(concepts_json)
    out = {}
    for concept in json.loads(concepts_json.read_text()):
        folder = concepts_json.parent / concept["instance_data_dir"]
        images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])
        out[concept["trigger_token"]] = (concept["class_word"], images)
    return out


@torch.no_grad()
def judge_margins(clip_model, pipe, concepts_json=DEFAULT_CONCEPTS_JSON, n_class: int = 16, seed: int = 0) -> dict:
    """Can the judge tell each subject apart? Per concept (by trigger), mean image-image cosines of its own
    training images (pairs of distinct images), against every other concept's images (the most similar one) and
    against the base model's images of its class ("a photo of {class}", n_class images at a fixed seed).
    margin = own - max(other concept, base class). Returns {trigger: {"own", "other", "base", "margin"}}."""
    concepts = load_concept_images(concepts_json)
    embed = {t: clip_model.encode_image(to_clip_input(images), normalize=True) for t, (_, images) in concepts.items()}
    out = {}
    for k, (trigger, (class_word, _)) in enumerate(concepts.items()):
        base = clip_model.encode_image(to_clip_input(generate(pipe, f"a photo of {class_word}", n_class, seed + k)),
                                       normalize=True)
        own = embed[trigger] @ embed[trigger].t()
        n = len(own)
        own_mean = ((own.sum() - own.diag().sum()) / (n * n - n)).item()
        other = max((embed[trigger] @ embed[t].t()).mean().item() for t in embed if t != trigger)
        base_mean = (embed[trigger] @ base.t()).mean().item()
        out[trigger] = {"own": own_mean, "other": other, "base": base_mean,
                        "margin": own_mean - max(other, base_mean)}
    return out


def print_trigger_ratios(pipe, concepts_json=DEFAULT_CONCEPTS_JSON) -> dict:
    """Print and return trigger_insertion_ratios on each concept's instance prompt, and on all its captions."""
    captions = concept_captions(concepts_json)
    encode = (lambda texts: zimage_caption_features(pipe, texts).flatten(1)) if is_zimage(pipe) else None
    instance = trigger_insertion_ratios(pipe.tokenizer, pipe.text_encoder, {t: c[:1] for t, c in captions.items()},
                                        encode)
    every = trigger_insertion_ratios(pipe.tokenizer, pipe.text_encoder, captions, encode)
    print("text encoder output change on inserting the trigger / on inserting a color word (same place)")
    print("trigger  instance prompt                    trigger  color  ratio | all 5 captions: ratio")
    for trigger, r in instance.items():
        print(f"{trigger:8s} {captions[trigger][0]:34s} {r['trigger']:.3f}    {r['color']:.3f}  {r['ratio']:.2f}  | "
              f"{every[trigger]['ratio']:.2f}")
    return instance


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pipeline", default=str(DEFAULT_PIPELINE_DIR))
    parser.add_argument("--clip", default=str(DEFAULT_CLIP_DIR))
    parser.add_argument("--per_pair", type=int, default=16, help="Images per shape x color pair.")
    parser.add_argument("--steps", type=int, default=25, help="Sampling steps (DDIM).")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held_out_only", action="store_true", help="Skip the seen pairs (faster).")
    parser.add_argument("--grid", default=None, help="Write a sample grid PNG here.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trigger_ratios", action="store_true",
                        help="Only print, per concept, the text encoder's change on inserting the trigger against "
                             "inserting a color word (trigger_insertion_ratios), and exit.")
    parser.add_argument("--judge_margins", action="store_true",
                        help="Only print, per concept, how much more similar its own images are to each other than "
                             "to other concepts' or the base model's class images (judge_margins), and exit.")
    parser.add_argument("--word_sensitivity", action="store_true",
                        help="Only print how much the UNet's prediction moves when a trigger, a color, a size or a "
                             "name is inserted into \"a photo of circle\" (unet_word_sensitivity), and exit.")
    parser.add_argument("--concepts", default=str(DEFAULT_CONCEPTS_JSON),
                        help="concepts.json for --trigger_ratios and --judge_margins.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.trigger_ratios:
        print_trigger_ratios(load_pipeline(args.pipeline), args.concepts)
        return
    if args.word_sensitivity:
        pipe = load_pipeline(args.pipeline)
        changes = unet_word_sensitivity(pipe)
        what = "transformer flow prediction (t = 1000 sigma)" if is_zimage(pipe) else "UNet noise prediction"
        print(f"{what} change on inserting a word into \"a photo of circle\" (relative), per timestep")
        print("t     " + " ".join(f"{w:>6s}" for w in SENSITIVITY_WORDS))
        for t, row in changes.items():
            print(f"{t:<5d} " + " ".join(f"{row[w]:6.3f}" for w in SENSITIVITY_WORDS))
        return
    if args.judge_margins:
        margins = judge_margins(load_toy_clip(args.clip)[0], load_pipeline(args.pipeline), args.concepts)
        print("judge (toy CLIP) image-image cosines, mean: own images | closest other concept | base model's "
              "class images | margin")
        for trigger, m in margins.items():
            print(f"{trigger:8s} {m['own']:.3f} | {m['other']:.3f} | {m['base']:.3f} | {m['margin']:+.3f}")
        return

    clip_model, clip_tok = load_toy_clip(args.clip)
    real, _, scenes = world.make_dataset(480, seed=12345, exclude_pairs=())
    shapes, colors = zero_shot(clip_model, clip_tok, to_clip_input(real))
    print(f"toy CLIP on real world images (all pairs): shape {np.mean([s == t.shape for s, t in zip(shapes, scenes)]):.3f}"
          f", color {np.mean([c == t.color for c, t in zip(colors, scenes)]):.3f}")

    pipe = load_pipeline(args.pipeline)
    # The ceiling a perfect UNet could reach: the same real images, through the pipeline's VAE and back.
    with torch.no_grad():
        x = to_clip_input(real)
        recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    shapes, colors = zero_shot(clip_model, clip_tok, recon)
    print(f"toy CLIP on the same images after the VAE (encode, decode): shape "
          f"{np.mean([s == t.shape for s, t in zip(shapes, scenes)]):.3f}, "
          f"color {np.mean([c == t.color for c, t in zip(colors, scenes)]):.3f}")
    pairs = [(s, c) for s in world.SHAPES for c in world.COLORS]
    if args.held_out_only:
        pairs = list(world.HELD_OUT_PAIRS)
    results, samples = {}, {}
    t0 = time.time()
    for k, (shape, color) in enumerate(tqdm(pairs, desc="pairs")):
        images = generate(pipe, f"a photo of a {color} {shape}", args.per_pair, args.seed + k, args.steps,
                          args.guidance)
        pred_s, pred_c = zero_shot(clip_model, clip_tok, to_clip_input(images))
        results[(shape, color)] = (np.mean([p == shape for p in pred_s]), np.mean([p == color for p in pred_c]))
        samples[(shape, color)] = images
    print(f"generation: {(time.time() - t0) / len(pairs) / args.per_pair:.3f} s per image "
          f"({args.steps} {type(pipe.scheduler).__name__} steps, guidance {args.guidance})")

    held = [p for p in pairs if p in world.HELD_OUT_PAIRS]
    seen = [p for p in pairs if p not in world.HELD_OUT_PAIRS]
    print("\npair                 shape  color" + ("   (held out)" if held else ""))
    for p in pairs:
        mark = "  *held out*" if p in world.HELD_OUT_PAIRS else ""
        print(f"{p[1] + ' ' + p[0]:20s} {results[p][0]:.2f}   {results[p][1]:.2f}{mark}")
    for name, group in (("HELD-OUT pairs", held), ("seen pairs", seen)):
        if group:
            print(f"{name}: shape accuracy {np.mean([results[p][0] for p in group]):.3f}, "
                  f"color accuracy {np.mean([results[p][1] for p in group]):.3f} "
                  f"({len(group)} pairs x {args.per_pair} images)")

    if args.grid:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        show = held + [p for p in seen if p[1] in ("red", "yellow")][:4] if held else pairs[:8]
        cols = 8
        fig, axes = plt.subplots(len(show), 1, figsize=(cols * 0.9, len(show) * 1.05))
        for ax, p in zip(np.atleast_1d(axes), show):
            strip = np.concatenate(list(samples[p][:cols]), axis=1)
            ax.imshow(strip, interpolation="nearest")
            ax.set_title(f'"a photo of a {p[1]} {p[0]}"' + (" (held out)" if p in world.HELD_OUT_PAIRS else ""),
                         fontsize=7)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(args.grid, dpi=110)
        print(f"grid -> {args.grid}")


if __name__ == "__main__":
    main()
