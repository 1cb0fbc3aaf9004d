#!/usr/bin/env python
"""Drift on trigger-less prompts: plain LoRA, CAT with a fixed alpha, and --cat_alpha auto at a few budgets.

Trains one adapter per setting on a toy-world concept (the committed base model, offline) and prints, per
adapter, the relative drift (``train_cat_lora.relative_drift``: ||pred_adapted - pred_base||^2 over
||pred_base||^2) logged during training on the CAT prompts y, and measured afterwards on class prompts training
never used, plus the range of alpha under the budget. Run from the repository root:

    python benchmarks/drift_budget.py --output_dir outputs/drift-budget

About 4-5 minutes per adapter on 2 CPU cores (600 steps, batch 1).
"""

import argparse
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import evaluate_kps
import train_cat_lora as T

ROOT = Path(__file__).resolve().parents[1]

TOY = ROOT / "examples" / "toyworld"
CLASS_PROMPTS = ["a photo of circle", "a photo of a circle", "a red circle", "a circle on a black background"]


def train(output_dir: Path, concept: Path, cat_alpha: str, budget: str | None, steps: int, seed: int) -> Path:
    out = output_dir / (f"budget{budget}" if budget else f"alpha{cat_alpha}")
    if (out / "pytorch_lora_weights.safetensors").is_file():
        return out  # already trained with these settings
    argv = ["--pretrained_model_name_or_path", str(TOY / "models" / "toy-sd"), "--instance_data_dir", str(concept),
            "--instance_prompt", "a photo of sks circle", "--trigger_token", "sks", "--cat_alpha", cat_alpha,
            "--resolution", "32", "--center_crop", "--cache_latents", "--pre_compute_text_embeddings",
            "--train_batch_size", "1", "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--rank", "4",
            "--checkpointing_steps", str(steps + 1), "--seed", str(seed), "--output_dir", str(out)]
    if budget:
        argv += ["--cat_drift_budget", budget]
    subprocess.run([sys.executable, str(ROOT / "train_cat_lora.py"), *argv], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return out


def logged(out: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(next((out / "logs").rglob("events*"))))
    events.Reload()
    return [event.value for event in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def drift_on_class_prompts(out: Path, concept: Path, rows: int = 64) -> torch.Tensor:
    """Relative drift of the adapter on prompts without the trigger, at fixed noisy latents of the concept's images."""
    family = T.model_family(Namespace(pretrained_model_name_or_path=str(TOY / "models" / "toy-sd"), resolution=32))
    images = T.list_images(concept)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.stack([T.augment(T.open_rgb_image(p, str(p)), 32, True, False, None)[0] for p in images])
    batch = {"pixel_values": pixels[torch.randint(0, len(images), (rows,), generator=generator)],
             "noise_seeds": torch.randint(0, 2**62, (rows,), generator=generator),
             "original_sizes": torch.full((rows, 2), 32), "crops_top_left": torch.zeros(rows, 2)}
    prompts = [CLASS_PROMPTS[i % len(CLASS_PROMPTS)] for i in range(rows)]
    return evaluate_kps.prediction_drift(family, family.load_pipeline(), out, batch, prompts)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/drift-budget"))
    parser.add_argument("--concept", type=Path, default=TOY / "concepts" / "sks_circle")
    parser.add_argument("--alphas", nargs="+", default=["0", "1"])
    parser.add_argument("--budgets", nargs="+", default=["0.03", "0.01"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.concept.is_dir():
        parser.error(f"--concept {args.concept}: no such folder")
    torch.set_num_threads(1)
    settings = [(alpha, None) for alpha in args.alphas] + [("auto", budget) for budget in args.budgets]
    rows = []
    for cat_alpha, budget in settings:
        out = train(args.output_dir, args.concept, cat_alpha, budget, args.steps, args.seed)
        drift = logged(out, "cat/drift")
        alphas = logged(out, "cat/alpha_0")
        evaluated = drift_on_class_prompts(out, args.concept)
        tail = drift[-100:]
        rows.append((f"alpha {cat_alpha}" if budget is None else f"auto, budget {budget}",
                     f"{sum(tail) / len(tail):.4f}" if tail else "n/a (no CAT pass)",
                     f"{evaluated.mean():.4f} / {evaluated.median():.4f}",
                     f"{min(alphas[len(alphas) // 2:]):.2f}-{max(alphas[len(alphas) // 2:]):.2f}" if alphas else ""))
    print("| setting | drift on y, last 100 steps (logged) | drift on class prompts, mean / median | alpha, 2nd half |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
