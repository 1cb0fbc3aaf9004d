#!/usr/bin/env python
"""What one CAT training step costs next to a plain LoRA step: time, FLOPs and memory, side by side.

Eq. 3 of CAT (arXiv 2404.07554, §2.2) needs per step an adapted U-Net forward on y_T and one on y (both with
gradient) and a frozen forward on y (no gradient). This script runs ``train_cat_lora.training_step`` for

    lora          the plain LoRA objective (cat_alpha 0)
    lora+prior    plain LoRA with DreamBooth prior preservation (the diffusion batch doubles)
    cat-lean      CAT, diffusion term backwarded before the CAT passes (``--cat_mode lean``)
    cat-batched   CAT, both adapted passes in one U-Net call (``--cat_mode batched``)

on the same batch and seeds and reports, per configuration and as a ratio to ``lora``:

- step time: the full optimizer step users pay (VAE encode, text encode, U-Nets, backward, gradient clipping,
  AdamW, zero_grad); median over ``--steps`` rounds after ``--warmup``. The configurations run interleaved,
  round by round with the same seed per round, and the time ratio is the median of the per-round ratios, so
  load from other processes on a shared machine hits all configurations alike.
- FLOPs per step (``torch.utils.flop_counter``, forward and backward).
- bytes saved for backward at their peak, counted exactly with ``torch.autograd.graph.saved_tensors_hooks``
  (storage bytes, deduplicated by storage, frozen weights excluded); on CUDA also ``max_memory_allocated``.
- process peak RSS and the step's RSS increment over the RSS after setup, each configuration in a fresh
  subprocess by default (``--rss subprocess``) so that peaks do not mix.
- how many U-Net passes ran the LoRA branch, and how many LoRA-layer calls happened inside the frozen pass
  (must be 0: with adapters disabled peft skips the low-rank matmuls).

It also prints the U-Net FLOP ratio to LoRA that the FLOP counter measured next to two floors, from counting
U-Net work per step (a LoRA step: one adapted forward and its backward; prior preservation: the same on twice
the batch; CAT: two adapted forwards with their backwards and one frozen forward):

- forward 1, backward 2 (the issue's counting, right when the base weights get gradients): LoRA 3, CAT 7,
  floor 7/3 = 2.33x;
- frozen base, backward 1 (a LoRA backward computes input gradients only, about one forward; the LoRA weight
  gradients are negligible): LoRA 2, CAT 5, floor 5/2 = 2.50x. This is the floor for LoRA training.

Example: ``python benchmarks/cat_step_cost.py --model toy --resolution 32 --steps 20 --output table.md``.
``--model`` is ``tiny`` (the tests' tiny pipeline, built into a temporary folder), ``small`` (the same with a
(64, 128, 128) U-Net), ``toy`` (the committed toy-world base model, examples/toyworld/models/toy-sd: U-Net
(32, 64, 64), trained on 32x32 images, so use ``--resolution 32``), a local diffusers Stable Diffusion folder,
or a hub id. ``--mixed_precision bf16`` runs the frozen base in bfloat16 with float32 LoRA weights under
autocast, as ``train_cat_lora.py --mixed_precision bf16`` does.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOY_MODEL = ROOT / "examples" / "toyworld" / "models" / "toy-sd"

CONFIGS = {
    "lora": {"cat_alpha": 0.0, "cat_mode": "lean", "prior": False},
    "lora+prior": {"cat_alpha": 0.0, "cat_mode": "lean", "prior": True},
    "cat-lean": {"cat_alpha": 1.0, "cat_mode": "lean", "prior": False},
    "cat-batched": {"cat_alpha": 1.0, "cat_mode": "batched", "prior": False},
}
MIB = 1024 * 1024
PHASES = ["VAE encode", "text encode", "U-Net fwd (grad)", "U-Net fwd (frozen)", "backward", "clip + AdamW"]
MODEL_LABELS = {"UNet2DConditionModel": "U-Net", "CLIPTextModel": "text encoder"}

# U-Net work per step, in passes over the instance batch: (adapted passes with gradient, frozen passes).
# Prior preservation runs the adapted U-Net on twice the batch: 2 passes' worth.
UNET_PASSES = {"lora": (1, 0), "lora+prior": (2, 0), "cat-lean": (2, 1), "cat-batched": (2, 1)}
# Cost of a backward in forwards: 2 when the base weights get gradients (the counting), 1 with a frozen
# base (a LoRA backward computes input gradients only).
BACKWARD_UNITS = {"issue": 2, "frozen base": 1}


def unet_units(config: str, backward_units: int) -> int:
    """U-Net work of one step of ``config``, counting a forward as 1 and a backward as ``backward_units``."""
    adapted, frozen = UNET_PASSES[config]
    return adapted * (1 + backward_units) + frozen


def unet_floor_ratio(config: str, backward_units: int) -> float:
    """The U-Net work of ``config`` over a plain LoRA step's: 7/3 for CAT with backward 2, 5/2 with backward 1."""
    return unet_units(config, backward_units) / unet_units("lora", backward_units)


# ---------------------------------------------------------------------------------------------------------
# Exact accounting of the bytes autograd keeps for backward
# ---------------------------------------------------------------------------------------------------------


class _Held:
    """A saved tensor as autograd stores it while the meter is on; its destruction is the 'free'."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor, key, meter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Bytes held for backward, exactly: current and peak.

    Inside ``with SavedTensorMeter() as meter:`` every tensor autograd saves goes through a pack hook that adds
    the bytes of the tensor's storage (once per storage: views and repeated saves of one storage count once)
    and wraps it; when autograd releases it (backward ran, or the graph was dropped) the wrapper dies and the
    bytes are subtracted once the storage's last saved reference is gone. ``peak`` is the maximum of the
    running total. Storages listed in ``exclude`` (e.g. frozen model weights, which exist anyway) are not
    counted. Tensors saved while the meter is off are not seen.
    """

    def __init__(self, exclude=()):
        self.exclude = set(exclude)
        self.live = {}  # storage key -> [saved references, bytes]
        self.current = 0
        self.peak = 0
        self.saves = 0
        self._hooks = None

    @staticmethod
    def storage_key(tensor):
        storage = tensor.untyped_storage()
        return (str(tensor.device), storage.data_ptr()), storage.nbytes()

    def reset_peak(self) -> None:
        self.peak = self.current

    def _pack(self, tensor):
        try:
            key, nbytes = self.storage_key(tensor)
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage: not counted
            return tensor
        if key in self.exclude:
            return tensor
        self.saves += 1
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [1, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1
        # Hold a detached alias (same storage, no grad_fn): a saved *output* held with its grad_fn would form a
        # tensor -> node -> saved tensor cycle through C++ that Python's gc cannot break if no backward runs.
        return _Held(tensor.detach(), key, self)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Held) else packed

    def _release(self, key) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    def __enter__(self):
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._hooks = None


def weight_storage_keys(*models) -> set:
    """Storage keys of every parameter and buffer of ``models`` (to exclude weights from activation bytes)."""
    keys = set()
    for model in models:
        for tensor in list(model.parameters()) + list(model.buffers()):
            keys.add(SavedTensorMeter.storage_key(tensor)[0])
    return keys


# ---------------------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------------------


def build_small_pipeline(out_dir) -> str:
    """The tiny pipeline with a wider U-Net: block_out_channels (64, 128, 128), cross-attention 32."""
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_pipeline import build_tiny_pipeline

    path = Path(build_tiny_pipeline(out_dir))
    import torch

    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    unet.save_pretrained(path / "unet", safe_serialization=True)
    return str(path)


def resolve_model(model: str, scratch: Path) -> str:
    """``tiny``/``small``: build into ``scratch``; ``toy``: the committed toy-world model; otherwise a local
    folder or hub id, returned as is."""
    if model == "toy":
        if not (TOY_MODEL / "model_index.json").is_file():
            raise SystemExit(f"--model toy: {TOY_MODEL} has no model_index.json")
        return str(TOY_MODEL)
    if model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_pipeline import build_tiny_pipeline

        return build_tiny_pipeline(scratch / "tiny-sd")
    if model == "small":
        return build_small_pipeline(scratch / "small-sd")
    return model


def synthetic_image(index: int, size: int, subject: bool):
    """A deterministic RGB picture: a red 'teapot' for the subject, grey boxes for the class."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    s, shift = size / 48, index % 5
    if subject:
        draw.ellipse([(6 + shift) * s, 10 * s, (36 + shift) * s, 40 * s], fill=(200, 30, 30))
        draw.rectangle([(16 + shift) * s, 20 * s, (24 + shift) * s, 28 * s], fill="white")
    else:
        draw.rectangle([(8 + shift) * s, 8 * s, (38 + shift) * s, 38 * s], fill=(90 + 20 * shift, 90, 90))
    return image


def make_batches(tokenizer, resolution: int, batch_size: int) -> dict:
    """One instance batch and the same with class rows (prior preservation), through the script's data path."""
    import train_cat_lora as T

    instance = [T.Example(synthetic_image(i, resolution, True), "a photo of sks teapot", "a photo of teapot",
                          f"instance-{i}") for i in range(batch_size)]
    classes = [T.Example(synthetic_image(i, resolution, False), "a photo of teapot", "a photo of teapot",
                         f"class-{i}") for i in range(batch_size)]
    plain = T.make_dataset(instance, [], tokenizer, resolution, True, False, 0)
    prior = T.make_dataset(instance, classes, tokenizer, resolution, True, False, 0)
    return {False: T.collate_examples([plain[i] for i in range(batch_size)]),
            True: T.collate_examples([prior[i] for i in range(batch_size)])}


class Bench:
    """Models with LoRA adapters, the two batches, and one AdamW per configuration."""

    def __init__(self, model_path: str, args):
        import torch
        from argparse import Namespace

        import train_cat_lora as T

        self.args, self.T, self.device = args, T, torch.device(args.device)
        load = Namespace(pretrained_model_name_or_path=model_path, revision=args.revision, variant=args.variant)
        tokenizer, self.scheduler, self.text_encoder, self.vae, self.unet = T.load_models(load)
        # As train_cat_lora.py: the frozen base in the mixed-precision dtype, the LoRA weights in float32.
        self.weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16}[args.mixed_precision]
        for model in (self.unet, self.vae, self.text_encoder):
            if self.weight_dtype == torch.float32:
                model.to(self.device)  # (a dtype argument would make diffusers warn about float32 modules)
            else:
                model.to(self.device, dtype=self.weight_dtype)
        torch.manual_seed(0)
        T.add_lora_adapters(self.unet, self.text_encoder, args.rank, float(args.rank), args.train_text_encoder)
        if self.weight_dtype != torch.float32:
            from diffusers.training_utils import cast_training_params

            cast_training_params([self.unet, self.text_encoder], dtype=torch.float32)
        if args.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if args.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
        self.unet.train()
        if args.train_text_encoder:
            self.text_encoder.train()
        self.trainable = [p for m in (self.unet, self.text_encoder) for p in m.parameters() if p.requires_grad]
        # Give the adapters non-zero up-projections, as after some training (at step 0 they are zero).
        with torch.no_grad():
            for p in self.trainable:
                p.normal_(0, 0.02)
        self.batches = make_batches(tokenizer, args.resolution, args.batch_size)
        self.optimizers = {}
        self.lora_layers = [m for name, m in self.unet.named_modules()
                            if name.endswith("lora_A.default") or name.endswith("lora_B.default")]

    def optimizer(self, config: str):
        import torch

        if config not in self.optimizers:
            self.optimizers[config] = torch.optim.AdamW(self.trainable, lr=1e-4, weight_decay=1e-2)
        return self.optimizers[config]

    def step(self, config: str, seed: int, backward=None, on_optimizer=None) -> dict:
        """One full optimizer step of ``config`` with the global seed ``seed``."""
        import torch

        spec = CONFIGS[config]
        torch.manual_seed(seed)
        # bf16: autocast around the step, as accelerate does around the prepared models' forward.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.weight_dtype == torch.bfloat16):
            losses = self.T.training_step(
                self.batches[spec["prior"]], self.unet, self.text_encoder, self.vae, self.scheduler,
                cat_alpha=spec["cat_alpha"], cat_mode=spec["cat_mode"],
                prior_loss_weight=1.0 if spec["prior"] else 0.0, snr_gamma=None, noise_offset=0.0,
                weight_dtype=self.weight_dtype, backward=backward or (lambda loss: loss.backward()))
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        optimizer = self.optimizer(config)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_optimizer is not None:
            self.synchronize()
            on_optimizer(time.perf_counter() - start)
        return losses

    def phase_times(self, config: str, seed: int) -> dict:
        """Wall time of one step split by phase: VAE encode, text encode, U-Net forward with and without
        gradient, backward, clip + AdamW, and the rest (loss arithmetic, noise, Python glue)."""
        import torch

        spent = dict.fromkeys(PHASES, 0.0)
        started = {}

        def phase_of(module):
            if module is self.unet:
                return "U-Net fwd (grad)" if torch.is_grad_enabled() else "U-Net fwd (frozen)"
            return "text encode" if module is self.text_encoder else "VAE encode"

        def pre(module, *_):
            self.synchronize()
            started[id(module)] = time.perf_counter()

        def post(module, *_):
            self.synchronize()
            spent[phase_of(module)] += time.perf_counter() - started.pop(id(module))

        def backward(loss):
            self.synchronize()
            start = time.perf_counter()
            loss.backward()
            self.synchronize()
            spent["backward"] += time.perf_counter() - start

        def on_optimizer(elapsed):
            spent["clip + AdamW"] += elapsed

        modules = [self.unet, self.text_encoder] + [m for m in (getattr(self.vae, "encoder", None),
                                                                getattr(self.vae, "quant_conv", None)) if m is not None]
        hooks = [h for m in modules for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
        try:
            self.synchronize()
            start = time.perf_counter()
            self.step(config, seed, backward=backward, on_optimizer=on_optimizer)
            self.synchronize()
            total = time.perf_counter() - start
        finally:
            for hook in hooks:
                hook.remove()
        spent["other"] = total - sum(spent.values())
        spent["total"] = total
        return spent

    def synchronize(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed_step(self, config: str, seed: int) -> float:
        self.synchronize()
        start = time.perf_counter()
        self.step(config, seed)
        self.synchronize()
        return time.perf_counter() - start

    def measure_counts(self, config: str, seed: int) -> dict:
        """Saved-for-backward peak, FLOPs and LoRA-branch calls of one step (untimed)."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        T = self.T
        calls = {"all": 0, "frozen": 0}
        in_frozen = [False]

        def count(*_):
            calls["all"] += 1
            calls["frozen"] += in_frozen[0]

        original_frozen = T.frozen_prediction

        def frozen_prediction(*a, **k):
            in_frozen[0] = True
            try:
                return original_frozen(*a, **k)
            finally:
                in_frozen[0] = False

        hooks = [m.register_forward_hook(count) for m in self.lora_layers]
        T.frozen_prediction = frozen_prediction
        try:
            flops = FlopCounterMode(display=False)
            with flops:
                self.step(config, seed)
            meter = SavedTensorMeter(exclude=weight_storage_keys(self.unet, self.text_encoder, self.vae))
            cuda = self.device.type == "cuda"
            if cuda:
                self.synchronize()
                torch.cuda.reset_peak_memory_stats()
                cuda_base = torch.cuda.memory_allocated()
            calls_before = dict(calls)
            with meter:
                self.step(config, seed)
            by_model = {}
            for name, counts in flops.get_flop_counts().items():
                if name != "Global" and "." not in name:  # top-level modules: the three models and the VAE's parts
                    label = MODEL_LABELS.get(name, "VAE encode")
                    by_model[label] = by_model.get(label, 0) + sum(counts.values())
            result = {"flops": flops.get_total_flops(), "flops_by_model": by_model, "saved_peak": meter.peak, "saved_left": meter.current,
                      "lora_passes": (calls["all"] - calls_before["all"]) / max(1, len(self.lora_layers)),
                      "lora_calls_in_frozen": calls["frozen"]}
            if cuda:
                self.synchronize()
                result["cuda_peak"] = torch.cuda.max_memory_allocated() - cuda_base
            return result
        finally:
            T.frozen_prediction = original_frozen
            for hook in hooks:
                hook.remove()


# ---------------------------------------------------------------------------------------------------------
# Resident memory
# ---------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_of_steps(bench: Bench, config: str, steps: int, seed: int) -> dict:
    """Peak RSS of this process over ``steps`` steps of ``config``, and its rise over the RSS before them."""
    import gc

    gc.collect()
    base = _status_kib("VmRSS")
    fresh_mark = reset_peak_rss()
    for i in range(steps):
        bench.step(config, seed + i)
    peak = _status_kib("VmHWM") if fresh_mark else None
    if peak is None:  # getrusage: the peak of the whole process so far (KiB on Linux)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rss_peak": peak * 1024, "rss_step": (peak - base) * 1024 if base is not None else None,
            "rss_exact": fresh_mark}


def rss_in_subprocess(args, model_path: str, config: str, steps: int) -> dict:
    """Run :func:`rss_of_steps` for ``config`` in a fresh Python so that no other configuration's peak mixes in."""
    command = [sys.executable, str(Path(__file__).resolve()), "--model", model_path, "--_rss_worker", config,
               "--_rss_steps", str(steps), *worker_flags(args)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"RSS worker for {config} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker_flags(args) -> list[str]:
    flags = ["--device", args.device, "--resolution", str(args.resolution), "--batch_size", str(args.batch_size),
             "--rank", str(args.rank), "--mixed_precision", args.mixed_precision]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    for name in ("revision", "variant"):
        if getattr(args, name):
            flags += [f"--{name}", getattr(args, name)]
    if args.gradient_checkpointing:
        flags.append("--gradient_checkpointing")
    if args.train_text_encoder:
        flags.append("--train_text_encoder")
    return flags


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratio(value, reference) -> str:
    if value is None or not reference:
        return "n/a"
    return f"{value / reference:.2f}x"


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def format_table(results: dict, meta: dict) -> str:
    """The markdown report: a header of run facts, then one row per configuration."""
    base = results["lora"]
    lines = [
        f"## CAT step cost: {meta['model']}",
        "",
        f"- Machine: {meta['cpu']} ({meta['cores']} logical CPUs), torch {meta['torch']}, "
        f"{meta['threads']} torch threads, device {meta['device']}",
        f"- Resolution {meta['resolution']}, batch {meta['batch_size']} instance images, LoRA rank {meta['rank']}, "
        f"gradient checkpointing {meta['gradient_checkpointing']}, text-encoder LoRA {meta['train_text_encoder']}, "
        f"mixed precision {meta['mixed_precision']}",
        f"- Time: full optimizer step (VAE encode, text encode, U-Net passes, backward, grad clip, AdamW), "
        f"median of {meta['steps']} interleaved rounds after {meta['warmup']} warm-up rounds, same seed per round; "
        f"'x LoRA' is the median of per-round ratios",
        f"- U-Net floors, CAT / LoRA: {unet_floor_ratio('cat-lean', BACKWARD_UNITS['issue']):.2f}x counting a "
        f"forward 1 and a backward 2 (issue 5: LoRA {unet_units('lora', 2)}, CAT {unet_units('cat-lean', 2)}); "
        f"{unet_floor_ratio('cat-lean', BACKWARD_UNITS['frozen base']):.2f}x with the base frozen, where a LoRA "
        f"backward computes input gradients only, about 1 forward (LoRA {unet_units('lora', 1)}, "
        f"CAT {unet_units('cat-lean', 1)}). The FLOP table below gives the measured U-Net ratio",
        f"- Saved for backward: exact bytes of tensors autograd holds (saved_tensors_hooks, frozen weights "
        f"excluded), peak within the step; RSS: {meta['rss_method']}",
        "",
        "| config | step ms (median) | x LoRA | time IQR ms | GFLOP/step | x LoRA | saved for backward MiB | x LoRA "
        "| peak RSS MiB | x LoRA | step RSS rise MiB | x LoRA | U-Net passes with LoRA branch "
        "| LoRA calls in frozen pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if "cuda_peak" in base:
        lines[-2] = lines[-2][:-1] + " CUDA peak MiB | x LoRA |"
        lines[-1] += "---|---|"
    for name, r in results.items():
        row = [name, f"{r['time_ms']:.1f}", f"{r['time_ratio']:.2f}x", f"{r['time_q1_ms']:.1f}-{r['time_q3_ms']:.1f}",
               f"{r['flops'] / 1e9:.3f}", _ratio(r["flops"], base["flops"]), _mib(r["saved_peak"]),
               _ratio(r["saved_peak"], base["saved_peak"]), _mib(r.get("rss_peak")),
               _ratio(r.get("rss_peak"), base.get("rss_peak")), _mib(r.get("rss_step")),
               _ratio(r.get("rss_step"), base.get("rss_step")), f"{r['lora_passes']:g}",
               str(r["lora_calls_in_frozen"]) if CONFIGS[name]["cat_alpha"] else "-"]
        if "cuda_peak" in r:
            row += [_mib(r["cuda_peak"]), _ratio(r["cuda_peak"], base["cuda_peak"])]
        lines.append("| " + " | ".join(row) + " |")
    models = sorted({m for r in results.values() for m in r.get("flops_by_model", {})})
    if models:
        floors = ["U-Net x LoRA, measured", "floor: fwd 1, bwd 2", "floor: frozen base, bwd 1"]
        lines += ["", "GFLOP per step by model (forward and backward), the U-Net FLOP ratio to LoRA measured by the "
                  "FLOP counter, and the two floors of that ratio:", "",
                  "| config | " + " | ".join(models + floors) + " |", "|---|" + "---|" * (len(models) + len(floors))]
        for name, r in results.items():
            cells = [f"{r['flops_by_model'].get(m, 0) / 1e9:.3f}" for m in models]
            cells += [_ratio(r["flops_by_model"].get("U-Net"), base["flops_by_model"].get("U-Net")),
                      f"{unet_floor_ratio(name, BACKWARD_UNITS['issue']):.2f}x",
                      f"{unet_floor_ratio(name, BACKWARD_UNITS['frozen base']):.2f}x"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "phases_ms" in base:
        columns = PHASES + ["other", "total"]
        lines += ["", f"Where the time goes: ms per step by phase (median over {meta['phase_steps']} separate "
                  "instrumented steps per configuration, so totals differ from the table above):", "",
                  "| config | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for name, r in results.items():
            lines.append(f"| {name} | " + " | ".join(f"{r['phases_ms'][c]:.1f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="tiny",
                        help="'tiny', 'small' (tiny with a (64,128,128) U-Net), 'toy' (the committed "
                             "examples/toyworld/models/toy-sd, 32x32 images: use --resolution 32), a local diffusers "
                             "SD folder, or a hub id")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--variant", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=4, help="Instance images per step (prior adds as many).")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="Timed rounds (each runs every configuration once).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed rounds first.")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--mixed_precision", choices=["no", "bf16"], default="no",
                        help="bf16: frozen base in bfloat16, LoRA weights float32, step under autocast.")
    parser.add_argument("--train_text_encoder", action="store_true", help="Also put a LoRA on the text encoder.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="Comma-separated subset of " + ", ".join(CONFIGS) + " (lora is always included).")
    parser.add_argument("--rss", choices=["subprocess", "inprocess", "off"], default="subprocess",
                        help="Measure peak RSS per configuration in a fresh subprocess, in this process, or not.")
    parser.add_argument("--phase_steps", type=int, default=5,
                        help="Instrumented steps per configuration for the time-by-phase table (0: skip it).")
    parser.add_argument("--output", default=None, help="Also write the markdown table to this file.")
    parser.add_argument("--_rss_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_rss_steps", type=int, default=3, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> dict:
    """Run the benchmark; print (and with --output, save) the table; return the per-configuration results."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    configs = ["lora"] + [c for c in args.configs.split(",") if c and c != "lora"]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")

    if args._rss_worker:  # child process of --rss subprocess
        bench = Bench(args.model, args)
        print(json.dumps(rss_of_steps(bench, args._rss_worker, args._rss_steps, seed=1000)))
        return {}

    with tempfile.TemporaryDirectory(prefix="cat-step-cost-") as scratch:
        model_path = resolve_model(args.model, Path(scratch))
        bench = Bench(model_path, args)
        results = {name: {} for name in configs}
        for name in configs:
            results[name].update(bench.measure_counts(name, seed=1000))
        times = {name: [] for name in configs}
        for round_number in range(args.warmup + args.steps):
            # Rotate the order each round so no configuration always runs first (cache, allocator, load).
            shift = round_number % len(configs)
            for name in configs[shift:] + configs[:shift]:
                elapsed = bench.timed_step(name, seed=2000 + round_number)
                if round_number >= args.warmup:
                    times[name].append(elapsed)
        for name in configs:
            ratios = [t / b for t, b in zip(times[name], times["lora"])]
            q = statistics.quantiles(times[name], n=4) if len(times[name]) > 1 else times[name] * 3
            results[name].update(time_ms=statistics.median(times[name]) * 1e3, time_ratio=statistics.median(ratios),
                                 time_q1_ms=q[0] * 1e3, time_q3_ms=q[-1] * 1e3, times_ms=[t * 1e3 for t in times[name]])
        if args.phase_steps > 0:
            runs = {name: [] for name in configs}
            for round_number in range(args.phase_steps):
                for name in configs:
                    runs[name].append(bench.phase_times(name, seed=4000 + round_number))
            for name in configs:
                results[name]["phases_ms"] = {key: statistics.median(run[key] for run in runs[name]) * 1e3
                                              for key in runs[name][0]}
        rss_steps = max(2, min(args.steps, 3))
        if args.rss == "inprocess":
            for name in configs:
                results[name].update(rss_of_steps(bench, name, rss_steps, seed=3000))
        elif args.rss == "subprocess":
            del bench
            for name in configs:
                results[name].update(rss_in_subprocess(args, model_path, name, rss_steps))
        rss_method = {
            "subprocess": f"each configuration in a fresh process, {rss_steps} steps; rise = peak (VmHWM) - RSS "
                          "after loading the models",
            "inprocess": f"in this process, peak mark (VmHWM) reset before each configuration's {rss_steps} steps; "
                         "rise = peak - RSS before them",
            "off": "not measured",
        }[args.rss]
    meta = {"model": args.model, "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": args.device, "resolution": args.resolution,
            "batch_size": args.batch_size, "rank": args.rank, "gradient_checkpointing": args.gradient_checkpointing,
            "mixed_precision": args.mixed_precision,
            "train_text_encoder": args.train_text_encoder, "steps": args.steps, "warmup": args.warmup,
            "phase_steps": args.phase_steps,
            "rss_method": rss_method}
    table = format_table(results, meta)
    print(table)
    if args.output:
        Path(args.output).write_text(table, encoding="utf-8")
    return {"results": results, "meta": meta, "table": table}


if __name__ == "__main__":
    main()
