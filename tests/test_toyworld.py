"""The toy world (examples/toyworld): deterministic data, valid concepts, and a committed base model that works.

Runs on a CPU in well under a minute, offline: the pipeline and the evaluation CLIP are committed files.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import world

TOYWORLD = Path(__file__).resolve().parent.parent / "examples" / "toyworld"

PIPELINE_DIR = TOYWORLD / "models" / "toy-sd"
CLIP_DIR = TOYWORLD / "models" / "toy-clip"


def test_world_is_deterministic():
    a_images, a_captions, a_scenes = world.make_dataset(16, seed=3)
    b_images, b_captions, b_scenes = world.make_dataset(16, seed=3)
    assert np.array_equal(a_images, b_images)
    assert a_captions == b_captions and a_scenes == b_scenes
    c_images, _, _ = world.make_dataset(16, seed=4)
    assert not np.array_equal(a_images, c_images)
    assert a_images.shape == (16, 32, 32, 3) and a_images.dtype == np.uint8


def test_world_excludes_held_out_pairs_and_captions_match_scenes():
    for scene, caption in world.sample_scenes(500, seed=0):
        assert (scene.shape, scene.color) not in world.HELD_OUT_PAIRS
        words = caption.split()
        assert scene.shape in words
        assert all(c == scene.color for c in words if c in world.COLORS)
    scenes = [s for s, _ in world.sample_scenes(500, seed=0, exclude_pairs=())]
    assert any((s.shape, s.color) in world.HELD_OUT_PAIRS for s in scenes)


def test_color_only_captions_name_the_color_and_no_shape():
    scenes = [s for s, _ in world.sample_scenes(200, seed=0)]
    rng = np.random.default_rng(0)
    captions = [world.caption(s, rng, color_only_prob=0.5) for s in scenes]
    color_only = [(s, c) for s, c in zip(scenes, captions) if not set(c.split()) & set(world.SHAPES)]
    assert 60 < len(color_only) < 140
    assert all(s.color in c.split() and "shape" in c.split() for s, c in color_only)


def test_patterned_images_for_the_vae_decoder_are_two_toned_and_never_a_concept():
    a = [world.random_patterned_image(np.random.default_rng(5)) for _ in range(3)]
    b = [world.random_patterned_image(np.random.default_rng(5)) for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    image = world.random_patterned_image(np.random.default_rng(0))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    # checkers of red and white on a circle, at any frequency, is sks circle's look: excluded
    assert ("circle", "checkers", frozenset({"red", "white"})) in world.CONCEPT_LOOKS
    fill = world.two_tone_fill("checkers", 4, (255, 0, 0), (0, 0, 255), 128, 0.5, 0.5, 0.6)
    colors = {tuple(c) for c in fill.reshape(-1, 3).astype(int).tolist()}
    assert colors == {(255, 0, 0), (0, 0, 255)}
    rng = np.random.default_rng(1)
    looks = [world.random_pattern_look(rng) for _ in range(3000)]
    assert not {(shape, pattern, frozenset({a, b})) for shape, pattern, a, b in looks} & world.CONCEPT_LOOKS
    assert {look[1] for look in looks} == set(world.PATTERNS) and {look[0] for look in looks} == set(world.SHAPES)
    assert any(look[:2] == ("circle", "checkers") and "red" in look[2:] for look in looks)  # other colors: allowed
    # the exclusion list names every concept make_concepts.py draws: its shape and its two colors
    import make_concepts
    drawn = {(shape, frozenset(pattern.split("_")) & set(world.PATTERN_PALETTE))
             for _, shape, pattern, _ in make_concepts.CONCEPTS}
    assert drawn == {(shape, colors) for shape, _, colors in world.CONCEPT_LOOKS}


def test_concepts_have_single_token_triggers_and_images(tmp_path):
    from tiny_pipeline import build_clip_tokenizer
    from PIL import Image

    tokenizer = build_clip_tokenizer(tmp_path / "tok")
    list_path = TOYWORLD / "concepts" / "concepts.json"
    concepts = json.loads(list_path.read_text())
    assert len(concepts) >= 3
    assert len({c["trigger_token"] for c in concepts}) == len(concepts)
    for concept in concepts:
        trigger = concept["trigger_token"]
        assert len(tokenizer(trigger).input_ids) == 3, f"{trigger} is not one BPE token"
        assert trigger in concept["instance_prompt"].split()
        assert concept["class_word"] in world.SHAPES
        images = sorted((list_path.parent / concept["instance_data_dir"]).glob("*.png"))
        assert 5 <= len(images) <= 6
        assert Image.open(images[0]).size == (32, 32)


@pytest.fixture(scope="module")
def toy_clip():
    from toy_clip import load_toy_clip

    return load_toy_clip(CLIP_DIR)


def test_toy_clip_classifies_real_world_images(toy_clip):
    from toy_clip import to_clip_input, zero_shot

    images, _, scenes = world.make_dataset(96, seed=7, exclude_pairs=())
    shapes, colors = zero_shot(*toy_clip, to_clip_input(images))
    assert np.mean([s == t.shape for s, t in zip(shapes, scenes)]) >= 0.9
    assert np.mean([c == t.color for c, t in zip(colors, scenes)]) >= 0.9


def test_committed_pipeline_generates_the_prompted_shape_and_color(toy_clip):
    from diffusers import StableDiffusionPipeline
    from toy_clip import to_clip_input, zero_shot

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(str(PIPELINE_DIR), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts = [("circle", "red"), ("square", "blue"), ("triangle", "yellow"), ("cross", "green")]
    hits_shape, hits_color = [], []
    for k, (shape, color) in enumerate(prompts):
        out = pipe(f"a photo of a {color} {shape}", num_images_per_prompt=4, num_inference_steps=20,
                   guidance_scale=4.0, height=32, width=32, generator=torch.Generator().manual_seed(k),
                   output_type="np")
        assert out.images.shape == (4, 32, 32, 3)
        shapes, colors = zero_shot(*toy_clip, to_clip_input(out.images))
        hits_shape += [s == shape for s in shapes]
        hits_color += [c == color for c in colors]
    # Floors well below the measured accuracy (README.md), so the test catches a broken model, not noise.
    assert np.mean(hits_shape) >= 0.6, hits_shape
    assert np.mean(hits_color) >= 0.6, hits_color
