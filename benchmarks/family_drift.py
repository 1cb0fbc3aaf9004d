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
from pathlib import Path

import torch
from safetensors.torch import load_file

import evaluate_kps
import train_cat_lora as T
from tiny_pipeline import BUILDERS, tiny_sequence_length

ROOT = Path(__file__).resolve().parents[1]

IMAGES = ROOT / "examples" / "sks_teapot"
PROMPTS = ["a photo of teapot", "a teapot"]  # y: the training caption without its trigger, and a shorter one
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
          seed: int = 0) -> Path:
    if (output_dir / "pytorch_lora_weights.safetensors").is_file():
        return output_dir  # trained before with these settings
    family = T.model_family(Namespace(pretrained_model_name_or_path=pipeline))
    text_encoder = family.trainable_text_encoders and "--no_text_encoder" not in extra
    argv = ["--pretrained_model_name_or_path", pipeline, "--instance_data_dir", str(IMAGES),
            "--instance_prompt", "a photo of sks teapot", "--trigger_token", "sks", "--cat_alpha", cat_alpha,
            "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--learning_rate", learning_rate, "--seed", str(seed), "--report_to", "none", "--max_sequence_length",
            str(tiny_sequence_length(family)), "--checkpointing_steps", str(steps + 1), "--output_dir", str(output_dir),
            *(["--train_text_encoder"] if text_encoder else []), *[f for f in extra if f != "--no_text_encoder"]]
    reset_accelerate_state()
    T.main(argv)
    return output_dir


def fixed_batch(rows: int, resolution: int = 32) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.rand(rows, 3, resolution, resolution, generator=generator) * 2 - 1,
            "noise_seeds": torch.randint(0, 2**62, (rows,), generator=generator),
            "original_sizes": torch.full((rows, 2), resolution), "crops_top_left": torch.zeros(rows, 2)}


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
            seed: int = 0, cat_alpha: str = "1") -> dict:
    family = T.model_family(Namespace(pretrained_model_name_or_path=pipeline, resolution=32))
    family = T.model_family(Namespace(pretrained_model_name_or_path=pipeline, resolution=32,
                                      max_sequence_length=tiny_sequence_length(family)))
    repeats = 4
    batch = fixed_batch(len(PROMPTS) * repeats)
    prompts = PROMPTS * repeats
    with_trigger = [prompt.replace("teapot", "sks teapot") for prompt in prompts]
    other_object = [prompt.replace("teapot", "dog") for prompt in prompts]
    pipe = family.load_pipeline()
    row = {"family": family.label, "trigger_sensitivity": text_sensitivity(family, pipe, batch, prompts, with_trigger),
           "object_sensitivity": text_sensitivity(family, pipe, batch, prompts, other_object)}
    for alpha in ("0", cat_alpha):
        out = train(pipeline, output_dir / f"alpha{alpha}", alpha, extra, steps, learning_rate, seed)
        squared, relative = evaluate_kps.prediction_drift(family, family.load_pipeline(), out, batch, prompts)
        alpha = "0" if alpha == "0" else "1"  # the row's names: LoRA (0) and CAT (1)
        row[f"drift_alpha{alpha}"] = squared.mean().item()
        row[f"relative_drift_alpha{alpha}"] = relative.mean().item()
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
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = args.output_dir or Path(scratch)
        for key in args.families:
            pipeline = BUILDERS[key](work / f"tiny-{key}")
            settings = {"": []}
            if args.variants:
                settings.update(VARIANTS.get(key, {}))
            for name, extra in settings.items():
                for seed in args.seeds:
                    folder = work / f"{key}-{'-'.join(name.split()) or 'protocol'}" / f"seed{seed}"
                    row = measure(key, pipeline, folder, extra, args.steps, args.learning_rate, seed, args.cat_alpha)
                    rows.append({**row, "setting": name or "protocol", "seed": seed})
    print("| family | setting | seed | trigger moves base pred | 'teapot'->'dog' moves base pred | drift LoRA | "
          "drift CAT | LoRA / CAT | LoRA: denoiser part / text-encoder part | CAT: denoiser part / text-encoder part |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def parts(row, alpha):
        denoiser = next((v for k, v in row.items() if k.startswith(f"drift_alpha{alpha}_") and "text" not in k), None)
        if denoiser is None:
            return "-"
        return f"{denoiser:.2e} / {row[f'drift_alpha{alpha}_text_encoders_only']:.2e}"

    for row in rows:
        print(f"| {row['family']} | {row['setting']}{'' if row['cat_alpha'] == '1' else ', CAT alpha ' + row['cat_alpha']}"
              f" | {row['seed']} | {row['trigger_sensitivity']:.2e} | "
              f"{row['object_sensitivity']:.2e} | {row['drift_alpha0']:.2e} | {row['drift_alpha1']:.2e} | "
              f"{row['lora_over_cat']:.1f}x | {parts(row, 0)} | {parts(row, 1)} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
