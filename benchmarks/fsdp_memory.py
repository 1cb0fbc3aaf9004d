#!/usr/bin/env python
"""Per-GPU memory of a CAT step under FSDP2 on 2, 4 and 8 GPUs, against one GPU per process (DDP), estimated from
counts on the meta device.

The counts are ``meta_cost.py``'s (the real architectures built from their published configs on torch's meta device,
and the training script's own step run on them): parameters by component and the bytes saved for backward at their
peak, for cat-lean and cat-batched. To those this adds what sharding changes, in bf16 weights with float32 LoRA
weights, as ``train_cat_lora.py`` holds them:

    frozen denoiser     2 B x parameters / GPUs          (FSDP2 full shard)
    gathered blocks     2 x 2 B x the largest block      (the block running and the next one prefetched; the
                                                          blocks are the denoiser's ``_no_split_modules``, the
                                                          wrap policy accelerate reads)
    LoRA                16 B x LoRA parameters / GPUs    (float32 weight, gradient and AdamW's two moments)
    text encoders       2 B x parameters                 (whole on every GPU; / GPUs plus two gathered layers with
                                                          --fsdp_text_encoder; 0 in the steps with
                                                          --pre_compute_text_embeddings)
    VAE                 2 B x parameters                 (whole on every GPU)
    activations         saved-for-backward peak / 2      (measured in float32; bf16 halves it), batch 1, 1 image

The DDP column holds everything whole. Activations are counted without --gradient_checkpointing only: the meta
device's count of a checkpointed step stops with torch's "a different number of tensors was saved during the
original forward and recomputation" (meta_cost.py fails the same way; the checkpointed step runs on the CPU, and
tests/test_fsdp.py trains with it sharded). Not counted: the CUDA context and kernels' workspaces (about 0.5-1 GiB), the
allocator's fragmentation, temporaries that do not outlive an operation, and the optimizer's step buffers. It is an
estimate from counts: nothing here ran on a GPU.

    python benchmarks/fsdp_memory.py --output docs/results/fsdp_memory.md     # FLUX.2 [dev] and Qwen-Image
    python benchmarks/fsdp_memory.py --models flux-dev,z-image --gpus 2,4
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

GIB = 2 ** 30
DEFAULT_MODELS = "flux2-dev,qwen-image"
TEXT_ENCODER_PLACEMENTS = ("whole", "--fsdp_text_encoder", "--pre_compute_text_embeddings")


def largest_block(model: torch.nn.Module) -> int:
    """Parameters of the largest module among the model's ``_no_split_modules`` classes (a whole model when none)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    sizes = [sum(p.numel() for p in module.parameters()) for module in model.modules() if type(module).__name__ in names]
    return max(sizes, default=sum(p.numel() for p in model.parameters()))


def block_sizes(pipeline: Path, components: list[str]) -> dict:
    """{component: parameters of its largest block}, each component built empty on the meta device from its config."""
    import importlib

    index = json.loads((pipeline / "model_index.json").read_text())
    sizes = {}
    for component in components:
        library, class_name = index[component]
        cls = getattr(importlib.import_module(library), class_name)
        with torch.device("meta"):
            if library == "transformers":
                config = getattr(importlib.import_module(library), "AutoConfig").from_pretrained(pipeline / component)
                model = cls._from_config(config)
            else:
                model = cls.from_config(cls.load_config(pipeline / component))
        sizes[component] = largest_block(model)
        del model
    return sizes


def static_bytes(report: dict, blocks: dict, gpus: int, text_encoders: str) -> float:
    """One GPU's bytes before activations: weights, gathered blocks, the LoRA's training state; ``gpus`` 1 means
    DDP (nothing sharded)."""
    parameters, denoiser = report["parameters"], report["denoiser"]
    sharded = gpus > 1
    total = 2 * parameters[denoiser] / gpus + (2 * 2 * blocks[denoiser] if sharded else 0)
    total += 16 * report["trainable"] / gpus
    total += 2 * parameters.get("vae", 0)
    for name in [name for name in parameters if name not in (denoiser, "vae")]:
        if text_encoders == "--pre_compute_text_embeddings":
            continue
        if text_encoders == "--fsdp_text_encoder" and sharded:
            total += 2 * parameters[name] / gpus + 2 * 2 * blocks[name]
        else:
            total += 2 * parameters[name]
    return total


def activation_bytes(report: dict, config: str) -> float:
    """The step's saved-for-backward peak in bf16 (counted in float32), per GPU: each process holds its own batch."""
    return report["results"][config]["saved_peak"] / 2


def format_table(reports: list[dict], blocks: dict, gpus: list[int]) -> str:
    head = ["model", "text encoders", "step", "1 GPU per process (DDP)"] + [f"FSDP2, {n} GPUs" for n in gpus]
    lines = ["Estimated memory per GPU in GiB: bf16 weights, float32 LoRA with AdamW, default rank, batch 1, one image "
             "at the family's usual resolution, without --gradient_checkpointing (see the script's docstring for "
             "what is counted). \"weights\" is everything but the activations; a lean or batched CAT step adds "
             "its activations, which sharding does not divide:", "",
             "| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for report in reports:
        model_blocks = blocks[report["model"]]
        for placement in TEXT_ENCODER_PLACEMENTS:
            static = [static_bytes(report, model_blocks, n, placement) for n in [1, *gpus]]
            for step, extra in (("weights", 0), ("cat-lean", activation_bytes(report, "cat-lean")),
                                ("cat-batched", activation_bytes(report, "cat-batched"))):
                lines.append(f"| {report['model']} | {placement} | {step} | "
                             + " | ".join(f"{(cell + extra) / GIB:.1f}" for cell in static) + " |")
    lines += ["", "Counts behind it (parameters; the largest block is what FSDP gathers at once):", "",
              "| model | component | parameters | largest block |", "|---|---|---:|---:|"]
    for report in reports:
        for component, count in report["parameters"].items():
            block = blocks[report["model"]].get(component) if component != "vae" else None  # never sharded
            lines.append(f"| {report['model']} | {component} | {count:,} | {'' if block is None else f'{block:,}'} |")
        lines.append(f"| {report['model']} | LoRA (rank {report['rank']}) | {report['trainable']:,} | |")
        for config in ("lora", "cat-lean", "cat-batched"):
            lines.append(f"| {report['model']} | saved for backward, {config} (float32) | "
                         f"{report['results'][config]['saved_peak'] / GIB:.2f} GiB | |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="Comma-separated meta_cost.py real architectures.")
    parser.add_argument("--gpus", default="2,4,8", help="Comma-separated GPU counts to shard across.")
    parser.add_argument("--output", default=None, help="Also write the Markdown table to this file.")
    return parser


def main(argv=None) -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import cat_step_cost as B
    import meta_cost

    args = build_parser().parse_args(argv)
    real = [name for name, choice in B.MODELS.items() if choice.random_weights]
    models = [name for name in args.models.split(",") if name]
    unknown = [name for name in models if name not in real]
    if unknown:
        B.fail(f"--models: unknown {', '.join(unknown)} (real architectures: {', '.join(real)})")
    try:
        gpus = [int(n) for n in args.gpus.split(",") if n]
    except ValueError:
        gpus = []
    if not gpus or min(gpus) < 2:
        B.fail(f"--gpus {args.gpus}: comma-separated counts of 2 or more")
    B.quiet_logging()
    reports, blocks = [], {}
    with tempfile.TemporaryDirectory(prefix="fsdp-memory-") as scratch:
        for name in models:
            report = meta_cost.measure_model(name, Path(scratch) / name, ("cat-lean", "cat-batched"))
            path, _ = B.resolve_model(name, Path(scratch) / f"{name}-blocks")
            blocks[name] = block_sizes(Path(path), list(report["parameters"]))
            reports.append(report)
            print(f"{name}: counted", file=sys.stderr, flush=True)
    table = format_table(reports, blocks, gpus)
    print(table)
    if args.output:
        Path(args.output).write_text(f"Written by `python benchmarks/fsdp_memory.py {' '.join(argv or sys.argv[1:])}`"
                                     f"\n\n{table}", encoding="utf-8")
    return table


if __name__ == "__main__":
    main()
