#!/usr/bin/env python
"""How much CAT lowers the drift of trigger-less predictions, per model family, on the tiny random pipelines.

For each family: the tiny pipeline of ``examples/tiny_pipeline.py``, two adapters trained with the same command
(``--cat_alpha 0``, plain LoRA, and ``--cat_alpha 1``; ``--train_text_encoder`` where the family offers it) on
the teapot images of ``examples/sks_teapot``, and

- drift: mean ``||pred_adapted(y) - pred_base(y)||^2`` on trigger-less prompts at fixed noisy latents
  (``evaluate_kps.prediction_drift``), for each adapter, and their ratio LoRA / CAT;
- what the base model does with text, at the same noisy latents: how much inserting the trigger moves its
  prediction (``||pred(y_T) - pred(y)||^2 / ||pred(y)||^2``) and how much another object word does
  ("teapot" -> "dog"). A model whose prediction hardly depends on the prompt cannot keep y's prediction while
  moving y_T's: the two terms of Eq. 3 then pull against each other and CAT buys less.

Extra settings (``--variants``) repeat a family with other flags, e.g. Flux.1 without the CLIP LoRA. Run from the
repository root (about 10-20 s per training on 2 CPU cores):

    python benchmarks/family_drift.py --output_dir outputs/family-drift
"""

import argparse
import json
import tempfile
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import evaluate_kps
import train_cat_lora as T
from tiny_pipeline import BUILDERS, tiny_sequence_length

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = ["a photo of {}", "a {}"]  # y: the training caption without its trigger, and a shorter one


@dataclass(frozen=True)
class Subject:
    """What the adapters learn: the images, their class word and the trigger (caption "a photo of <trigger>
    <class>")."""

    images: Path = ROOT / "examples" / "sks_teapot"
    class_word: str = "teapot"
    trigger: str = "sks"
# family key -> extra flags of each variant (the first, empty, is the protocol itself)
VARIANTS = {"flux": {"no text-encoder LoRA": ["--no_text_encoder"], "logit-normal timesteps":
                     ["--weighting_scheme", "logit_normal"]}}


def reset_accelerate_state() -> None:
    """Forget the previous in-process run's accelerate state, so the next run starts like a new process."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def train(pipeline: str, output_dir: Path, cat_alpha: str, extra: list[str], steps: int, learning_rate: str,
          seed: int = 0, subject: Subject = Subject(), max_sequence_length: int | None = None) -> Path:
    if (output_dir / "pytorch_lora_weights.safetensors").is_file():
        return output_dir  # trained before with these settings
    family = T.model_family(Namespace(pretrained_model_name_or_path=pipeline))
    text_encoder = family.trainable_text_encoders and "--no_text_encoder" not in extra
    argv = ["--pretrained_model_name_or_path", pipeline, "--instance_data_dir", str(subject.images),
            "--instance_prompt", f"a photo of {subject.trigger} {subject.class_word}", "--trigger_token",
            subject.trigger, "--cat_alpha", cat_alpha,
            "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--learning_rate", learning_rate, "--seed", str(seed), "--report_to", "none", "--max_sequence_length",
            str(max_sequence_length or tiny_sequence_length(family)), "--checkpointing_steps", str(steps + 1),
            "--output_dir", str(output_dir),
            *(["--train_text_encoder"] if text_encoder else []), *[f for f in extra if f != "--no_text_encoder"]]
    reset_accelerate_state()
    T.main(argv)
    return output_dir


def fixed_batch(rows: int, resolution: int = 32) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.rand(rows, 3, resolution, resolution, generator=generator) * 2 - 1,
            "noise_seeds": torch.randint(0, 2**62, (rows,), generator=generator),
            "original_sizes": torch.full((rows, 2), resolution), "crops_top_left": torch.zeros(rows, 2)}


def subject_batch(rows: int, images: Path, resolution: int = 32) -> dict:
    """The training images themselves (resized), each at fixed noise: where the subject fit is measured."""
    from PIL import Image

    files = sorted(images.glob("*.png"))
    pixels = [torch.from_numpy(np.asarray(
        Image.open(files[row % len(files)]).convert("RGB").resize((resolution, resolution), Image.BICUBIC),
        dtype="float32")).permute(2, 0, 1) / 127.5 - 1 for row in range(rows)]
    batch = fixed_batch(rows, resolution)
    batch["pixel_values"] = torch.stack(pixels)
    return batch


def subject_error(family, pipe, batch: dict, prompts: list[str]) -> float:
    """Mean diffusion loss of ``pipe`` (with whatever LoRA it holds) on ``batch``'s images with ``prompts``."""
    denoiser = getattr(pipe, family.denoiser)
    encoders = {name: getattr(pipe, name) for name in family.text_encoders}
    with torch.no_grad():
        z = family.noisy_latents(batch, pipe.vae, family.load_noise_scheduler(), torch.float32)
        pred = family.predict(denoiser, z, family.encode_prompts(encoders, prompts))
    return T.diffusion_loss(pred, z["target"], z["loss_weights"]).item()


def text_sensitivity(family, pipe, batch: dict, prompts: list[str], others: list[str]) -> float:
    """mean ||pred(others) - pred(prompts)||^2 / ||pred(prompts)||^2 of the base model at the batch's z_t."""
    denoiser = getattr(pipe, family.denoiser)
    encoders = {name: getattr(pipe, name) for name in family.text_encoders}
    with torch.no_grad():
        z = family.noisy_latents(batch, pipe.vae, family.load_noise_scheduler(), torch.float32)
        reference = family.predict(denoiser, z, family.encode_prompts(encoders, prompts))
        moved = family.predict(denoiser, z, family.encode_prompts(encoders, others))
    return T.relative_drift(moved, reference).mean().item()


def lora_part(lora_dir: Path, component: str) -> dict:
    """The layers of one pipeline component (``transformer``, ``text_encoder``, ...) of a saved LoRA."""
    state = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    return {key: value for key, value in state.items() if key.split(".")[0] == component}


def measure(key: str, pipeline: str, output_dir: Path, extra: list[str], steps: int, learning_rate: str,
            seed: int = 0, cat_alpha: str = "1", subject: Subject = Subject(),
            max_sequence_length: int | None = None) -> dict:
    family = T.model_family(Namespace(pretrained_model_name_or_path=pipeline, resolution=32))
    max_sequence_length = max_sequence_length or tiny_sequence_length(family)
    family = T.model_family(Namespace(pretrained_model_name_or_path=pipeline, resolution=32,
                                      max_sequence_length=max_sequence_length))
    repeats = 4
    batch = fixed_batch(len(PROMPTS) * repeats)
    prompts = [prompt.format(subject.class_word) for prompt in PROMPTS] * repeats
    with_trigger = [prompt.format(f"{subject.trigger} {subject.class_word}") for prompt in PROMPTS] * repeats
    other_object = [prompt.format("dog") for prompt in PROMPTS] * repeats
    pipe = family.load_pipeline()
    fit_batch = subject_batch(len(PROMPTS) * repeats, subject.images)
    row = {"fit_base": subject_error(family, pipe, fit_batch, with_trigger), "family": family.label,
           "trigger_sensitivity": text_sensitivity(family, pipe, batch, prompts, with_trigger),
           "object_sensitivity": text_sensitivity(family, pipe, batch, prompts, other_object)}
    for alpha in ("0", cat_alpha):
        out = train(pipeline, output_dir / f"alpha{alpha}", alpha, extra, steps, learning_rate, seed, subject,
                    max_sequence_length)
        squared, relative = evaluate_kps.prediction_drift(family, family.load_pipeline(), out, batch, prompts)
        alpha = "0" if alpha == "0" else "1"  # the row's names: LoRA (0) and CAT (1)
        row[f"drift_alpha{alpha}"] = squared.mean().item()
        row[f"relative_drift_alpha{alpha}"] = relative.mean().item()
        # The same change with the trigger: how much of what the adapter learned is specific to y_T.
        pipe = family.load_pipeline()
        squared, _ = evaluate_kps.prediction_drift(family, pipe, out, batch, with_trigger)
        row[f"trigger_change_alpha{alpha}"] = squared.mean().item()
        # The subject's side (pipe holds the LoRA now): the diffusion loss with the trigger on the training images,
        # at fixed noise.
        row[f"fit_alpha{alpha}"] = subject_error(family, pipe, fit_batch, with_trigger)
        trained = {name.split(".")[0] for name in load_file(out / "pytorch_lora_weights.safetensors")}
        if len(trained) > 1:  # which part of the adapter moves the trigger-less predictions
            for part in (family.denoiser, "text_encoders"):
                state = {}
                for component in ([part] if part == family.denoiser else sorted(trained - {family.denoiser})):
                    state.update(lora_part(out, component))
                squared, _ = evaluate_kps.prediction_drift(family, family.load_pipeline(), state, batch, prompts)
                row[f"drift_alpha{alpha}_{part}_only"] = squared.mean().item()
    row["lora_over_cat"] = row["drift_alpha0"] / row["drift_alpha1"]
    row["cat_alpha"] = cat_alpha
    return row


def print_tables(rows: list[dict]) -> None:
    """The rows as printed (markdown), and, where the subject fit was measured, what CAT's cut of the drift cost."""
    print("| family | setting | seed | trigger moves base pred | 'teapot'->'dog' moves base pred | drift LoRA | "
          "drift CAT | LoRA / CAT | change with trigger LoRA / CAT | subject loss base / LoRA / CAT | "
          "LoRA: denoiser part / text-encoder part | "
          "CAT: denoiser part / text-encoder part |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def parts(row, alpha):
        denoiser = next((v for k, v in row.items() if k.startswith(f"drift_alpha{alpha}_") and "text" not in k), None)
        if denoiser is None:
            return "-"
        return f"{denoiser:.2e} / {row[f'drift_alpha{alpha}_text_encoders_only']:.2e}"

    def changed(row):
        if "trigger_change_alpha0" not in row:
            return "-"
        return f"{row['trigger_change_alpha0']:.2e} / {row['trigger_change_alpha1']:.2e}"

    def fit(row):
        if "fit_base" not in row:
            return "-"
        return f"{row['fit_base']:.4f} / {row['fit_alpha0']:.4f} / {row['fit_alpha1']:.4f}"

    for row in rows:
        print(f"| {row['family']} | {row['setting']}{'' if row['cat_alpha'] == '1' else ', CAT alpha ' + row['cat_alpha']}"
              f" | {row['seed']} | {row['trigger_sensitivity']:.2e} | "
              f"{row['object_sensitivity']:.2e} | {row['drift_alpha0']:.2e} | {row['drift_alpha1']:.2e} | "
              f"{row['lora_over_cat']:.1f}x | {changed(row)} | {fit(row)} | {parts(row, 0)} | {parts(row, 1)} |")
    measured = [row for row in rows if "fit_base" in row and "trigger_change_alpha0" in row]
    if not measured:
        return
    print("\n| family | setting | CAT alpha | seed | drift cut without the trigger (LoRA / CAT) | change cut with the "
          "trigger (LoRA / CAT) | subject loss gain kept by CAT |")
    print("|---|---|---|---|---|---|---|")
    for row in measured:
        # 1.0 = CAT learned the training images as well as plain LoRA; 0 = no better than the base model.
        kept = (row["fit_base"] - row["fit_alpha1"]) / (row["fit_base"] - row["fit_alpha0"])
        print(f"| {row['family']} | {row['setting']} | {row['cat_alpha']} | {row['seed']} | {row['lora_over_cat']:.1f}x"
              f" | {row['trigger_change_alpha0'] / row['trigger_change_alpha1']:.1f}x | {kept:.0%} |")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="where adapters are kept (reused when present); default: a temporary folder")
    parser.add_argument("--families", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--variants", action="store_true", help="also the extra settings of VARIANTS")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--learning_rate", default="1e-3")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cat_alpha", default="1", help="--cat_alpha of the CAT adapter")
    parser.add_argument("--no_text_encoder", action="store_true",
                        help="train no text-encoder LoRA in any family (the script's default, which the protocol's "
                             "--train_text_encoder is not)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--pipeline", type=Path, default=None,
                        help="a saved pipeline folder to measure instead of the tiny random ones (e.g. the toy world's "
                             "examples/toyworld/models/toy-sd, a model that reads its prompts)")
    parser.add_argument("--instance_data_dir", type=Path, default=Subject.images, help="the subject's images")
    parser.add_argument("--class_word", default=Subject.class_word)
    parser.add_argument("--trigger_token", default=Subject.trigger)
    parser.add_argument("--max_sequence_length", type=int, default=None,
                        help="for the families that take it (default: the tiny pipelines' caption length)")
    parser.add_argument("--from_json", type=Path, nargs="+", default=None,
                        help="print the tables of rows saved before with --json (no training)")
    args = parser.parse_args(argv)
    if args.from_json:
        rows = [row for path in args.from_json for row in json.loads(path.read_text())]
        print_tables(rows)
        return rows
    subject = Subject(args.instance_data_dir, args.class_word, args.trigger_token)
    if not sorted(subject.images.glob("*.png")):
        parser.error(f"--instance_data_dir {subject.images}: no .png images there")
    if args.pipeline is not None and not (args.pipeline / "model_index.json").is_file():
        parser.error(f"--pipeline {args.pipeline}: not a saved diffusers pipeline (no model_index.json)")
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = args.output_dir or Path(scratch)
        for key in [args.pipeline.name] if args.pipeline else args.families:
            pipeline = str(args.pipeline) if args.pipeline else BUILDERS[key](work / f"tiny-{key}")
            settings = {"": ["--no_text_encoder"] if args.no_text_encoder else []}
            if args.variants:
                settings.update(VARIANTS.get(key, {}))
            for name, extra in settings.items():
                for seed in args.seeds:
                    setting = '-'.join(name.split()) or ("protocol-no-te" if args.no_text_encoder else "protocol")
                    folder = work / f"{key}-{setting}" / f"seed{seed}"
                    row = measure(key, pipeline, folder, extra, args.steps, args.learning_rate, seed, args.cat_alpha,
                                  subject, args.max_sequence_length)
                    rows.append({**row, "setting": name or ("protocol, no text-encoder LoRA" if args.no_text_encoder
                                                            else "protocol"), "seed": seed})
    print_tables(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
