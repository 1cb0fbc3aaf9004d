"""Shared fixtures: a tiny offline SD pipeline, example images, and an in-process training runner."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402

from tiny_pipeline import build_tiny_pipeline  # noqa: E402


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
        *extra,
    ]


def reset_accelerate_state() -> None:
    """Forget the previous in-process run's accelerate state, so the next run starts like a new process."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_train_cat_lora(argv: list[str]):
    """Run ``train_cat_lora.main`` in this process (imports are paid once) with a fresh accelerate state."""
    import train_cat_lora

    reset_accelerate_state()
    return train_cat_lora.main(argv)


@pytest.fixture
def run_training():
    return run_train_cat_lora


def drift_on_trigger_less_prompts(pipeline: str, lora_dir: Path, prompts: list[str], latent_size: int = 16) -> float:
    """mean ||eps_adapted(y) - eps_base(y)||^2 over fixed latents and timesteps: how far a LoRA moved the model."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None)
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(len(prompts) * 4, pipe.unet.config.in_channels, latent_size, latent_size, generator=generator)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0].repeat(4, 1, 1)
        base = pipe.unet(latents, timesteps, embeds).sample
        pipe.load_lora_weights(lora_dir)
        embeds = pipe.text_encoder(ids)[0].repeat(4, 1, 1)
        adapted = pipe.unet(latents, timesteps, embeds).sample
    return ((adapted - base) ** 2).mean().item()
