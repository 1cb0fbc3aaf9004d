#!/usr/bin/env python
"""One command for a GPU lent for a few minutes: what CAT costs on the real architectures, and the device-aware
tests on the GPU's kernels, within a time budget. Run it through ``benchmarks/gpu_check.sh`` (offline environment):

    bash benchmarks/gpu_check.sh --out gpu-check             # on the GPU machine: everything that fits in 420 s
    bash benchmarks/gpu_check.sh --dry_run                   # the plan for a GPU, with estimated times; runs nothing
    bash benchmarks/gpu_check.sh --smoke --out /tmp/smoke    # the same script on the CPU with tiny models

The work, in order of value (``--dry_run`` prints it with an estimated time per item):

1. The machine: device, its memory, torch, CUDA, cuDNN, bitsandbytes and the libraries' versions.
2. ``tests-cuda``: the tests marked ``any_device`` (alpha = 0 equals plain LoRA bit for bit, lean equals batched,
   SIGTERM then resume bit for bit; once per family of tests/conftest.py) with ``pytest --device cuda``. That turns
   on deterministic kernels, so the bit-exact checks stay bit-exact on the GPU; lean and batched run different batch
   shapes, whose GPU kernels sum in different orders, so that test has a relative tolerance of 1e-3 on cuda
   (tests/conftest.py, tests/test_train_cat_lora.py). First: cheap, and no figure matters if these fail.
   With 2 or more GPUs, ``tests-fsdp`` follows: the sharded tests of tests/test_fsdp.py (FSDP2 against one process,
   the frozen pass against the base model, resume after SIGTERM), whose two processes then talk over NCCL; then
   ``fsdp-step``: benchmarks/fsdp_step.py on every GPU, sharded and then replicated (peak memory per GPU, seconds per
   step; Z-Image, whose denoiser fits one GPU whole as DDP needs).
3. Per real architecture of ``cat_step_cost.MODELS`` (built from its published configs with random weights: nothing
   downloads; speed and memory do not depend on the weights), whose family is in ``train_cat_lora.FAMILIES`` (a
   family added there with a config in ``MODELS`` joins the plan; one without is listed as not measured): bf16
   (frozen base bf16, LoRA float32 under autocast), batch 1, at the VAE's native resolution or
   ``cat_step_cost.RESOLUTIONS``' (Flux.1-dev at 512 and 1024; SD3.5, Qwen-Image, Z-Image and FLUX.2 at 1024),
   gradient checkpointing in the
   setting a 24 GB card needs first (on at 1024 px and for a quantized base), then the other, prompts of the
   family's default length. A family that ``loads_quantized`` (Flux.1, Qwen-Image, Z-Image, FLUX.2) runs the
   README's 24 GB recipe: the base transformer NF4 through diffusers' quantized loader, as train_cat_lora.py loads
   it (the random weights are saved to a temporary folder first, ~24 GB of disk for Flux.1-dev, ~64 GB for FLUX.2
   [dev]), text embeddings pre-computed (the text encoders dropped), rank 16. The largest (Qwen-Image, FLUX.2
   [dev]) need a card larger than 24 GB and do not fit the default budget: they are listed, with estimates.
   Each item runs ``cat_step_cost.measure`` on one ``cat_step_cost.Bench`` (the training script's model preparation
   and ``training_step``) for lora, cat-lean and cat-batched and reports: steps per second (median of interleaved
   timed rounds), ``torch.cuda.max_memory_allocated`` over one step (weights, AdamW state, activations; the other
   configurations' AdamW state subtracted, as a training run holds one; the CUDA context is not in it), the peak
   against 24 GiB, FLOPs, ratios to LoRA, and ``--cat_every 2`` and ``4``, derived from the lora and cat-lean steps
   (a cycle is N - 1 LoRA steps and one CAT step; its peak is the CAT step's).

Budget (``--budget_s``, default 420, counted from the start): before each item its estimated time is compared with
what is left, and an item that would not fit is skipped with one line; a running item is stopped at the budget (or
at 3x its estimate). A failing item (an error, a crash of its worker process, CUDA out of memory) prints one line
and the rest goes on. ``--out DIR`` gets ``gpu_check.json``, ``gpu_check.md`` and ``logs/``, rewritten after every
item, so a run cut short keeps what it measured. Exit status 0 when every item ran, was skipped or stopped for the
budget, ran out of memory (a finding) or was refused as expected; 1 when an item failed or timed out; 2 on bad input.

Estimates (never presented as measurements): a step's FLOPs are counted by torch's FLOP counter on the meta device
(the denoiser's forward, the VAE encode and the text encoders, for one image at the item's resolution; the meta
tensors get the values the code reads, a GPU's attention kernels and the family's noise from
``benchmarks/meta_cost.py``) and combined
as ``cat_step_cost`` counts a step's denoiser work (frozen base: LoRA 2 forwards' worth, CAT 5; plus one forward per
adapted pass with gradient checkpointing); seconds = FLOPs / an assumed sustained throughput (``--assumed_tflops``)
+ an assumed overhead per step; the setup (start, building the random weights, saving and loading the NF4 base) and
the tests from assumed rates, listed in ``ASSUMED``. After the first measured item, the remaining estimates are
scaled by measured / estimated so far.

``--smoke``: the same script on the CPU with the tiny pipelines of ``cat_step_cost.MODELS`` (one per family) at
32 px, 2 timed rounds, the tests of one family; the NF4 item runs into the quantized loader's refusal on a CPU (one
line, expected), so the smoke also measures the unquantized tiny Flux.1. Its figures are CPU figures of toy models.
"""

import argparse
import gc
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GIB = 2**30
CARD_BYTES = 24 * GIB  # the card the README's recipes are sized for
CONFIGS = ("lora", "cat-lean", "cat-batched")
CAT_EVERY = (2, 4)
NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
QUANTIZED_RANK = 16  # the README's Flux.1 24 GB recipe
SMOKE_RESOLUTION = 32
ROUNDS = {"cuda": (1, 3), "cpu": (1, 2)}  # (warm-up, timed) rounds per item
DEVICE_TESTS = ("tests/test_train_cat_lora.py", "tests/test_reliability.py")
SMOKE_TESTS = "[sd] or [sd-"  # the smoke runs the any_device tests of one family (its family_pipeline id)
# Assumed, not measured (they only order and budget the work; see the module docstring). GPU rates are for one
# large data-centre card; the CPU ones were set from smoke runs on the project's 2-core machine.
ASSUMED = {
    "cuda": {"tflops": 100.0, "nf4_slowdown": 1.5, "step_overhead_s": 0.15, "counter_slowdown": 3.0,
             "worker_start_s": 20.0, "init_gb_per_s": 5.0, "save_gb_per_s": 1.0, "load_gb_per_s": 1.0,
             "tests_start_s": 25.0, "tests_per_family_s": 16.0},
    "cpu": {"tflops": 0.005, "nf4_slowdown": 1.0, "step_overhead_s": 0.03, "counter_slowdown": 2.0,
            "worker_start_s": 10.0, "init_gb_per_s": 0.5, "save_gb_per_s": 0.2, "load_gb_per_s": 0.2,
            "tests_start_s": 15.0, "tests_per_family_s": 16.0},
}
# Statuses that end a run with exit status 0: the script did its job (out of memory is a finding about the card).
FINE = {"done", "skipped", "stopped at the budget", "out of memory", "refused on the CPU (expected)"}


def fail(message: str):
    """Bad input: one line, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage block and message -> one line
        fail(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description="One command for a GPU lent for a few minutes: the real architectures' CAT cost and "
                                "the device-aware tests on the GPU, within a time budget (see the module docstring).")
    parser.add_argument("--out", default=None,
                        help="Folder for gpu_check.json, gpu_check.md and logs/ (default: gpu-check-<time> here).")
    parser.add_argument("--budget_s", default="420",
                        help="Seconds for the whole run (default 420); what would not fit is skipped.")
    parser.add_argument("--smoke", action="store_true", help="Run on the CPU with tiny models (checks the script).")
    parser.add_argument("--dry_run", action="store_true", help="Print the plan with estimated times; run nothing.")
    parser.add_argument("--only", default=None, help="Comma-separated item names of the plan to run (others: not run).")
    parser.add_argument("--assumed_tflops", type=float, default=None,
                        help="Sustained TFLOP/s the time estimates assume (default: ASSUMED's, 100 on a GPU).")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def check_args(args) -> None:
    try:
        args.budget_s = float(args.budget_s)
    except ValueError:
        fail(f"--budget_s: expected a number of seconds, got {args.budget_s!r}")
    if not math.isfinite(args.budget_s) or args.budget_s <= 0:
        fail(f"--budget_s must be a positive number of seconds (got {args.budget_s:g})")
    if args.assumed_tflops is not None and not args.assumed_tflops > 0:
        fail(f"--assumed_tflops must be positive (got {args.assumed_tflops:g})")
    if args.out is not None and args.dry_run:
        fail("--out: a --dry_run writes nothing")
    if args.out is None and not args.dry_run:
        args.out = f"gpu-check-{'smoke-' if args.smoke else ''}{time.strftime('%Y%m%d-%H%M%S')}"
    if args.out is not None:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            fail(f"--out {out}: exists and is not a folder")
        parent = next(p for p in [out, *out.absolute().parents] if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            fail(f"--out {out}: cannot write there ({parent} is not a writable folder)")


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Item:
    name: str
    kind: str  # "tests", "measure" or "fsdp"
    what: str  # one line for the plan
    argv: list = field(default_factory=list)  # tests: the pytest command; measure: cat_step_cost's flags
    model: str = ""
    resolution: int = 0
    gradient_checkpointing: bool = False
    quantized: bool = False
    build_key: str = ""  # items with one key share one Bench (resolution and checkpointing change in place)
    flops: dict = field(default_factory=dict)  # estimated FLOPs per step, by configuration
    denoiser_bytes: int = 0  # of the random weights a quantized item saves (disk) and loads
    estimate_build_s: float = 0.0  # building the models (and loading a quantized base), priming AdamW
    estimate_save_s: float = 0.0  # saving the random weights of a quantized base (once per run)
    estimate_run_s: float = 0.0  # the measurement itself (or the tests)

    @property
    def command(self) -> str:
        if self.kind == "tests":
            return " ".join(self.argv)
        if self.kind == "fsdp":
            return ("accelerate launch --num_processes N --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy "
                    "TRANSFORMER_BASED_WRAP benchmarks/fsdp_step.py " + " ".join(self.argv) + "; the same with "
                    "--multi_gpu instead of the --fsdp_* flags")
        flags = self.argv + ["--resolution", str(self.resolution)]
        flags += ["--gradient_checkpointing"] if self.gradient_checkpointing else []
        return "python benchmarks/cat_step_cost.py " + " ".join(flags)


def tests_item(smoke: bool, device: str, assumed: dict, families: int, xml: str = "tests.xml") -> Item:
    argv = ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", device, "-m", "any_device",
            *DEVICE_TESTS, "--junitxml", xml] + (["-k", SMOKE_TESTS] if smoke else [])
    counted = 1 if smoke else families
    return Item(name=f"tests-{device}", kind="tests", argv=argv,
                what=f"pytest --device {device} -m any_device: alpha 0 = plain LoRA, lean = batched, resume after "
                     f"SIGTERM ({'first family' if smoke else f'{families} families'})",
                estimate_run_s=assumed["tests_start_s"] + assumed["tests_per_family_s"] * counted)


def fsdp_tests_item(assumed: dict) -> Item:
    """The sharded tests (tests/test_fsdp.py, marked slow) on two GPUs: their runs go through NCCL there."""
    argv = ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow", "tests/test_fsdp.py",
            "--junitxml", "tests.xml"]
    return Item(name="tests-fsdp", kind="tests", argv=argv,
                what="pytest -m slow tests/test_fsdp.py on 2 GPUs: FSDP2 = one process, the frozen pass = the base "
                     "model, resume after SIGTERM (7 tests)",
                estimate_run_s=assumed["tests_start_s"] + 7 * 2 * assumed["tests_per_family_s"])


# The FSDP2-against-DDP comparison needs a model whose whole denoiser fits one GPU (DDP holds it whole): Z-Image's
# 6 B transformer in bf16.
FSDP_STEP_ARGV = ["--model", "z-image", "--resolution", "512", "--config", "cat-lean", "--gradient_checkpointing"]
FSDP_LAUNCH = {"FSDP2": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"],
               "DDP": ["--multi_gpu"]}


def fsdp_step_item(assumed: dict, gpus: int) -> Item:
    return Item(name="fsdp-step", kind="fsdp", argv=FSDP_STEP_ARGV,
                what=f"benchmarks/fsdp_step.py on {gpus} GPUs: peak memory per GPU and seconds per step of a CAT "
                     "step, FSDP2 against DDP (Z-Image, 512 px, cat-lean, gradient checkpointing)",
                estimate_run_s=2 * (assumed["worker_start_s"] + 12 / assumed["init_gb_per_s"] + 30))


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# count_flops' results by (model, path, resolution, prompt tokens): counting on the meta device takes seconds per
# architecture and gives the same figures every time, so one process counts each once.
FLOP_COUNTS: dict = {}


def count_flops(B, name: str, path: str, resolution: int, sequence: int | None) -> dict:
    """Forward FLOPs of the denoiser, the VAE encode and the text encoders for one image and prompt at
    ``resolution`` (torch's FLOP counter on the meta device: no memory, no weights; benchmarks/meta_cost.py gives the
    meta tensors the values the code reads, a GPU's attention kernels and the family's noise), and the base
    parameters. ``sequence``: the long text encoder's prompt tokens (None: the family's default)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import meta_cost as M

    args = B.build_parser().parse_args(["--model", name, "--resolution", str(resolution)])
    args.max_sequence_length = sequence
    family = B.family_for(path, args, random_weights=True)

    def counted(run):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            output = run()
        return counter.get_total_flops(), output

    with M.meta_execution():
        with torch.device("meta"):
            models = family.load_models()
        text, cond = counted(lambda: family.encode_prompts({n: models[n] for n in family.text_encoders},
                                                           ["a photo of sks teapot"]))
        vae = models["vae"]
        encode, _ = counted(lambda: family.encode_pixels(vae, torch.zeros(1, 3, resolution, resolution,
                                                                            device="meta")))
        batch = B.make_batches(resolution, 1)[False]
        # The scheduler stays on the CPU: its tables index the CPU timesteps (see meta_cost.MetaLatentVAE).
        z = M.meta_noisy_latents(family, batch, vae, family.load_noise_scheduler(), torch.float32)
        denoiser, _ = counted(lambda: family.predict(models[family.denoiser], z, cond))
    parameters = B.base_parameter_counts(models)
    return {"denoiser": denoiser, "vae": encode, "text": text, "parameters": sum(parameters.values()),
            "denoiser_parameters": parameters[family.denoiser]}


def step_flops(B, counts: dict, config: str, checkpointing: bool, text_cached: bool) -> float:
    """Estimated FLOPs of one step of ``config``: the denoiser work as cat_step_cost counts it (frozen base: a
    backward about one forward), one more forward per adapted pass when checkpointing recomputes it, the VAE encode,
    and the text encoders once per adapted pass (none when the text embeddings are pre-computed)."""
    adapted, _ = B.DENOISER_PASSES[config]
    units = B.denoiser_units(config, B.BACKWARD_UNITS["frozen base"]) + (adapted if checkpointing else 0)
    return units * counts["denoiser"] + counts["vae"] + (0 if text_cached else adapted * counts["text"])


def model_items(B, T, name: str, path: str, family, smoke: bool, device: str, assumed: dict, nf4_path: Path
                ) -> list[Item]:
    """The items of one model: its resolutions x gradient checkpointing (the 24 GB card's setting first)."""
    quantized = bool(getattr(family, "loads_quantized", False))
    native = B.native_resolution(path)
    resolutions = (SMOKE_RESOLUTION,) if smoke else B.RESOLUTIONS.get(name, (native,))
    first = quantized or native >= 1024
    script = T.build_parser()
    # Prompt tokens of the long text encoder: the tiny pipelines' on the CPU; else train_cat_lora.py's default, the
    # family's (its diffusers script's). Families without a long text encoder do not read it.
    sequence = (B.build_parser().get_default("max_sequence_length") if smoke else
                script.get_default("max_sequence_length") or family.default_max_sequence_length)
    warmup, steps = ROUNDS[device]
    base = ["--model", name, "--device", device, "--batch_size", "1", "--mixed_precision", "bf16"]
    base += ["--max_sequence_length", str(sequence)] if sequence and family.reads("max_sequence_length") else []
    base += ["--steps", str(steps), "--warmup", str(warmup), "--rss", "off", "--phase_steps", "0",
             "--configs", ",".join(CONFIGS)] + (["--threads", "1"] if smoke else [])
    variants = [(False, base + ["--rank", str(script.get_default("rank"))])]
    if quantized:  # the README's 24 GB recipe; on the CPU the quantized loader refuses, so the smoke adds bf16
        recipe = base + ["--rank", str(QUANTIZED_RANK), "--bnb_quantization_config_path", str(nf4_path),
                         "--pre_compute_text_embeddings"]
        variants = [(True, recipe)] + (variants if smoke else [])
    items = []
    for nf4, argv in variants:
        for checkpointing in (first, not first):
            for resolution in resolutions:
                key = (name, path, resolution, sequence)
                if key not in FLOP_COUNTS:
                    FLOP_COUNTS[key] = count_flops(B, name, path, resolution, sequence)
                counts = FLOP_COUNTS[key]
                flops = {c: step_flops(B, counts, c, checkpointing, nf4) for c in CONFIGS}
                seconds = {c: f / (assumed["tflops"] * 1e12) * (assumed["nf4_slowdown"] if nf4 else 1.0)
                           + assumed["step_overhead_s"] for c, f in flops.items()}
                weights = 2 * counts["parameters"]  # bf16
                denoiser = 2 * counts["denoiser_parameters"]
                build = weights / (assumed["init_gb_per_s"] * 1e9) + sum(seconds.values())  # + priming AdamW
                if nf4:
                    build += denoiser / (assumed["load_gb_per_s"] * 1e9)
                rounds = assumed["counter_slowdown"] + warmup + steps
                rank = argv[argv.index("--rank") + 1]
                items.append(Item(
                    name=f"{name}{'-nf4' if nf4 else ''}-{resolution}{'-gc' if checkpointing else ''}", kind="measure",
                    what=f"{name} ({family.__name__}) {resolution} px, "
                         f"{'NF4 base, text embeddings pre-computed, ' if nf4 else ''}bf16, batch 1, rank {rank}, "
                         f"gradient checkpointing {'on' if checkpointing else 'off'}",
                    argv=argv, model=name, resolution=resolution, gradient_checkpointing=checkpointing, quantized=nf4,
                    build_key=f"{name}{'-nf4' if nf4 else ''}", flops=flops,
                    denoiser_bytes=denoiser if nf4 else 0, estimate_build_s=build,
                    estimate_save_s=denoiser / (assumed["init_gb_per_s"] * 1e9)
                    + denoiser / (assumed["save_gb_per_s"] * 1e9) if nf4 else 0.0,
                    estimate_run_s=rounds * sum(seconds.values())))
    return items


def make_plan(args, scratch: Path) -> tuple[list[Item], list[str]]:
    """The items in order of value, and notes on the families not measured."""
    import cat_step_cost as B
    import train_cat_lora as T

    device = "cpu" if args.smoke else "cuda"
    assumed = assumed_rates(args)
    nf4_path = scratch / "nf4.json"
    nf4_path.write_text(json.dumps(NF4))
    families = list(dict.fromkeys(T.FAMILIES.values()))
    found, notes = {}, []
    for name, choice in B.MODELS.items():
        if not (name.startswith("tiny") if args.smoke else choice.random_weights):
            continue
        path, _ = B.resolve_model(name, scratch)
        pipeline_class = T.read_pipeline_class(path)
        family = T.FAMILIES.get(pipeline_class)
        if family is None:
            notes.append(f"{name}: {pipeline_class} is not in train_cat_lora.FAMILIES: not measured")
        elif not (args.smoke and family in found):  # the smoke takes one tiny pipeline per family
            found.setdefault(family, []).append((name, path))
    for family in families:
        if family not in found:
            kind = "tiny pipeline" if args.smoke else "real-architecture config"
            notes.append(f"{family.__name__}: no {kind} in cat_step_cost.MODELS: not measured")
    items = [tests_item(args.smoke, device, assumed, len(families))]
    if not args.smoke and gpu_count() >= 2:
        items += [fsdp_tests_item(assumed), fsdp_step_item(assumed, gpu_count())]
    elif not args.smoke:
        notes.append("tests-fsdp, fsdp-step: the sharded tests and FSDP2 against DDP run with 2 or more GPUs; this "
                     "machine has "
                     f"{gpu_count()}")
    for family, entries in found.items():
        for name, path in entries:
            try:
                items += model_items(B, T, name, path, family, args.smoke, device, assumed, nf4_path)
            except Exception as error:  # a family the FLOP counting does not know how to feed: not planned
                notes.append(f"{name}: no plan ({type(error).__name__}: {first_line(error)})")
    return items, notes


def assumed_rates(args) -> dict:
    rates = dict(ASSUMED["cpu" if args.smoke else "cuda"])
    if args.assumed_tflops:
        rates["tflops"] = args.assumed_tflops
    return rates


def first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------------------
# Running: the worker process (one Bench at a time), the tests, the budget
# ---------------------------------------------------------------------------------------------------------


def worker_command() -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--_worker"]


class WorkerDied(Exception):
    pass


class Worker:
    """A Python process that runs measure items sent on its stdin (one JSON line each) and answers one JSON line
    each; it keeps the last model build, so items with the same ``build_key`` share it. A crash, a hang or a CUDA
    error kills only the worker: the next item starts a new one."""

    def __init__(self, log_path: Path):
        self.log = open(log_path, "a", encoding="utf-8")
        self.log_path = log_path
        self.process = subprocess.Popen(worker_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, cwd=ROOT, env=offline_env(),
                                        start_new_session=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, request: dict, timeout: float) -> dict:
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerDied(self.death()) from None
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError from None
            if line is None:
                raise WorkerDied(self.death())
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue

    def death(self) -> str:
        code = self.process.wait()
        self.log.flush()
        lines = [line for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines() if line]
        return f"worker exited with status {code}" + (f" ({lines[-1].strip()[:300]})" if lines else "")

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self.log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the worker's own process group (start_new_session)
            self.process.wait()


def offline_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


class Run:
    """What the budget needs to know while items run: the worker's state, saved weights, the calibration."""

    def __init__(self, args, assumed: dict, out: Path | None, started: float):
        self.args, self.assumed, self.out, self.started = args, assumed, out, started
        self.worker = None  # Worker, or None before the first measure item and after a failure
        self.build_key = None  # the build the worker holds (simulated in a dry run)
        self.saved = set()  # models whose random weights are saved in the scratch folder
        self.failed_builds = {}  # build key -> the item whose build failed
        self.measured = [0.0, 0.0]  # seconds measured, seconds estimated, of the measure items done

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def calibration(self) -> float:
        return self.measured[0] / self.measured[1] if self.measured[1] else 1.0

    def estimate(self, item: Item, worker_alive: bool | None = None) -> float:
        if item.kind in ("tests", "fsdp"):
            return item.estimate_run_s
        alive = self.worker is not None if worker_alive is None else worker_alive
        seconds = item.estimate_run_s
        if not alive:
            seconds += self.assumed["worker_start_s"]
        if not alive or self.build_key != item.build_key:
            seconds += item.estimate_build_s + (item.estimate_save_s if item.model not in self.saved else 0.0)
        return seconds * self.calibration

    def simulate(self, items: list[Item]) -> list[tuple[Item, float, float, bool]]:
        """The dry run: (item, estimated seconds, estimated start, fits the budget) as the run would go if every
        estimate held."""
        clock, alive, plan = self.elapsed, False, []
        for item in items:
            seconds = self.estimate(item, worker_alive=alive)
            fits = clock + seconds <= self.args.budget_s
            plan.append((item, seconds, clock, fits))
            if fits:
                clock += seconds
                if item.kind == "measure":
                    alive, self.build_key = True, item.build_key
                    if item.quantized:
                        self.saved.add(item.model)
        self.build_key, self.saved = None, set()
        return plan

    def execute(self, item: Item, scratch: Path) -> dict:
        """Run ``item`` within the budget: {"status", "message", "seconds", ...}."""
        estimate = self.estimate(item)
        remaining = self.args.budget_s - self.elapsed
        limit = min(remaining, max(3 * estimate, estimate + 60))
        budget_bound = limit >= remaining
        start = time.monotonic()
        if item.kind == "tests":
            record = self.run_tests(item, limit, budget_bound)
        elif item.kind == "fsdp":
            record = self.run_fsdp(item, limit, budget_bound)
        else:
            record = self.run_measure(item, scratch, limit, budget_bound)
            if record["status"] == "done":
                self.measured[0] += time.monotonic() - start
                self.measured[1] += estimate
        record.update(seconds=time.monotonic() - start, estimate_s=estimate)
        return record

    def run_tests(self, item: Item, limit: float, budget_bound: bool) -> dict:
        xml = self.out / "tests.xml"
        argv = [sys.executable if a == "python" else str(xml) if a == "tests.xml" else a for a in item.argv]
        env = {**offline_env(), "OMP_NUM_THREADS": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        with open(self.out / "logs" / f"{item.name}.log", "w", encoding="utf-8") as log:
            process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
            try:
                code = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return {"status": "stopped at the budget" if budget_bound else "timed out",
                        "message": f"pytest stopped after {limit:.0f} s (see logs/{item.name}.log)"}
        outcome = junit_outcome(xml)
        if code == 0:
            return {"status": "done", "message": outcome["summary"], "tests": outcome}
        if code == 5:
            return {"status": "failed", "message": f"no test selected (see logs/{item.name}.log)", "tests": outcome}
        failed = ", ".join(outcome["failed"][:5]) + (" ..." if len(outcome["failed"]) > 5 else "")
        return {"status": "failed", "tests": outcome,
                "message": f"{outcome['summary']}" + (f": {failed}" if failed else f" (pytest status {code})")}

    def run_fsdp(self, item: Item, limit: float, budget_bound: bool) -> dict:
        """benchmarks/fsdp_step.py under accelerate launch, sharded and then replicated, on every GPU."""
        figures, deadline = {}, time.monotonic() + limit
        for label, launch in FSDP_LAUNCH.items():
            output = self.out / f"fsdp_step_{label}.json"
            argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpu_count()),
                    "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no", *launch,
                    str(ROOT / "benchmarks" / "fsdp_step.py"), *item.argv, "--output", str(output)]
            with open(self.out / "logs" / f"{item.name}-{label}.log", "w", encoding="utf-8") as log:
                process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=offline_env(),
                                           start_new_session=True)
                try:
                    code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    return {"status": "stopped at the budget" if budget_bound else "timed out", "fsdp": figures,
                            "message": f"{label} stopped after {limit:.0f} s (see logs/{item.name}-{label}.log)"}
            if code != 0 or not output.is_file():
                log_text = (self.out / "logs" / f"{item.name}-{label}.log").read_text(errors="replace")
                figures[label] = "out of memory" if "OutOfMemoryError" in log_text else "failed"
                continue
            result = json.loads(output.read_text())
            figures[label] = (f"peak GiB per GPU {' / '.join(gib(p['peak_bytes']) for p in result['per_process'])}, "
                              f"{max(p['step_s'] for p in result['per_process']):.2f} s/step")
        failed = [label for label, figure in figures.items() if figure == "failed"]
        return {"status": "failed" if failed else "done", "fsdp": figures,
                "message": "; ".join(f"{label}: {figure}" for label, figure in figures.items())
                           + (f" (see logs/{item.name}-*.log)" if failed else "")}

    def run_measure(self, item: Item, scratch: Path, limit: float, budget_bound: bool) -> dict:
        if self.worker is None:
            self.worker, self.build_key = Worker(self.out / "logs" / "worker.log"), None
        request = {"name": item.name, "argv": item.argv + ["--resolution", str(item.resolution)]
                   + (["--gradient_checkpointing"] if item.gradient_checkpointing else []),
                   "resolution": item.resolution, "gradient_checkpointing": item.gradient_checkpointing,
                   "build_key": item.build_key, "scratch": str(scratch)}
        try:
            reply = self.worker.run(request, limit)
        except TimeoutError:
            self.drop_worker(kill=True)
            return {"status": "stopped at the budget" if budget_bound else "timed out",
                    "message": f"stopped after {limit:.0f} s (its worker was killed; see logs/worker.log)"}
        except WorkerDied as died:
            self.drop_worker(kill=True)
            return {"status": "failed", "message": str(died)}
        self.build_key = item.build_key if reply["status"] == "done" else None
        if reply.get("saved_weights"):
            self.saved.add(item.model)
        if reply.get("build_failed"):
            self.failed_builds[item.build_key] = item.name
        if reply["status"] == "refused" and item.quantized and self.args.smoke:
            reply["status"] = "refused on the CPU (expected)"
        elif reply["status"] == "refused":
            reply["status"] = "failed"
        if reply["status"] == "done":
            reply["summary"] = summarize(reply["results"])
        return reply

    def drop_worker(self, kill: bool = False) -> None:
        if self.worker is not None:
            if kill:
                self.worker.kill()
            self.worker.stop()
        self.worker, self.build_key = None, None


def junit_outcome(xml: Path) -> dict:
    """Counts and failing test ids from pytest's JUnit XML."""
    import xml.etree.ElementTree as ElementTree

    outcome = {"passed": 0, "failed": [], "skipped": 0, "summary": "no JUnit report"}
    try:
        root = ElementTree.parse(xml).getroot()
    except (OSError, ElementTree.ParseError):
        return outcome
    for case in root.iter("testcase"):
        test = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome["failed"].append(test)
        elif case.find("skipped") is not None:
            outcome["skipped"] += 1
        else:
            outcome["passed"] += 1
    outcome["summary"] = f"{outcome['passed']} passed, {len(outcome['failed'])} failed" + (
        f", {outcome['skipped']} skipped" if outcome["skipped"] else "")
    return outcome


def worker_main() -> None:
    """The worker: one JSON request per stdin line, one JSON reply per stdout line; everything else to stderr."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # libraries' prints go to the log, not into the replies
    sys.stdout = sys.stderr
    import cat_step_cost as B

    B.quiet_logging()
    state = {}
    for line in sys.stdin:
        request = json.loads(line)
        print(f"--- {time.strftime('%H:%M:%S')} {request['name']}", file=sys.stderr, flush=True)
        protocol.write(json.dumps(measure_request(B, request, state), default=str) + "\n")


def measure_request(B, request: dict, state: dict) -> dict:
    """One measure item on the worker's Bench (built anew when the build key changes)."""
    import torch

    import train_cat_lora as T

    reply = {"name": request["name"], "setup_s": 0.0}
    start = time.monotonic()
    try:
        if state.get("key") != request["build_key"]:
            release(state)
            args = B.build_parser().parse_args(request["argv"])
            B.check_args(args)
            if args.threads:
                torch.set_num_threads(args.threads)
            path, random_weights = B.resolve_model(args.model, Path(request["scratch"]))
            reply["build_failed"] = True  # until the Bench stands
            bench = B.Bench(path, args, random_weights)
            reply["saved_weights"] = bool(random_weights and args.bnb_quantization_config_path)
            for config in CONFIGS:  # AdamW state exists, as in a training run after its first step
                bench.step(config, seed=900)
            bench.synchronize()
            del reply["build_failed"]
            state.update(key=request["build_key"], bench=bench)
            reply["setup_s"] = time.monotonic() - start
            reply["build"] = {"family": type(bench.family).__name__.removeprefix("RandomWeights"),
                              "parameters": B.base_parameter_counts(bench.models),
                              "trainable": sum(p.numel() for p in bench.trainable)}
        bench = state["bench"]
        bench.set_resolution(request["resolution"])
        bench.set_gradient_checkpointing(request["gradient_checkpointing"])
        measured = time.monotonic()
        reply["results"] = B.measure(bench, list(CONFIGS), bench.args.steps, bench.args.warmup, phase_steps=0)
        reply.update(status="done", run_s=time.monotonic() - measured)
    except torch.OutOfMemoryError as error:
        release(state)
        reply.update(status="out of memory", message=first_line(error))
    except T.InputError as error:  # the training script's own refusal (e.g. the quantized loader on a CPU)
        release(state)
        reply.update(status="refused", message=first_line(error))
    except SystemExit:  # cat_step_cost's check of its flags printed its line to the log
        release(state)
        reply.update(status="failed", message="cat_step_cost refused the item's flags (see logs/worker.log)")
    except Exception as error:
        traceback.print_exc()
        release(state)
        reply.update(status="failed", message=f"{type(error).__name__}: {first_line(error)}")
    return reply


def release(state: dict) -> None:
    import torch

    state.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# Figures, the report
# ---------------------------------------------------------------------------------------------------------


def training_peak(result: dict):
    """The CUDA peak of a step as a training run has it (other configurations' AdamW state subtracted)."""
    if "cuda_peak_total" not in result:
        return None
    return result["cuda_peak_total"] - result.get("cuda_other_optimizers", 0)


def summarize(results: dict) -> dict:
    """Per row (the measured configurations, then --cat_every N derived from lora and cat-lean): steps/s, time x
    LoRA, the CUDA peak and its ratio, bytes held for backward, GFLOP per step."""
    lora, lean = results["lora"], results["cat-lean"]
    rows = {}
    for config in CONFIGS:
        r = results[config]
        rows[config] = {"steps_per_s": 1e3 / r["time_ms"], "time_x_lora": r["time_ratio"],
                        "peak_bytes": training_peak(r), "saved_bytes": r["saved_peak"], "gflop": r["flops"] / 1e9,
                        "derived": False}
    peaks = [training_peak(lora), training_peak(lean)]
    for every in CAT_EVERY:
        rows[f"cat-lean, --cat_every {every}"] = {
            "steps_per_s": every * 1e3 / ((every - 1) * lora["time_ms"] + lean["time_ms"]),
            "time_x_lora": (every - 1 + lean["time_ratio"]) / every,
            "peak_bytes": None if None in peaks else max(peaks),
            "saved_bytes": max(lora["saved_peak"], lean["saved_peak"]),
            "gflop": ((every - 1) * lora["flops"] + lean["flops"]) / every / 1e9, "derived": True}
    for row in rows.values():
        base = rows["lora"]["peak_bytes"]
        row["peak_x_lora"] = row["peak_bytes"] / base if row["peak_bytes"] and base else None
    return rows


def summary_line(rows: dict) -> str:
    """One line of an item's figures for the console."""
    lora, lean, batched = rows["lora"], rows["cat-lean"], rows["cat-batched"]
    if lora["peak_bytes"] is None:
        lean_ratio = lean["saved_bytes"] / lora["saved_bytes"] if lora["saved_bytes"] else None
        memory = f"held for backward: LoRA {lora['saved_bytes'] / 2**20:.1f} MiB, lean {ratio(lean_ratio)}"
    else:
        memory = (f"peak GiB: LoRA {gib(lora['peak_bytes'])}, lean {gib(lean['peak_bytes'])}, batched "
                  f"{gib(batched['peak_bytes'])} (lean: {against_card(lean['peak_bytes'])} of 24 GiB)")
    return (f"LoRA {lora['steps_per_s']:.2f} steps/s; time x LoRA: lean {ratio(lean['time_x_lora'])}, batched "
            f"{ratio(batched['time_x_lora'])}, --cat_every 2 {ratio(rows['cat-lean, --cat_every 2']['time_x_lora'])}, "
            f"4 {ratio(rows['cat-lean, --cat_every 4']['time_x_lora'])}; {memory}")


def against_card(peak) -> str:
    if peak is None:
        return "n/a (no CUDA)"
    spare = (CARD_BYTES - peak) / GIB
    return f"fits, {spare:.1f} GiB spare" if spare >= 0 else f"over by {-spare:.1f} GiB"


def gib(value) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f}"


def ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def format_markdown(report: dict) -> str:
    machine, lines = report["machine"], []
    subject = ("a tiny pipeline (--smoke: CPU figures of toy models)" if report["mode"] == "smoke"
               else "the real architecture (from its published configs, random weights)")
    measured_on = machine["device"] if report["mode"] == "gpu" else f"the CPU ({machine['cpu']}, tiny models: smoke)"
    lines += [f"# GPU check: {measured_on}", "",
              f"- Run {report['started']}, {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget"
              f"{' (in progress)' if not report.get('finished') else ''}; commit {machine.get('commit', '?')}; "
              f"`{report['command']}`",
              f"- {machine_line(machine)}",
              f"- Each item: {subject} prepared and stepped by train_cat_lora.py's own code (cat_step_cost.Bench, "
              "training_step); bf16 base, float32 LoRA under autocast, batch 1; steps/s = 1 / median step time "
              "over interleaved timed rounds (full optimizer step); peak = torch.cuda.max_memory_allocated over one "
              "step (weights, AdamW state, activations; the other configurations' AdamW state subtracted; the CUDA "
              "context, ~0.5 GiB, is not in it); --cat_every N is derived from the measured lora and cat-lean steps",
              ""]
    lines += ["| # | item | status | seconds | estimated s | note |", "|---|---|---|---|---|---|"]
    for number, planned in enumerate(report["plan"], 1):
        record = report["items"].get(planned["name"], {"status": "not run yet"})
        seconds = f"{record['seconds']:.0f}" if "seconds" in record else ""
        estimate = f"{record.get('estimate_s', planned['estimate_s']):.0f}"
        lines.append(f"| {number} | {planned['name']} | {record['status']} | {seconds} | {estimate} | "
                     f"{record.get('message', '')} |")
    for note in report["notes"]:
        lines.append(f"\n- {note}")
    done = {name: r for name, r in report["items"].items() if r.get("summary")}
    if done:
        lines += ["", "## Overview", "",
                  "| item | LoRA steps/s | CAT lean x LoRA | CAT batched x LoRA | --cat_every 2 | --cat_every 4 | "
                  "peak GiB: LoRA / lean / batched | lean against 24 GiB |", "|---|---|---|---|---|---|---|---|"]
        for name, record in done.items():
            rows = record["summary"]
            lines.append(f"| {name} | {rows['lora']['steps_per_s']:.2f} | {ratio(rows['cat-lean']['time_x_lora'])} | "
                         f"{ratio(rows['cat-batched']['time_x_lora'])} | "
                         f"{ratio(rows['cat-lean, --cat_every 2']['time_x_lora'])} | "
                         f"{ratio(rows['cat-lean, --cat_every 4']['time_x_lora'])} | "
                         f"{' / '.join(gib(rows[c]['peak_bytes']) for c in CONFIGS)} | "
                         f"{against_card(rows['cat-lean']['peak_bytes'])} |")
        for name, record in done.items():
            planned = next(p for p in report["plan"] if p["name"] == name)
            lines += ["", f"## {name}", "", f"{planned['what']}; setup {record.get('setup_s', 0):.0f} s. "
                      f"Alone: `{planned['command']}`", "",
                      "| configuration | steps/s | time x LoRA | peak GiB | peak x LoRA | against 24 GiB | "
                      "held for backward MiB | GFLOP/step |", "|---|---|---|---|---|---|---|---|"]
            for row_name, row in record["summary"].items():
                label = f"{row_name} (derived)" if row["derived"] else row_name
                lines.append(f"| {label} | {row['steps_per_s']:.2f} | {ratio(row['time_x_lora'])} | "
                             f"{gib(row['peak_bytes'])} | {ratio(row['peak_x_lora'])} | "
                             f"{against_card(row['peak_bytes'])} | {row['saved_bytes'] / 2**20:.1f} | "
                             f"{row['gflop']:.3g} |")
    tests = [r for r in report["items"].values() if r.get("tests")]
    for record in tests:
        if record["tests"]["failed"]:
            lines += ["", "Failed tests:", ""] + [f"- {test}" for test in record["tests"]["failed"]]
    return "\n".join(lines) + "\n"


def machine_line(machine: dict) -> str:
    parts = [f"device {machine['device']}"]
    if machine.get("gpu_memory_gib"):
        parts.append(f"{machine['gpu_memory_gib']:.1f} GiB, compute capability {machine['capability']}, "
                     f"{machine['gpus']} visible, driver {machine.get('driver', '?')}")
    parts.append(f"torch {machine['torch']}, CUDA {machine['cuda']}, cuDNN {machine.get('cudnn')}")
    parts.append(", ".join(f"{name} {machine[name]}" for name in ("bitsandbytes", "diffusers", "transformers", "peft",
                                                                    "accelerate")))
    parts.append(f"Python {machine['python']}, {machine['cpu']} ({machine['cores']} logical CPUs)")
    return "; ".join(parts)


def describe_machine() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from cat_step_cost import cpu_model

    machine = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "cpu": cpu_model(), "cores": os.cpu_count()}
    for name in ("bitsandbytes", "diffusers", "transformers", "peft", "accelerate"):
        try:
            machine[name] = version(name)
        except PackageNotFoundError:
            machine[name] = "not installed"
    if torch.cuda.is_available():
        # Asked in a child process: a CUDA context here would hold GPU memory the items need for the whole run.
        query = ("import json, torch; p = torch.cuda.get_device_properties(0); print(json.dumps({'name': p.name, "
                 "'memory': p.total_memory, 'capability': f'{p.major}.{p.minor}', 'gpus': torch.cuda.device_count(), "
                 "'cudnn': torch.backends.cudnn.version()}))")
        try:
            found = json.loads(subprocess.run([sys.executable, "-c", query], capture_output=True, text=True,
                                              timeout=120).stdout.strip().splitlines()[-1])
            machine.update(device=f"cuda:0 {found['name']}", gpu_memory_gib=found["memory"] / GIB,
                           capability=found["capability"], gpus=found["gpus"], cudnn=found["cudnn"])
        except (OSError, subprocess.TimeoutExpired, IndexError, ValueError, KeyError):
            machine["device"] = "cuda (its properties could not be read)"
        try:
            machine["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            pass
    else:
        machine["device"] = "cpu (torch sees no CUDA device)"
    try:
        machine["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return machine


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------


def estimate_basis(assumed: dict, smoke: bool) -> str:
    device = "CPU" if smoke else "GPU"
    warmup, steps = ROUNDS["cpu" if smoke else "cuda"]
    return (f"Estimates, not measurements. A step: FLOPs counted by torch's FLOP counter on the meta device (denoiser "
            f"forward, VAE encode, text encoders, one image) combined as cat_step_cost counts a step (frozen base: "
            f"LoRA 2 denoiser forwards' worth, CAT 5, +1 per adapted pass with checkpointing), divided by an "
            f"assumed {assumed['tflops']:g} TFLOP/s sustained on the {device} (x{assumed['nf4_slowdown']:g} for an NF4 "
            f"base), + an assumed {assumed['step_overhead_s']:g} s per step; per item {warmup} warm-up + {steps} "
            f"timed rounds + 1 counted step (x{assumed['counter_slowdown']:g}) per configuration. Setup: worker start "
            f"{assumed['worker_start_s']:g} s, "
            f"random bf16 weights at {assumed['init_gb_per_s']:g} GB/s, the NF4 base saved at "
            f"{assumed['save_gb_per_s']:g} GB/s and loaded at {assumed['load_gb_per_s']:g} GB/s (all assumed). Tests: "
            f"{assumed['tests_start_s']:g} s + {assumed['tests_per_family_s']:g} s per family (the 5 tests of one "
            f"family took 11-20 s on the project's 2-core CPU, 2026-12-05; assumed no slower on a GPU).")


def print_plan(run: Run, items: list[Item], notes: list[str], args) -> None:
    device = "the CPU (--smoke)" if args.smoke else "a GPU"
    print(f"\nPlan for {device}, budget {args.budget_s:.0f} s (planning took {run.elapsed:.0f} s); in order of value:")
    print(estimate_basis(run.assumed, args.smoke))
    print(f"\n{'#':>2}  {'item':<24} {'est. s':>7} {'from s':>7}  what")
    total = 0.0
    for number, (item, seconds, start, fits) in enumerate(run.simulate(items), 1):
        flops = ("; estimated TFLOP/step: " + ", ".join(f"{c} {f / 1e12:.2f}" for c, f in item.flops.items())
                 if item.flops else "")
        state = "" if fits else "  [would be skipped: over the budget]"
        print(f"{number:>2}  {item.name:<24} {seconds:>7.0f} {start:>7.0f}  {item.what}{flops}{state}")
        total += seconds if fits else 0
    for note in notes:
        print(f"    not measured: {note}")
    print("\nEach command alone (the measure items run in one worker process that keeps a model build across "
          "consecutive items):")
    for item in items:
        print(f"  {item.name}: {item.command}")
    print(f"\nClosing note: no GPU figure of this project has been measured yet. The GPU run will measure, per "
          f"architecture item: steps/s and torch.cuda.max_memory_allocated of lora, cat-lean and cat-batched, "
          f"--cat_every 2 and 4 derived from lora and cat-lean, the ratios to LoRA and the peak against 24 GiB; "
          f"and run the any_device tests on cuda. Estimated time of what fits: {total:.0f} s of {args.budget_s:.0f} s "
          f"(estimates, see above).")


def main(argv=None) -> int:
    started = time.monotonic()
    args = build_parser().parse_args(argv)
    if args._worker:
        worker_main()
        return 0
    check_args(args)
    for key, value in offline_env().items():  # nothing downloads, in this process or in those it starts
        os.environ.setdefault(key, value)
    machine = describe_machine()
    print(f"gpu_check: {machine_line(machine)}", flush=True)
    import cat_step_cost

    cat_step_cost.quiet_logging()
    if not (args.smoke or args.dry_run) and not machine["device"].startswith("cuda"):
        fail("no CUDA device visible to torch: run with --smoke on a CPU, or --dry_run to see the GPU plan")
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    out = Path(args.out) if args.out else None
    created = out is not None and not out.exists()
    run = Run(args, assumed_rates(args), out, started)
    try:
        items, notes = make_plan(args, scratch)
        if args.only:
            wanted = [name.strip() for name in args.only.split(",") if name.strip()]
            unknown = [name for name in wanted if name not in {item.name for item in items}]
            if unknown:
                fail(f"--only: no item {', '.join(unknown)} in the plan ({', '.join(i.name for i in items)})")
            items = [item for item in items if item.name in wanted]
        if args.dry_run:
            print_plan(run, items, notes, args)
            return 0
        try:
            (out / "logs").mkdir(parents=True, exist_ok=True)
        except OSError as error:
            fail(f"--out {out}: cannot create it ({error.strerror})")
        estimates = dict((item.name, seconds) for item, seconds, _, _ in run.simulate(items))
        report = {"version": 1, "mode": "smoke" if args.smoke else "gpu", "command": " ".join(
                      ["bash benchmarks/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])]),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "budget_s": args.budget_s, "machine": machine,
                  "assumptions": {**run.assumed, "basis": estimate_basis(run.assumed, args.smoke)}, "notes": notes,
                  "plan": [{**asdict(item), "command": item.command, "estimate_s": estimates[item.name]}
                           for item in items], "items": {}, "elapsed_s": run.elapsed}

        def save():
            report["elapsed_s"] = run.elapsed
            write_atomically(out / "gpu_check.json", json.dumps(report, indent=1, default=str))
            write_atomically(out / "gpu_check.md", format_markdown(report))

        save()
        print(f"gpu_check: {len(items)} items, budget {args.budget_s:.0f} s, writing to {out}/", flush=True)
        for item in items:
            remaining = args.budget_s - run.elapsed
            if item.build_key in run.failed_builds:
                failed = run.failed_builds[item.build_key]
                record = {"status": "skipped", "message": f"its model build failed in {failed}"}
            elif (seconds := run.estimate(item)) > remaining:
                record = {"status": "skipped", "estimate_s": seconds,
                          "message": f"estimated {seconds:.0f} s, {max(remaining, 0):.0f} s of the budget left"}
            elif not enough_disk(item, run, scratch):
                record = {"status": "skipped", "message": f"needs {item.denoiser_bytes * 1.05 / 1e9:.0f} GB free in "
                          f"{scratch.parent} for the random weights (set TMPDIR to a larger disk)"}
            else:
                print(f"[{run.elapsed:4.0f} s] {item.name}: {item.what} (estimated {seconds:.0f} s)", flush=True)
                record = run.execute(item, scratch)
            report["items"][item.name] = record
            print(f"[{run.elapsed:4.0f} s] {item.name}: {record['status']}"
                  + (f" in {record['seconds']:.0f} s" if "seconds" in record else "")
                  + (f": {record['message']}" if record.get("message") else ""), flush=True)
            if record.get("summary"):
                print(f"         {summary_line(record['summary'])}", flush=True)
            save()
        report["finished"] = True
        save()
        statuses = [record["status"] for record in report["items"].values()]
        print(f"gpu_check: done in {run.elapsed:.0f} s: " + ", ".join(
            f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses)) + f". Results: {out}/gpu_check.md, "
            f"{out}/gpu_check.json", flush=True)
        return 0 if all(status in FINE for status in statuses) else 1
    except BaseException:
        if created and out is not None and not (out / "gpu_check.json").exists():
            shutil.rmtree(out, ignore_errors=True)  # bad input found late: nothing half-written
        raise
    finally:
        run.drop_worker()
        shutil.rmtree(scratch, ignore_errors=True)


def enough_disk(item: Item, run: Run, scratch: Path) -> bool:
    """A quantized real architecture saves its random weights once: is there room in the scratch folder?"""
    if not item.denoiser_bytes or item.model in run.saved or run.args.smoke:
        return True
    return shutil.disk_usage(scratch).free >= item.denoiser_bytes * 1.05


if __name__ == "__main__":
    sys.exit(main())
