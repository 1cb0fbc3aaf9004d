#!/usr/bin/env python
"""The real architectures' parameters, and what a CAT step costs next to a LoRA step, counted on the meta device.

For every real architecture of ``cat_step_cost.MODELS`` (built from its published configs: SD 1.5, SDXL, Flux.1-dev,
SD3.5 medium and large, Qwen-Image, Z-Image, FLUX.2 [klein] 4B and FLUX.2 [dev]), this builds the models on torch's
meta device (shapes and dtypes only: no memory, no initialisation, nothing downloaded) and runs the training script's
own step on them (``cat_step_cost.Bench`` -> ``train_cat_lora.training_step``: VAE encode, text encode, the denoiser
passes, backward) for lora, cat-lean and cat-batched, one image at the family's usual resolution, under torch's FLOP
counter and cat_step_cost's exact saved-tensor meter. It prints (with --output, also writes) two Markdown tables: the
parameters of every component, and per model the FLOPs of a step, the bytes saved for backward at their peak and
their ratios to LoRA. Nothing is timed: the meta device runs no kernel. A model takes 10-30 s on a CPU and about
1.3 GB of memory, whatever its size (FLUX.2 [dev]: 56 B parameters).

    python benchmarks/meta_cost.py --output meta.md                   # every real architecture
    python benchmarks/meta_cost.py --models qwen-image,z-image        # some of them
    python benchmarks/meta_cost.py --models sdxl --resolution 512     # another resolution

A meta tensor has no values, so three things of a step are given them here (``meta_execution``):

- ``ShadowValues``: token ids, attention masks, positions and the other small tensors whose values the code reads
  (``.item()``, ``.tolist()``, boolean indexing, ``nonzero``: the language-model text encoders' masks, Qwen-Image's
  and Z-Image's prompt trimming) are computed a second time on the CPU, next to their meta form. Values that depend on
  the (absent) weights stay unknown: what the code does with them does not depend on their values.
- ``GpuAttention``: ``scaled_dot_product_attention`` on the meta device would take PyTorch's math path, which keeps
  the attention matrix for backward (gigabytes per layer at 1024 px); a GPU runs flash attention (or, with a mask,
  memory-efficient attention), which keeps the output and the log-sum-exp. The meta step calls those kernels' meta
  forms, so FLOPs and saved bytes are a GPU's.
- ``MetaLatentVAE``: the family draws noise, timesteps and the latent sample from per-row generators, which the meta
  device lacks. The VAE encoder runs on the meta device (its FLOPs count), and the posterior it hands the family is
  zeros of its shape on the CPU; the noisy latents then move to the meta device.

What is not a GPU's: float32 throughout (bf16 halves the bytes, not their ratios; mixed precision needs autocast,
which the meta device lacks), and the tokenizers are the tests' small offline ones (the prompts' token counts differ
from the real tokenizers' by a few tokens; the language-model families pad to --max_sequence_length anyway).
The tiny pipelines give the same saved bytes (to a few bytes: the attention kernels' seeds) and the same LoRA calls
on the meta device as on the CPU (tests/test_cat_step_cost.py checks it); their FLOPs differ by the attention, which
torch's FLOP counter counts for the GPU kernels but not for the CPU's flash attention.
"""

import argparse
import copy
import gc
import os
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

META = torch.device("meta")
ATEN = torch.ops.aten
CONFIGS = ("lora", "cat-lean", "cat-batched")
MIB, GIB = 2**20, 2**30


# ---------------------------------------------------------------------------------------------------------
# Running a training step on the meta device
# ---------------------------------------------------------------------------------------------------------


class ShadowValues(TorchDispatchMode):
    """Meta tensors with known values: every operation whose tensor inputs all have known values (CPU tensors, or
    meta tensors with a CPU copy) runs on the CPU copies too, and its meta results keep the CPU results as their
    copies (up to ``limit`` elements: token ids, masks, positions, timesteps, not activations). ``.item()``,
    ``.tolist()``, ``nonzero`` and boolean-mask indexing of such tensors then work as on a CPU. A meta tensor
    written from unknown values (e.g. a scatter of the denoiser's output) loses its copy, and so do its views."""

    def __init__(self, limit: int = 1 << 22):
        super().__init__()
        self.limit = limit
        self.copies = WeakIdKeyDictionary()  # meta tensor -> its values on the CPU
        self.stale = set()  # storages written from unknown values since their copies were taken
        self.counts = {"with values": 0, "meta only": 0}

    @staticmethod
    def storage(tensor) -> int:
        return tensor.untyped_storage()._cdata

    def known(self, value) -> bool:
        if not isinstance(value, torch.Tensor) or value.device.type != "meta":
            return True
        return value in self.copies and self.storage(value) not in self.stale

    def cpu(self, value):
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            return self.copies[value]
        if isinstance(value, torch.device) and value.type == "meta":
            return torch.device("cpu")
        return value

    def remember(self, meta, real) -> None:
        if isinstance(meta, torch.Tensor) and meta.device.type == "meta" and isinstance(real, torch.Tensor) \
                and real.numel() <= self.limit:
            self.copies[meta] = real
            self.stale.discard(self.storage(meta))

    def forget_written(self, func, args, kwargs) -> None:
        """Drop the copies of the tensors ``func`` writes (and, through their storages, of their views)."""
        if not func._schema.is_mutable:
            return
        for number, argument in enumerate(func._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = args[number] if number < len(args) else kwargs.get(argument.name)
            for tensor in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(tensor, torch.Tensor) and tensor.device.type == "meta":
                    self.copies.pop(tensor, None)
                    self.stale.add(self.storage(tensor))

    def mask_positions(self, index) -> list:
        """A boolean index with known values -> its positions, one index tensor per dimension it covers."""
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool and index.device.type == "meta" \
                and self.known(index):
            return [position.to(META) for position in self.copies[index].nonzero(as_tuple=True)]
        return [index]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
        to_meta = kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "meta"
        if not to_meta and not any(tensor.device.type == "meta" for tensor in tensors):
            return func(*args, **kwargs)
        if not all(self.known(tensor) for tensor in tensors):
            self.counts["meta only"] += 1
            if func is ATEN.index.Tensor:  # e.g. hidden_states[attention_mask.bool()]
                args = (args[0], [position for index in args[1] for position in self.mask_positions(index)])
            result = func(*args, **kwargs)
            self.forget_written(func, args, kwargs)
            return result
        self.counts["with values"] += 1
        cpu_args, cpu_kwargs = tree_map(self.cpu, args), tree_map(self.cpu, kwargs)
        leaves_meta = kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "meta"
        if func is ATEN._local_scalar_dense.default or (func is ATEN._to_copy.default and leaves_meta):
            return func(*cpu_args, **cpu_kwargs)  # .item(), .tolist(), .cpu(): the values themselves
        try:
            result = func(*args, **kwargs)
        except (RuntimeError, NotImplementedError):  # an output shape that depends on values (nonzero, ...)
            result = None
        if result is not None:
            outputs = [value for value in tree_flatten(result)[0] if isinstance(value, torch.Tensor)]
            if sum(output.numel() for output in outputs) > self.limit:
                return result  # large: no copy (its values are not needed)
        real = func(*cpu_args, **cpu_kwargs)
        if result is None:
            result = tree_map(lambda value: torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                                                device=META)
                              if isinstance(value, torch.Tensor) else value, real)
        for meta, cpu in zip(tree_flatten(result)[0], tree_flatten(real)[0]):
            self.remember(meta, cpu)
        return result


class GpuAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` on meta tensors as a GPU runs it: flash attention, or memory-efficient
    attention with a mask (as an additive bias), grouped-query heads repeated. Their meta kernels keep for backward
    what the GPU's keep (query, key, value, output, log-sum-exp, the bias), and torch's FLOP counter counts them;
    the math path the meta device would otherwise take keeps the whole attention matrix."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query = args[0] if args else kwargs["query"]
            if query.device.type == "meta" and query.ndim == 4:
                return self.attention(*args, **kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if key.shape[-3] != query.shape[-3]:  # grouped-query attention: each key/value head serves several queries
            repeats = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeats, -3), value.repeat_interleave(repeats, -3)
        if attn_mask is None:
            return ATEN._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                             scale=scale)[0]
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attn_mask, float("-inf"))
        bias = attn_mask.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return ATEN._scaled_dot_product_efficient_attention(query, key, value, bias, needs_grad, dropout_p,
                                                            is_causal, scale=scale)[0]


@contextmanager
def meta_execution():
    """The modes under which a training step runs on meta tensors (see the module docstring)."""
    with ExitStack() as stack:
        shadow = stack.enter_context(ShadowValues())
        stack.enter_context(GpuAttention())
        yield shadow


class MetaLatentVAE:
    """The VAE as the family's ``noisy_latents`` sees it on the meta device: the real (meta) VAE encodes, for its
    FLOPs; the posterior it returns is zeros of the real one's shape on the CPU, where the family's generators draw
    the latent sample, the noise and the timesteps. Module attributes (FLUX.2's latent batch norm) come as CPU
    copies with default statistics; the config is the VAE's."""

    def __init__(self, vae):
        self.vae, self.config = vae, vae.config
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def encode(self, pixels, *args, **kwargs):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = self.vae.encode(pixels.to(META, self.vae.dtype), *args, **kwargs).latent_dist
        return SimpleNamespace(latent_dist=DiagonalGaussianDistribution(torch.zeros(posterior.parameters.shape)))

    def __getattr__(self, name):
        value = getattr(self.vae, name)
        if isinstance(value, torch.nn.Module):
            module = copy.deepcopy(value).to_empty(device="cpu")
            for submodule in module.modules():
                if hasattr(submodule, "reset_parameters"):
                    submodule.reset_parameters()
            return module
        return value


def meta_noisy_latents(family, batch, vae, noise_scheduler, weight_dtype) -> dict:
    """The family's own ``noisy_latents`` with a meta VAE (see ``MetaLatentVAE``), moved to the meta device."""
    z = type(family).noisy_latents(family, batch, MetaLatentVAE(vae), noise_scheduler, weight_dtype)
    return {name: value.to(META) if isinstance(value, torch.Tensor) else value for name, value in z.items()}


def on_meta(family) -> None:
    """Make the training step's ``family.noisy_latents`` calls ``meta_noisy_latents`` (``family`` is built)."""
    family.noisy_latents = partial(meta_noisy_latents, family)


# ---------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------


def usual_resolution(name: str, path: str) -> int:
    """The resolution a family trains at: the largest of cat_step_cost.RESOLUTIONS (gpu_check's) for the model, else
    its VAE's native size."""
    import cat_step_cost as B

    return max(B.RESOLUTIONS.get(name, (B.native_resolution(path),)))


def measure_model(name: str, scratch: Path, configs=CONFIGS, resolution: int | None = None, rank: int | None = None,
                  max_sequence_length: int | None = None, gradient_checkpointing: bool = False) -> dict:
    """Build ``name`` (a ``cat_step_cost.MODELS`` choice or a pipeline folder of configs) on the meta device and
    count one step of each configuration: {"family", "resolution", "parameters" (by component), "trainable",
    "results" ({config: cat_step_cost's measure_counts})}."""
    import cat_step_cost as B
    import train_cat_lora as T

    path, random_weights = B.resolve_model(name, scratch)
    resolution = resolution or usual_resolution(name, path)
    script = T.build_parser()
    args = B.build_parser().parse_args(["--model", path, "--device", "meta", "--resolution", str(resolution),
                                        "--batch_size", "1", "--rank", str(rank or script.get_default("rank"))])
    args.max_sequence_length = max_sequence_length  # None: the family's default, as train_cat_lora.py's
    args.gradient_checkpointing = gradient_checkpointing
    torch.manual_seed(0)
    with meta_execution():
        bench = B.make_bench(path, args, random_weights)
        on_meta(bench.family)
        results = {config: bench.measure_counts(config, seed=1000) for config in dict.fromkeys(["lora", *configs])}
    report = {"model": name, "family": type(bench.family).__name__.removeprefix("RandomWeights"),
              "denoiser": bench.family.denoiser, "resolution": resolution,
              "max_sequence_length": bench.family.config.max_sequence_length,
              "parameters": B.base_parameter_counts(bench.models),
              "classes": {component: type(model).__name__ for component, model in bench.models.items()
                          if isinstance(model, torch.nn.Module)},
              "trainable": sum(p.numel() for p in bench.trainable), "rank": args.rank, "results": results}
    del bench
    gc.collect()
    return report


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def _ratio(value, base) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def format_tables(reports: list[dict], configs=CONFIGS) -> str:
    import cat_step_cost as B

    others = [config for config in configs if config != "lora"]
    lines = ["Parameters of the frozen base, counted on the meta device (the models built from their published "
             "configs; buffers such as SD3's positional embedding table are not parameters):", "",
             "| model | family | component | class | parameters |", "|---|---|---|---|---:|"]
    for report in reports:
        first = True
        order = [report["denoiser"], *[c for c in report["parameters"] if c not in (report["denoiser"], "vae")], "vae"]
        for component in order:
            lines.append(f"| {report['model'] if first else ''} | {report['family'] if first else ''} | {component} | "
                         f"{report['classes'][component]} | {report['parameters'][component]:,} |")
            first = False
        lines.append(f"| | | total | | {sum(report['parameters'].values()):,} |")
    floor_lean = B.denoiser_floor_ratio("cat-lean", B.BACKWARD_UNITS["frozen base"])
    floor_issue = B.denoiser_floor_ratio("cat-lean", B.BACKWARD_UNITS["issue"])
    lines += ["", f"One training step on the meta device (float32, batch 1, one image, torch's FLOP counter, forward "
              f"and backward; bytes saved for backward at their peak, exact, frozen weights excluded). Floors of the "
              f"denoiser FLOP ratio: {floor_issue:.2f}x counting a backward as 2 forwards, {floor_lean:.2f}x as 1 "
              "(frozen base); attention, whose backward costs about 2 forwards even with a frozen base, pulls the "
              "measured ratio from the second towards the first:", ""]
    header = ["model", "px", "text tokens", "trainable (LoRA)", "denoiser TFLOP/step, LoRA"]
    header += [f"denoiser FLOPs {config} x LoRA" for config in others]
    header += [f"all FLOPs {config} x LoRA" for config in others]
    header += ["saved for backward, LoRA"] + [f"saved {config} x LoRA" for config in others]
    header += ["LoRA calls in the frozen pass"]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for report in reports:
        results = report["results"]
        lora = results["lora"]
        row = [report["model"], str(report["resolution"]), str(report["max_sequence_length"] or 77),
               f"{report['trainable'] / 1e6:.1f} M (rank {report['rank']})",
               f"{lora['flops_by_model'].get('denoiser', 0) / 1e12:.1f}"]
        row += [_ratio(results[c]["flops_by_model"].get("denoiser", 0), lora["flops_by_model"].get("denoiser", 0))
                for c in others]
        row += [_ratio(results[c]["flops"], lora["flops"]) for c in others]
        row += [f"{lora['saved_peak'] / GIB:.2f} GiB"] + [_ratio(results[c]["saved_peak"], lora["saved_peak"])
                                                          for c in others]
        row += [", ".join(str(results[c]["lora_calls_in_frozen"]) for c in others)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default=None,
                        help="Comma-separated cat_step_cost.MODELS choices (default: every real architecture).")
    parser.add_argument("--configs", default=",".join(CONFIGS[1:]),
                        help="Configurations besides lora (always counted): any of cat_step_cost.CONFIGS.")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Image size for every model (default: each family's usual one, see usual_resolution).")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: train_cat_lora.py's).")
    parser.add_argument("--max_sequence_length", type=int, default=None,
                        help="Prompt tokens of the long text encoder (default: each family's, as train_cat_lora.py).")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--output", default=None, help="Also write the Markdown tables to this file.")
    return parser


def main(argv=None) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import cat_step_cost as B

    B.quiet_logging()
    args = build_parser().parse_args(argv)
    real = [name for name, choice in B.MODELS.items() if choice.random_weights]
    models = args.models.split(",") if args.models else real
    unknown = [name for name in models if name not in B.MODELS]
    configs = [config for config in args.configs.split(",") if config and config != "lora"]
    if unknown:
        B.fail(f"--models: unknown {', '.join(unknown)} (real architectures: {', '.join(real)})")
    if [config for config in configs if config not in B.CONFIGS]:
        B.fail(f"--configs: choose from {', '.join(B.CONFIGS)}")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        B.fail(f"--resolution {args.resolution}: a positive multiple of 8")
    reports = []
    with tempfile.TemporaryDirectory(prefix="meta-cost-") as scratch:
        for name in models:
            reports.append(measure_model(name, Path(scratch) / name, configs, args.resolution, args.rank,
                                         args.max_sequence_length, args.gradient_checkpointing))
            print(f"{name}: counted", file=sys.stderr, flush=True)
    table = format_tables(reports, ["lora", *configs])
    print(table)
    if args.output:
        Path(args.output).write_text(table, encoding="utf-8")
    return reports


if __name__ == "__main__":
    main()
