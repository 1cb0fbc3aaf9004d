"""Memory budget of CAT-LoRA training on Flux.1-dev, from measurements on the CPU scaled to the real config.

Nothing here runs on a GPU or on real weights. What is measured, and how:

1. Parameters: the real Flux.1-dev transformer config (19 double-stream + 38 single-stream blocks, hidden 3072) is
   built on torch's meta device (shapes only, no memory), so parameter counts, the linear layers bitsandbytes
   would quantize and the LoRA parameter count of the default targets are exact.
2. Bytes per parameter of the quantized base: one linear layer of every distinct real shape is quantized on the
   CPU with bitsandbytes (8-bit LLM.int8 and NF4), and the bytes of its weight and quantization statistics are
   counted. Parameters left unquantized are counted at 4 bytes, as peft's ``prepare_model_for_kbit_training``
   upcasts them to float32. NF4 as BitsAndBytesConfig's defaults (blocks of 64, no double quantization).
3. LoRA + AdamW: bytes of the LoRA parameters, their gradients and AdamW's state after one optimizer step on a
   small transformer, per LoRA parameter.
4. Activations: peak resident memory (ru_maxrss) of one forward + backward of a bf16 transformer with LoRA, minus
   the same process's peak before the step, each configuration in a fresh process; several block counts and two
   token counts give bytes per token per double block and per single block (least squares), at two widths, so
   the scaling to width 3072 is measured (ratio) rather than assumed. With and without gradient checkpointing.
   CPU kernels are not GPU kernels (attention on the CPU uses its own flash kernel; CUDA context, cuBLAS
   workspaces and allocator fragmentation are not included): treat the activation figures as estimates.

Run: ``python benchmarks/flux_memory_budget.py --json benchmarks/flux_memory_budget.json`` (about 10 minutes on
2 busy cores; ``--quick`` for a smaller sweep).
"""

import argparse
import json
import multiprocessing
import resource

import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig

from train_cat_lora import FLUX_TRANSFORMER_TARGETS  # the script's default Flux LoRA targets

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56])

GIB = 2**30
# Forked children start with the parent's imports done (a fresh interpreter would pay them once per run); the
# parent runs no torch computation before the sweep, so no thread pool is forked mid-use.
CONTEXT = multiprocessing.get_context("fork")


def flux_config(hidden_heads: int, double: int, single: int) -> dict:
    """A Flux-shaped config with ``hidden_heads`` heads of 64 (width 64 x heads) and the given block counts."""
    return dict(FLUX_DEV, num_layers=double, num_single_layers=single, attention_head_dim=64,
                num_attention_heads=hidden_heads, joint_attention_dim=256, pooled_projection_dim=64,
                axes_dims_rope=[8, 28, 28])


# --------------------------------------------------------------------------------------------- parameters


def parameter_census(rank: int) -> dict:
    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV)
    total = sum(p.numel() for p in model.parameters())
    linear = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # diffusers' bitsandbytes loader converts every linear layer unless llm_int8_skip_modules names it
    quantized = linear
    shapes = {}
    for m in quantized.values():
        shapes[(m.out_features, m.in_features)] = shapes.get((m.out_features, m.in_features), 0) + 1
    config = LoraConfig(r=rank, target_modules=FLUX_TRANSFORMER_TARGETS)
    lora = sum(rank * (m.in_features + m.out_features) for name, m in linear.items()
               if any(name == t or name.endswith("." + t) for t in config.target_modules))
    return {"total": total, "quantized_linear": sum(m.weight.numel() for m in quantized.values()),
            "shapes": shapes, "lora": lora}


def encoder_census() -> dict:
    """Parameters of Flux.1-dev's other components (configs as published), built on the meta device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu"))
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False)
    return {name: sum(p.numel() for p in model.parameters()) for name, model in
            (("t5", t5), ("clip", clip), ("vae", vae))}


def quantized_bytes_per_parameter(shape: tuple, kind: str) -> float:
    import bitsandbytes as bnb

    out_features, in_features = shape
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        # BitsAndBytesConfig's default: no double quantization of the block statistics
        layer = bnb.nn.Linear4bit(in_features, out_features, False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=False)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=False)
    layer = layer.to("cpu")  # quantizes
    tensors = [layer.weight.data]
    state = getattr(layer.weight, "quant_state", None)
    if state is not None:
        tensors += [value for value in state.as_dict(packed=False).values() if torch.is_tensor(value)]
    scb = getattr(layer.weight, "SCB", None)
    if scb is not None:
        tensors.append(scb)
    return sum(t.numel() * t.element_size() for t in tensors) / weight.numel()


# --------------------------------------------------------------------------------------------- LoRA + Adam


def lora_optimizer_bytes_per_parameter(rank: int) -> float:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**flux_config(4, 1, 1)).to(torch.bfloat16)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                 target_modules=FLUX_TRANSFORMER_TARGETS))
    lora = [p for p in model.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float()  # trainable LoRA weights stay float32 (cast_training_params)
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(lora, lr=1e-4)
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    weights = sum(p.numel() * p.element_size() for p in lora)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in lora)
    return (state + weights + grads) / sum(p.numel() for p in lora)


# --------------------------------------------------------------------------------------------- activations


def activation_peak(heads: int, double: int, single: int, image_tokens: int, text_tokens: int,
                    checkpointing: bool) -> int:
    """Child process: peak RSS growth (bytes) of one bf16 forward + backward with LoRA (rank 16)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**flux_config(heads, double, single))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                 target_modules=FLUX_TRANSFORMER_TARGETS))
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    side = int(image_tokens ** 0.5)
    inputs = dict(hidden_states=torch.randn(1, image_tokens, 64, dtype=torch.bfloat16),
                  encoder_hidden_states=torch.randn(1, text_tokens, 256, dtype=torch.bfloat16),
                  pooled_projections=torch.randn(1, 64, dtype=torch.bfloat16),
                  timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0),
                                                     indexing="ij"), -1).reshape(-1, 3),
                  txt_ids=torch.zeros(text_tokens, 3))
    # Warm up (thread pools, kernel libraries) on 16 + 8 tokens, whose activations are negligible.
    warm = dict(inputs, hidden_states=inputs["hidden_states"][:, :16],
                encoder_hidden_states=inputs["encoder_hidden_states"][:, :8],
                img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                                    -1).reshape(-1, 3), txt_ids=torch.zeros(8, 3))
    model(**warm, return_dict=False)[0].float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = model(**inputs, return_dict=False)[0]
    out.float().pow(2).mean().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return after - before


def _peak_in_child(config: dict, results) -> None:
    results.put(activation_peak(**config))


def measure_in_child(**config) -> int:
    """``activation_peak`` in a forked child (its own ru_maxrss high-water mark), one child per configuration."""
    results = CONTEXT.Queue()
    child = CONTEXT.Process(target=_peak_in_child, args=(config, results))
    child.start()
    peak = results.get()
    child.join()
    return peak


def fit_per_token_per_block(rows: list) -> tuple[float, float, float]:
    """Least squares: peak = tokens * (a * double + b * single + c) + d (c: outside the blocks; d: constant)."""
    design = torch.tensor([[t * d, t * s, t, 1.0] for (d, s, t, _) in rows], dtype=torch.float64)
    peaks = torch.tensor([[p] for (*_, p) in rows], dtype=torch.float64)
    return tuple(torch.linalg.lstsq(design, peaks).solution.flatten().tolist())


def activation_sweep(heads: int, checkpointing: bool, quick: bool) -> dict:
    # (double blocks, single blocks, image tokens, text tokens): block counts and token counts both vary
    runs = [(1, 1, 1024, 256), (3, 1, 1024, 256), (1, 3, 1024, 256), (1, 1, 2304, 256), (3, 3, 2304, 256)]
    if not quick:
        runs += [(3, 1, 2304, 256), (1, 3, 2304, 256), (3, 3, 1024, 256)]
    rows = []
    for double, single, image, text in runs:
        peak = measure_in_child(heads=heads, double=double, single=single, image_tokens=image, text_tokens=text,
                                checkpointing=checkpointing)
        rows.append((double, single, image + text, peak))
    per_double, per_single, outside, constant = fit_per_token_per_block(rows)
    residual = max(abs(p - t * (per_double * d + per_single * s + outside) - constant) for d, s, t, p in rows)
    return {"width": heads * 64, "per_token_double": per_double, "per_token_single": per_single,
            "per_token_outside": outside, "constant": constant, "max_residual_bytes": residual, "runs": rows}


# --------------------------------------------------------------------------------------------- budget


def budget(census, bytes_per_param, lora_bytes, activations, width_ratio, image_tokens, text_tokens, ckpt) -> dict:
    tokens = image_tokens + text_tokens
    fit = activations[ckpt]
    scale = width_ratio[ckpt]
    act = tokens * scale * (FLUX_DEV["num_layers"] * fit["per_token_double"]
                            + FLUX_DEV["num_single_layers"] * fit["per_token_single"] + fit["per_token_outside"])
    rest = census["total"] - census["quantized_linear"]
    base = {kind: census["quantized_linear"] * bpp + rest * 4 for kind, bpp in bytes_per_param.items()}
    base["bf16"] = census["total"] * 2
    return {"activations": act, "base": base, "lora_adam": census["lora"] * lora_bytes}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="fewer activation runs")
    parser.add_argument("--json", default=None, help="also write the measurements to this file")
    args = parser.parse_args()

    activations, width_ratio = {}, {}
    for ckpt in (False, True):  # first: no torch computation in this process before the forks
        small, large = activation_sweep(4, ckpt, args.quick), activation_sweep(8, ckpt, args.quick)
        activations[ckpt] = large
        # measured growth per doubling of the width, extrapolated (power law) from 512 to 3072
        per_block = lambda fit: fit["per_token_double"] + fit["per_token_single"]  # noqa: E731
        exponent = torch.log2(torch.tensor(per_block(large) / per_block(small))).item()
        width_ratio[ckpt] = (3072 / large["width"]) ** exponent
        activations[ckpt]["width_exponent"] = exponent
        activations[ckpt]["small"] = small
    census = parameter_census(args.rank)
    bytes_per_param = {}
    for kind in ("int8", "nf4"):
        weighted = sum(count * out * inp * quantized_bytes_per_parameter((out, inp), kind)
                       for (out, inp), count in census["shapes"].items())
        bytes_per_param[kind] = weighted / census["quantized_linear"]
    lora_bytes = lora_optimizer_bytes_per_parameter(args.rank)
    encoders = encoder_census()

    print(f"Flux.1-dev transformer: {census['total'] / 1e9:.2f} B parameters, "
          f"{census['quantized_linear'] / 1e9:.2f} B in quantizable linear layers; "
          f"LoRA rank {args.rank} on the default targets: {census['lora'] / 1e6:.1f} M parameters")
    print(f"bytes/parameter of the quantized linear layers: int8 {bytes_per_param['int8']:.4f}, "
          f"nf4 {bytes_per_param['nf4']:.4f}; LoRA weight + grad + AdamW state: {lora_bytes:.1f} bytes/parameter")
    for ckpt in (False, True):
        fit = activations[ckpt]
        print(f"activations, gradient checkpointing {'on' if ckpt else 'off'} (width {fit['width']}, bf16): "
              f"{fit['per_token_double'] / 1024:.2f} KiB/token/double block, "
              f"{fit['per_token_single'] / 1024:.2f} KiB/token/single block, "
              f"{fit['per_token_outside'] / 1024:.2f} KiB/token outside the blocks "
              f"(max residual {fit['max_residual_bytes'] / 2**20:.1f} MiB); width exponent "
              f"{fit['width_exponent']:.2f} -> x{width_ratio[ckpt]:.2f} at width 3072")
    print(f"before caching (bf16): T5-XXL encoder {encoders['t5'] / 1e9:.2f} B parameters = "
          f"{encoders['t5'] * 2 / GIB:.1f} GiB, CLIP-L {encoders['clip'] * 2 / GIB:.2f} GiB, "
          f"VAE {encoders['vae'] * 2 / GIB:.2f} GiB; freed after --pre_compute_text_embeddings")
    print()
    print("| resolution | tokens (image + text) | base bf16 | base int8 | base NF4 | LoRA + AdamW | "
          "activations, no checkpointing | activations, checkpointing |")
    print("|---|---|---|---|---|---|---|---|")
    for resolution, image_tokens in ((512, 1024), (1024, 4096)):
        plain = budget(census, bytes_per_param, lora_bytes, activations, width_ratio, image_tokens, 512, False)
        ckpt = budget(census, bytes_per_param, lora_bytes, activations, width_ratio, image_tokens, 512, True)
        print(f"| {resolution} px | {image_tokens} + 512 | {plain['base']['bf16'] / GIB:.1f} GiB | "
              f"{plain['base']['int8'] / GIB:.1f} GiB | {plain['base']['nf4'] / GIB:.1f} GiB | "
              f"{plain['lora_adam'] / GIB:.2f} GiB | {plain['activations'] / GIB:.1f} GiB | "
              f"{ckpt['activations'] / GIB:.1f} GiB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"census": {k: v for k, v in census.items() if k != "shapes"}, "encoders": encoders,
                       "bytes_per_param": bytes_per_param, "lora_bytes_per_param": lora_bytes,
                       "activations": {str(k): v for k, v in activations.items()},
                       "width_ratio": {str(k): v for k, v in width_ratio.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
