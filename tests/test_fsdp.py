"""FSDP2: what combines with sharding and what is refused, the adapters switched off without touching requires_grad,
and (slow: two processes each) sharded training on the CPU against one process, the frozen pass under sharding,
the saved file, and a resume after SIGTERM.

accelerate does not shard on the CPU; tests/fsdp_cpu.py runs the script with accelerate's state set to FSDP2 (it
says why that, and not fully_shard by hand). Each sharded run is two gloo processes with one thread each.
"""

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, offered, train_args
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file

import train_cat_lora as T

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'examples'}"}


# ----------------------------------------------------------------------------- what combines with FSDP


def fsdp_accelerator(version: int = 2, kind=T.DistributedType.FSDP):
    return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))


def flags(**given) -> Namespace:
    return Namespace(**{"fsdp_text_encoder": False, "train_text_encoder": False, "bnb_quantization_config_path": None,
                        **given})


LORA = T.LoraAdapter(T.LoraOptions())


def test_fsdp2_with_lora_on_the_denoiser_and_sharded_text_encoders_is_accepted():
    T.check_distribution(flags(fsdp_text_encoder=True), [LORA], fsdp_accelerator())
    T.check_distribution(flags(), [LORA], fsdp_accelerator())
    T.check_distribution(flags(train_text_encoder=True), [LORA], fsdp_accelerator(kind=T.DistributedType.MULTI_GPU))


@pytest.mark.parametrize("given, adapters, accelerator, message", [
    (flags(), [LORA], fsdp_accelerator(kind=T.DistributedType.DEEPSPEED), "DeepSpeed .* is not supported"),
    (flags(), [LORA], fsdp_accelerator(version=1), "fsdp_version: 1 is not supported: use fsdp_version: 2"),
    (flags(fsdp_text_encoder=True), [LORA], fsdp_accelerator(kind=T.DistributedType.MULTI_GPU),
     "--fsdp_text_encoder needs FSDP"),
    (flags(train_text_encoder=True), [LORA], fsdp_accelerator(), "--train_text_encoder is not supported under FSDP"),
    (flags(bnb_quantization_config_path="nf4.json"), [LORA], fsdp_accelerator(),
     "--bnb_quantization_config_path nf4.json: a quantized base is not sharded"),
    (flags(), [T.CatVersionAdapter(1, 0)], fsdp_accelerator(), "CatVersion is not supported under FSDP"),
    (flags(), [LORA, T.PivotalTokens(None, 1.0)], fsdp_accelerator(), "pivotal tokens is not supported under FSDP"),
], ids=["deepspeed", "fsdp1", "fsdp_text_encoder-without-fsdp", "train_text_encoder", "quantized", "catversion",
        "pivotal"])
def test_what_fsdp_cannot_run_is_refused_in_one_line(given, adapters, accelerator, message):
    with pytest.raises(T.InputError, match=message) as refused:
        T.check_distribution(given, adapters, accelerator)
    assert "\n" not in str(refused.value)


def test_fsdp_text_encoder_without_fsdp_stops_before_any_model_loads(tiny_pipeline, instance_dir, tmp_path,
                                                                      run_training):
    with pytest.raises(T.InputError) as refused:
        run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "out", "--fsdp_text_encoder"))
    assert str(refused.value) == ("--fsdp_text_encoder needs FSDP: accelerate config distributed_type: FSDP, "
                                  "fsdp_version: 2 (docs/multi-gpu.md)")
    assert not (tmp_path / "out").exists()


def test_switching_lora_off_leaves_requires_grad_alone():
    """Under FSDP the LoRA weights are views of sharded storage: the frozen pass must flip the layers' flag only
    (peft's enable_adapters(False) sets requires_grad False, and True again on enable)."""
    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], init_lora_weights=False),
                                    torch.nn.Sequential(torch.nn.Linear(4, 4)))
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    x = torch.randn(3, 4)
    base = model[0].base_layer(x)
    with T.adapters_disabled(model):
        assert all(p.requires_grad for p in lora)
        assert torch.equal(model(x), base)
    assert all(p.requires_grad for p in lora)
    assert not torch.allclose(model(x), base)


# ----------------------------------------------------------------------------- sharded runs (2 processes)


def sharded(script: str, argv: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / script), *argv],
                          env={**ENV, **env}, capture_output=True, text=True)


def lora_weights(folder: Path) -> dict:
    return load_file(folder / "pytorch_lora_weights.safetensors")


# Sharding is accelerate's and the gather is the script's, the same for every family: a U-Net family, a
# transformer with CLIP and T5, and an LLM-encoder family with its text encoder sharded too.
CASES = {"sd": ("tiny_pipeline", ("--gradient_checkpointing", "--cat_mode", "batched")),
         "flux": ("tiny_flux_pipeline", ("--cat_every", "2", "--cat_alpha", "auto", "--cat_drift_budget", "1e-8")),
         "zimage": ("tiny_zimage_pipeline", ("--fsdp_text_encoder",))}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_training_matches_one_process_and_saves_the_whole_lora(case, request, instance_dir, tmp_path):
    """2 sharded processes x batch 1 against 1 process x batch 2 (same samples, same per-sample noise): the same
    LoRA, written once, every key at full size, and the pipeline loads it. The SD run also checkpoints its
    activations (recomputed in backward with the adapters on, after the frozen pass turned them off and on) and
    runs the CAT passes batched."""
    pipeline_fixture, extra = CASES[case]
    pipeline = request.getfixturevalue(pipeline_fixture)
    single_extra = [flag for flag in extra if flag not in ("--gradient_checkpointing", "--fsdp_text_encoder")]
    single, double = tmp_path / "single", tmp_path / "double"
    # Adam's epsilon of 1 makes the update proportional to the gradient (see the 2-process DDP test).
    common = ["--learning_rate", "1e-1", "--adam_epsilon", "1", "--checkpointing_steps", "2"]
    subprocess.run([sys.executable, str(ROOT / "train_cat_lora.py"),
                    *train_args(pipeline, instance_dir, single, *common, *single_extra, steps=4)], check=True, env=ENV,
                   capture_output=True)
    done = sharded("fsdp_cpu.py", train_args(pipeline, instance_dir, double, *common, *extra, "--train_batch_size", "1",
                                             steps=4))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 2  # weights and model card, once
    assert "pytorch_model_fsdp_0" in {p.name for p in (double / "checkpoint-2").iterdir()}  # accelerate's FSDP save
    a, b = lora_weights(single), lora_weights(double)
    assert a.keys() == b.keys() == lora_weights(double / "checkpoint-2").keys()
    for key in a:
        assert b[key].shape == a[key].shape and b[key].numel() > 0, key
        # float32 sums reduced in another order (2 shards, 2 processes). Measured on Flux.1 with --cat_every 2: at
        # most 5.6e-7 of a weight's norm, the same under DDP; a wrong gradient moves weights by the update, ~1e-3.
        assert (a[key] - b[key]).norm() <= 1e-5 * a[key].norm(), key
    family = T.model_family(Namespace(pretrained_model_name_or_path=pipeline))
    pipe = family.pipeline_class.from_pretrained(pipeline)
    pipe.load_lora_weights(double)
    assert getattr(pipe, family.denoiser).peft_config


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_the_frozen_pass_through_the_sharded_denoiser_is_the_base_model(case, request, instance_dir, tmp_path):
    pipeline_fixture, extra = CASES[case]
    pipeline = request.getfixturevalue(pipeline_fixture)
    done = sharded("fsdp_frozen_pass.py", train_args(pipeline, instance_dir, tmp_path / "out", "--train_batch_size",
                                                     "1", *[f for f in extra if f == "--fsdp_text_encoder"]))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sharded"] and result["lora_trainable"] and result["only_lora_trainable"], result
    assert result["adapter_effect"] > 0.05, result  # B drawn non-zero: the adapter moves the prediction
    # All-gathered weights are exact copies; what remains is float32 rounding of another summation order.
    assert result["frozen_vs_base"] < 1e-5 and result["adapted_vs_before"] < 1e-5, result


@pytest.mark.slow
def test_a_sharded_run_stopped_by_sigterm_resumes_bit_exact(tiny_flux_pipeline, instance_dir, tmp_path):
    common = ("--checkpointing_steps", "100", "--train_batch_size", "1")
    full = sharded("fsdp_cpu.py", train_args(tiny_flux_pipeline, instance_dir, tmp_path / "full", *common, steps=6))
    assert full.returncode == 0, full.stderr[-3000:]
    # 2 denoiser passes per step with --cat_mode lean (y_T, then y adapted and y frozen: 3): the third step's first.
    cut = sharded("fsdp_cpu.py", train_args(tiny_flux_pipeline, instance_dir, tmp_path / "cut", *common, steps=6),
                  FSDP_CPU_SIGTERM_AT="7:FluxTransformer2DModel")
    assert cut.returncode != 0 and "interrupted by SIGTERM at step 3" in cut.stderr, cut.stderr[-3000:]
    assert [p.name for p in T.checkpoint_folders(tmp_path / "cut")] == ["checkpoint-3"]
    assert not (tmp_path / "cut" / "pytorch_lora_weights.safetensors").exists()
    resumed = sharded("fsdp_cpu.py", train_args(tiny_flux_pipeline, instance_dir, tmp_path / "cut", *common,
                                                "--resume_from_checkpoint", "latest", steps=6))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = lora_weights(tmp_path / "full"), lora_weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_the_fsdp_step_benchmark_reports_every_process(tmp_path):
    """benchmarks/fsdp_step.py (gpu_check's FSDP2-against-DDP item) runs sharded; on the CPU there is no peak."""
    done = sharded("fsdp_cpu.py", ["--model", "tiny-flux", "--resolution", "32", "--mixed_precision", "no", "--steps",
                                   "1", "--output", str(tmp_path / "fsdp.json")],
                   FSDP_CPU_RUN=str(ROOT / "benchmarks" / "fsdp_step.py"),
                   PYTHONPATH=f"{ENV['PYTHONPATH']}:{ROOT / 'benchmarks'}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "fsdp.json").read_text())
    assert (result["distributed_type"], result["processes"], len(result["per_process"])) == ("FSDP", 2, 2)
    assert all(p["step_s"] > 0 and p["peak_bytes"] is None for p in result["per_process"])
