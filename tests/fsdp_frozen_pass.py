"""The CAT term's frozen pass through a denoiser sharded by accelerate's FSDP2 equals the base model: run as
``torchrun --nproc_per_node 2 tests/fsdp_frozen_pass.py <train_cat_lora.py flags>``; the main process prints one
JSON line.

The script's own pieces build everything (arguments, models with their LoRA layers, the first batch, its noisy
latents and trigger-less conditioning); the LoRA's B matrices are drawn non-zero so that the adapter changes the
prediction. The base and adapted predictions are taken before sharding, then the frozen pass (``frozen_prediction``)
and the adapted one again through the sharded model.
"""

import json
import sys

import torch
from accelerate.state import PartialState
from torch.distributed.fsdp import FSDPModule

import fsdp_cpu
import train_cat_lora as T


def main(argv: list[str]) -> dict:
    fsdp_cpu.shard_like_accelerate_launch()
    args = T.parse_args(argv)
    family, concepts, examples, notes, adapters = T.check_inputs(args)
    accelerator = T.make_accelerator(args)
    T.check_distribution(args, adapters, accelerator)
    T.set_seed(T.run_seed(args))  # as main does: every process draws the same LoRA initialisation
    models = T.prepare_models(args, family, accelerator, torch.float32, adapters)
    denoiser = models[family.denoiser]
    generator = torch.Generator().manual_seed(1)
    for name, parameter in denoiser.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    dataloader, _, _ = T.make_dataloader(args, family, models, examples, [], 0)
    batch = next(iter(dataloader))
    encode = T.PromptEncoder(family, {name: models[name] for name in family.text_encoders})
    with torch.no_grad():
        z = family.noisy_latents(batch, models["vae"], models["noise_scheduler"], torch.float32)
        cond = encode(batch["cat_prompts"])
        adapted_before = family.predict(denoiser, z, cond)
        with T.adapters_disabled(denoiser):
            base = family.predict(denoiser, z, cond)
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    denoiser, _ = accelerator.prepare(denoiser, torch.optim.AdamW(trainable))
    frozen = T.frozen_prediction(family, denoiser, z, cond)
    with torch.no_grad():
        adapted = family.predict(denoiser, z, cond)
    lora = [p for name, p in denoiser.named_parameters() if "lora_" in name]
    return {"sharded": isinstance(denoiser, FSDPModule),
            "frozen_vs_base": float((frozen - base).abs().max()),
            "adapted_vs_before": float((adapted - adapted_before).abs().max()),
            "adapter_effect": float((adapted_before - base).abs().max()),
            "lora_trainable": all(p.requires_grad for p in lora) and bool(lora),
            "only_lora_trainable": all("lora_" in name for name, p in denoiser.named_parameters() if p.requires_grad)}


if __name__ == "__main__":
    result = main(sys.argv[1:])
    if PartialState().is_main_process:
        print(json.dumps(result))
