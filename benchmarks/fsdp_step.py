#!/usr/bin/env python
"""Per-GPU peak memory and time of a CAT step with the denoiser sharded by accelerate's FSDP2, or replicated (DDP):
run it once under each configuration and compare.

    accelerate launch --num_processes 2 --use_fsdp --fsdp_version 2 \
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP benchmarks/fsdp_step.py --model z-image --resolution 512
    accelerate launch --num_processes 2 --multi_gpu benchmarks/fsdp_step.py --model z-image --resolution 512

Each process builds ``cat_step_cost.Bench`` (the training script's model preparation and ``training_step``, the
real architecture from its published config with random weights, on the process's GPU) and lets accelerate prepare
the denoiser and the optimizer: sharded under FSDP, wrapped in DDP otherwise. The denoiser is built whole on every
GPU before it is sharded, so the model must fit one GPU for this comparison (Z-Image, FLUX.2 [klein] and SD3.5 in
bf16 do; FLUX.2 [dev] does not: its per-GPU memory under FSDP is estimated by benchmarks/fsdp_memory.py). The
peak is ``torch.cuda.max_memory_allocated`` from after the preparation to the last timed step, per process; the
time is the median of the timed steps. The main process prints one JSON line (and writes it with --output).
``benchmarks/gpu_check.sh`` runs both on a machine with 2 or more GPUs.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="z-image", help="A cat_step_cost.MODELS choice.")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--config", default="cat-lean", help="A cat_step_cost.CONFIGS choice.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps (after one untimed).")
    parser.add_argument("--mixed_precision", choices=["no", "bf16"], default="bf16")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--output", default=None, help="Also write the JSON line to this file (main process).")
    return parser


def bench_options(args, device: str):
    import cat_step_cost as B

    return B.build_parser().parse_args(["--model", args.model, "--device", device, "--resolution",
                                        str(args.resolution), "--batch_size", "1", "--mixed_precision",
                                        args.mixed_precision, "--rss", "off"]
                                       + (["--gradient_checkpointing"] if args.gradient_checkpointing else []))


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    import cat_step_cost as B
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    import train_cat_lora as T

    args = build_parser().parse_args(argv)
    if args.model not in B.MODELS:
        B.fail(f"--model {args.model}: choose from {', '.join(B.MODELS)}")
    if args.config not in B.CONFIGS:
        B.fail(f"--config {args.config}: choose from {', '.join(B.CONFIGS)}")
    accelerator = Accelerator(cpu=T.use_cpu_processes(), mixed_precision=args.mixed_precision)
    device = accelerator.device
    B.quiet_logging()
    with tempfile.TemporaryDirectory(prefix="fsdp-step-") as scratch:
        # The main process writes the pipeline folder (save_pretrained writes on the main process only), in a
        # folder every process can read; the others receive its path.
        built = [B.resolve_model(args.model, Path(scratch)) if accelerator.is_main_process else None]
        path, random_weights = broadcast_object_list(built)[0]
        T.set_seed(0)  # every process: the same LoRA initialisation
        bench = B.make_bench(path, bench_options(args, device.type), random_weights)
        denoiser, optimizer = accelerator.prepare(bench.denoiser, bench.optimizer(args.config))
        bench.models[bench.family.denoiser] = bench.denoiser = denoiser
        bench.optimizers[args.config] = optimizer
        bench.trainable = [p for p in denoiser.parameters() if p.requires_grad]  # FSDP2 replaced them by shards
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        seconds = []
        for step in range(args.steps + 1):
            bench.synchronize()
            start = time.perf_counter()
            bench.step(args.config, seed=1000 + step)
            bench.synchronize()
            if step:  # the first step is a warm-up
                seconds.append(time.perf_counter() - start)
        # (the pipeline folder stays until here: the bench loads some components when it first uses them)
        per_process = accelerator.gather_for_metrics([{"peak_bytes": peak_bytes(device),
                                                       "step_s": statistics.median(seconds)}], use_gather_object=True)
    result = {"model": args.model, "resolution": args.resolution, "config": args.config,
              "distributed_type": str(accelerator.distributed_type).split(".")[-1],
              "processes": accelerator.num_processes, "gradient_checkpointing": args.gradient_checkpointing,
              "per_process": per_process}
    if accelerator.is_main_process:
        line = json.dumps(result)
        print(line)
        if args.output:
            Path(args.output).write_text(line + "\n", encoding="utf-8")
    accelerator.end_training()
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
