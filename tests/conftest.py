"""Shared fixtures: tiny offline SD, SDXL and Flux.1 pipelines, example images, and an in-process training runner."""

import os
from argparse import Namespace
from contextlib import contextmanager
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_pipeline import (  # noqa: E402
    build_tiny_flux2_klein_pipeline,
    build_tiny_flux2_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_pipeline,
    build_tiny_qwenimage_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
    build_tiny_zimage_pipeline,
    tiny_sequence_length,
)

# Tiny models run faster on one thread (thread start-up dominates their small matrices), several times faster
# when other jobs share the cores; subprocess tests pass OMP_NUM_THREADS=1 for the same reason.
torch.set_num_threads(1)


# --device cuda (or CAT_TEST_DEVICE=cuda): the tests marked ``any_device`` run their models on the GPU (tests that
# train through ``run_training`` get the device from accelerate, as the script does); every other test is written
# for the CPU and is skipped. The default, cpu, changes nothing on a machine without a GPU; where one is present it
# keeps the training runs on the CPU (ACCELERATE_USE_CPU). benchmarks/gpu_check.sh runs the cuda set.
#
# On a GPU, bit-exactness holds between two runs of the same computation only with deterministic kernels:
# --device cuda turns on torch.use_deterministic_algorithms (and CUBLAS_WORKSPACE_CONFIG=:4096:8, which cuBLAS
# needs for it, set before CUDA starts) and turns off TF32, so α = 0 ≡ plain LoRA and the resume after SIGTERM stay
# bit-exact checks. Lean ≡ batched compares different batch shapes, whose kernels reduce in different orders: that
# test has a tolerance on cuda (see it).


def pytest_addoption(parser):
    parser.addoption("--device", choices=("cpu", "cuda"), default=os.environ.get("CAT_TEST_DEVICE", "cpu"),
                     help="Run the tests marked any_device on this device (others are skipped on cuda).")


def pytest_configure(config):
    config.addinivalue_line("markers", "any_device: the test runs on --device cuda too")
    config.addinivalue_line("markers", "slow: left out of `bash tests/run.sh` (the 10-minute suite); "
                                       "`bash tests/run.sh -m ''` runs them too")
    device = config.getoption("--device")
    if device not in ("cpu", "cuda"):  # argparse does not check a default (CAT_TEST_DEVICE)
        raise pytest.UsageError(f"--device / CAT_TEST_DEVICE: expected cpu or cuda, got {device!r}")
    os.environ["CAT_TEST_DEVICE"] = device  # also for the subprocesses tests start
    if device == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"--device cuda: torch {torch.__version__} sees no CUDA device")
        os.environ.pop("ACCELERATE_USE_CPU", None)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    elif torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "1"


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device") == "cuda":
        skip = pytest.mark.skip(reason="written for the CPU: run it with --device cpu")
        for item in items:
            if item.get_closest_marker("any_device") is None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device of the tests marked any_device (--device)."""
    return torch.device(os.environ.get("CAT_TEST_DEVICE", "cpu"))


TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """(config .json path, checkpoint path) of a tiny random open_clip model."""
    import json

    import open_clip
    import torch

    folder = tmp_path_factory.mktemp("clip")
    config = folder / "tiny-kps-clip.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-kps-clip", pretrained=None)
    checkpoint = folder / "tiny-kps-clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> str:
    """A tiny random SD 1.x pipeline folder (epsilon prediction), built once per test session."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline(tmp_path_factory) -> str:
    """A tiny random SDXL pipeline folder, built once per test session."""
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_flux_pipeline(tmp_path_factory) -> str:
    """A tiny random Flux.1-dev-like pipeline folder (guidance embedding), built once per test session."""
    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_sd3_pipeline(tmp_path_factory) -> str:
    """A tiny random SD3 pipeline folder (CLIP-L, CLIP-G and T5 of different widths)."""
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_qwenimage_pipeline(tmp_path_factory) -> str:
    """A tiny random Qwen-Image pipeline folder (Qwen2.5-VL text encoder, video VAE)."""
    return build_tiny_qwenimage_pipeline(tmp_path_factory.mktemp("tiny-qwenimage"))


@pytest.fixture(scope="session")
def tiny_zimage_pipeline(tmp_path_factory) -> str:
    """A tiny random Z-Image pipeline folder (Qwen3 text encoder with a chat template)."""
    return build_tiny_zimage_pipeline(tmp_path_factory.mktemp("tiny-zimage"))


@pytest.fixture(scope="session")
def tiny_flux2_klein_pipeline(tmp_path_factory) -> str:
    """A tiny random FLUX.2 [klein] pipeline folder (Qwen3 causal LM text encoder, Flux2 VAE)."""
    return build_tiny_flux2_klein_pipeline(tmp_path_factory.mktemp("tiny-flux2-klein"))


@pytest.fixture(scope="session")
def tiny_flux2_pipeline(tmp_path_factory) -> str:
    """A tiny random FLUX.2 [dev] pipeline folder (Mistral 3 text encoder read through its processor)."""
    return build_tiny_flux2_pipeline(tmp_path_factory.mktemp("tiny-flux2"))


FAMILY_FIXTURES = {"sd": "tiny_pipeline", "sdxl": "tiny_sdxl_pipeline", "flux": "tiny_flux_pipeline",
                   "sd3": "tiny_sd3_pipeline", "qwenimage": "tiny_qwenimage_pipeline", "zimage": "tiny_zimage_pipeline",
                   "flux2_klein": "tiny_flux2_klein_pipeline", "flux2": "tiny_flux2_pipeline"}


@pytest.fixture(params=list(FAMILY_FIXTURES))
def family_pipeline(request) -> str:
    """A tiny pipeline of each family the script trains: tests using it run once per family."""
    return request.getfixturevalue(FAMILY_FIXTURES[request.param])


def families_slow_except(*kept: str) -> list:
    """``family_pipeline`` parameters for a family-agnostic guarantee that is costly per family: the ``kept`` families
    run in the default suite, the others are marked slow. Use with
    ``@pytest.mark.parametrize("family_pipeline", families_slow_except("sd", "flux"), indirect=True)``."""
    return [pytest.param(family, marks=() if family in kept else pytest.mark.slow) for family in FAMILY_FIXTURES]


def offered(pipeline: str, *flags: str) -> list[str]:
    """The flags among ``flags`` that the pipeline's family offers (train_cat_lora.check_family_options refuses the
    others, e.g. --train_text_encoder where diffusers' script trains no text encoder)."""
    import train_cat_lora as T

    family = T.model_family(Namespace(pretrained_model_name_or_path=pipeline))
    kept = []
    for flag in flags:
        try:
            T.check_family_options(Namespace(train_text_encoder=flag == "--train_text_encoder",
                                             train_text_encoder_ti=flag == "--train_text_encoder_ti",
                                             output_kohya_format=flag == "--output_kohya_format"), family)
            kept.append(flag)
        except T.InputError:
            pass
    return kept


def component_class(pipeline: str, component: str) -> type:
    """The class of a pipeline component, as its ``model_index.json`` names it (e.g. UNet2DConditionModel)."""
    import importlib
    import json

    library, name = json.loads((Path(pipeline) / "model_index.json").read_text())[component]
    return getattr(importlib.import_module(library), name)


def denoiser_class(pipeline: str) -> type:
    """The denoiser's class of a pipeline folder: UNet2DConditionModel, FluxTransformer2DModel, ..."""
    import train_cat_lora as T

    family = T.model_family(Namespace(pretrained_model_name_or_path=pipeline))
    return component_class(pipeline, family.denoiser)


@contextmanager
def watch_forward(kind, callback):
    """Call ``callback(module)`` before every forward of any module of class ``kind``, in any model.

    torch's global forward pre-hook: a seam into models the training script builds itself.
    """
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, inputs: callback(module) if isinstance(module, kind) else None)
    try:
        yield
    finally:
        handle.remove()


def draw_subject(path: Path, shift: int, color=(200, 30, 30), size: int = 48) -> None:
    """A little 'teapot': a red disc with a white window and a handle, shifted a bit per image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse([6 + shift, 10, 36 + shift, 40], fill=color)
    draw.rectangle([16 + shift, 20, 24 + shift, 28], fill="white")
    draw.rectangle([36 + shift, 20, 42 + shift, 26], fill=(40, 40, 40))
    image.save(path)


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory) -> Path:
    """Four subject images without caption files (captions come from --instance_prompt)."""
    folder = tmp_path_factory.mktemp("instance")
    for i in range(4):
        draw_subject(folder / f"{i}.png", shift=i)
    return folder


def sequence_length(pipeline: str) -> int:
    """--max_sequence_length of the tiny pipeline's prompts in tests (tiny_pipeline.tiny_sequence_length)."""
    import train_cat_lora as T

    return tiny_sequence_length(T.model_family(Namespace(pretrained_model_name_or_path=pipeline)))


def train_args(pipeline: str, data: Path, output: Path, *extra: str, steps: int = 4) -> list[str]:
    """A fast command line for the tiny pipeline; ``extra`` flags are appended (later flags win)."""
    return [
        "--pretrained_model_name_or_path", pipeline,
        "--instance_data_dir", str(data),
        "--instance_prompt", "a photo of sks teapot",
        "--trigger_token", "sks",
        "--output_dir", str(output),
        "--resolution", "32",
        "--train_batch_size", "2",
        "--max_train_steps", str(steps),
        "--learning_rate", "1e-3",
        "--seed", "0",
        "--report_to", "none",
        "--max_sequence_length", str(sequence_length(pipeline)),
        *extra,
    ]


def reset_accelerate_state() -> None:
    """Forget the previous in-process run's accelerate state, so the next run starts like a new process."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_train_cat_lora(argv: list[str], on_log=None):
    """Run ``train_cat_lora.main`` in this process (imports are paid once) with a fresh accelerate state;
    ``on_log(values, step)`` receives what the run logs."""
    import train_cat_lora

    reset_accelerate_state()
    return train_cat_lora.main(argv, on_log=on_log)


@pytest.fixture
def run_training():
    return run_train_cat_lora


def drift_on_trigger_less_prompts(pipeline: str, lora_dir: Path, prompts: list[str], resolution: int = 32) -> float:
    """mean ||eps_adapted(y) - eps_base(y)||^2 over fixed noisy latents and timesteps: how far a LoRA moved the model
    (evaluate_kps.prediction_drift, the family's own conditioning, noisy input and prediction)."""
    import evaluate_kps
    import train_cat_lora as T

    family = T.model_family(Namespace(pretrained_model_name_or_path=pipeline, resolution=resolution,
                                      max_sequence_length=sequence_length(pipeline)))
    repeats = 4
    rows = len(prompts) * repeats
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(rows, 3, resolution, resolution, generator=generator) * 2 - 1,
             "noise_seeds": torch.randint(0, 2**62, (rows,), generator=generator),
             "original_sizes": torch.full((rows, 2), resolution), "crops_top_left": torch.zeros(rows, 2)}
    squared, _ = evaluate_kps.prediction_drift(family, family.load_pipeline(), lora_dir, batch, prompts * repeats)
    return squared.mean().item()
