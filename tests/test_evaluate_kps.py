"""Tests for evaluate_kps.py: the metric math, folder mode, generate mode and input errors.

Everything is offline and tiny: a random open_clip model registered from a config file and saved to a local
checkpoint, a random transformers ViT as the DINO model, and the tiny random SD 1.x pipeline of
examples/tiny_pipeline.py with random LoRAs.
"""

import csv
import json
import math
import os
import runpy
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

import evaluate_kps as ek
import train_cat_lora as T  # noqa: E402
from train_cat_lora import InputError  # noqa: E402

PYTHON = sys.executable
TRIGGER = "sks"
BASE_VOCAB = 49408  # the tiny pipelines' CLIP vocabulary
LORA_ALPHA = 8  # != rank 4, so a loader that ignored the saved LoraConfig would scale the LoRA wrongly


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory):
    """Folder of a tiny random transformers ViT with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=37)
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_image(path: Path, seed: int, size: int = 48) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(1, 1, 3))
    noise = rng.integers(-60, 60, size=(size, size, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def pairs_folder(tmp_path_factory):
    """A folder-mode jsonl with two adapters: 'same' (identical images with and without trigger), 'diff'."""
    folder = tmp_path_factory.mktemp("pairs")
    captions = ["a photo of sks teapot", "sks teapot on a table", "a red sks teapot, studio light"]
    lines = []
    for i, caption in enumerate(captions):
        save_image(folder / "ref" / f"{i}.png", 100 + i)
        save_image(folder / "same" / f"{i}.png", 200 + i)
        save_image(folder / "diff" / f"{i}_T.png", 300 + i)
        save_image(folder / "diff" / f"{i}.png", 400 + i)
        lines.append({"adapter": "same", "caption": caption, "reference": f"ref/{i}.png",
                      "with_trigger": f"same/{i}.png", "without_trigger": f"same/{i}.png"})
        lines.append({"adapter": "diff", "caption": caption, "reference": f"ref/{i}.png",
                      "with_trigger": f"diff/{i}_T.png", "without_trigger": f"diff/{i}.png"})
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return pairs


@pytest.fixture(scope="session")
def loras(tiny_pipeline, instance_dir, tmp_path_factory):
    """Two LoRAs trained by train_cat_lora.py on the tiny pipeline: a CAT one (a) and a plain one (b)."""
    from conftest import run_train_cat_lora, train_args

    folder = tmp_path_factory.mktemp("loras")
    for name, alpha in (("a", "1"), ("b", "0")):
        run_train_cat_lora(train_args(tiny_pipeline, instance_dir, folder / name, "--cat_alpha", alpha, "--rank", "4",
                                      "--lora_alpha", str(LORA_ALPHA), "--learning_rate", "1e-2", steps=3))
    return {"a": folder / "a", "b": folder / "b"}


@pytest.fixture(scope="session")
def eval_data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    for i, caption in enumerate(["a photo of sks teapot", "sks teapot in the snow"]):
        save_image(folder / f"{i}.png", 500 + i)
        (folder / f"{i}.txt").write_text(caption)
    return folder


def clip_args(tiny_clip, tiny_dino):
    config, checkpoint = tiny_clip
    return ["--clip_model", str(config), "--clip_pretrained", str(checkpoint), "--dino_model", str(tiny_dino)]


def reference_harmonic_mean(values):
    """Eq. 11 with the clamping rule, written independently of evaluate_kps."""
    values = np.asarray(values, dtype=np.float64)
    clamped = np.maximum(values, 1e-6)
    return len(values) / np.sum(1.0 / clamped), int(np.sum(values < 1e-6))


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def table_rows(table: str) -> list[str]:
    """The adapter rows of a markdown table printed by evaluate_kps (not the header, rule or footnote)."""
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    return [line for line in lines if not line.startswith("| Method ")]


def table_cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


# ---------------------------------------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------------------------------------


def test_cosine_similarity_hand_values():
    a = [[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [1.0, 2.0]]
    b = [[0.0, 2.0], [5.0, 0.0], [6.0, 8.0], [-1.0, -2.0]]
    got = ek.cosine_similarity(a, b)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), [0.0, 1 / math.sqrt(2), 1.0, -1.0], atol=1e-6)
    with pytest.raises(ValueError):
        ek.cosine_similarity([[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]])


def test_harmonic_mean_hand_values(recwarn):
    value, clamped = ek.harmonic_mean([1.0, 2.0, 4.0])
    assert value == pytest.approx(12 / 7)
    assert clamped == 0
    assert ek.harmonic_mean([0.3])[0] == pytest.approx(0.3)
    assert ek.harmonic_mean(torch.tensor([0.5, 0.5]))[0] == pytest.approx(0.5)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_harmonic_mean_clamps_non_positive_values_and_counts_them():
    with pytest.warns(RuntimeWarning, match=r"s_prev: 2 of 3 values"):
        value, clamped = ek.harmonic_mean([0.5, 0.0, -0.2], name="s_prev")
    assert clamped == 2
    assert value == pytest.approx(3 / (2 + 1e6 + 1e6))
    with pytest.raises(ValueError):
        ek.harmonic_mean([])


def test_scores_from_hand_made_embeddings():
    text = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    ref = [[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [2.0, 0.0, 1.0]]
    with_t = [[1.0, 2.0, 0.0], [0.5, 1.0, 1.0], [1.0, 0.0, 3.0]]
    without_t = [[1.0, 2.0, 0.1], [-0.5, 1.0, 0.0], [0.0, 1.0, -3.0]]
    cos = lambda a, b: np.sum(unit(a) * unit(b), axis=-1)  # noqa: E731
    expected_ps = reference_harmonic_mean(cos(text, with_t))
    expected_is = reference_harmonic_mean(cos(ref, with_t))
    h_prev, prev_clamped = reference_harmonic_mean(cos(without_t, with_t))
    assert prev_clamped == 1  # the third pair points away: cos < 0
    assert ek.prompt_similarity(text, with_t) == pytest.approx(expected_ps, rel=1e-5)
    assert ek.identity_similarity(ref, with_t) == pytest.approx(expected_is, rel=1e-5)
    with pytest.warns(RuntimeWarning):
        kps, clamped = ek.knowledge_preservation_score(with_t, without_t)
    assert kps == pytest.approx(1 - h_prev, rel=1e-5)
    assert clamped == prev_clamped
    pairwise = np.mean(unit(with_t) @ unit(ref).T)
    assert ek.mean_pairwise_similarity(with_t, ref) == pytest.approx(pairwise, rel=1e-5)


def test_kps_identical_images_is_zero_different_is_positive():
    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(5, 16)).astype(np.float32)
    kps, clamped = ek.knowledge_preservation_score(embeds, embeds.copy())
    assert abs(kps) < 1e-6 and clamped == 0
    other = embeds + rng.normal(scale=0.5, size=embeds.shape).astype(np.float32)
    assert ek.knowledge_preservation_score(embeds, other)[0] > 0.01


def table_metrics(text, ref, with_t, without_t):
    """The metrics dict of one adapter as score_samples builds it, from hand-made embeddings (no DINO)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        paper = ek.paper_metrics(text, ref, with_t, without_t)
    return {**paper, "n": len(text), "CLIP-T": paper["PS_mean"], "CLIP-I": 0.5, "DINO": None, "PRES": None}


def test_table_marks_cells_whose_harmonic_mean_clamped_and_gives_the_count():
    text = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    ref = [[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [2.0, 0.0, 1.0]]
    with_t = [[1.0, 2.0, 0.0], [0.5, 1.0, 1.0], [1.0, 0.0, 3.0]]
    # One image without the trigger points away from its pair (cosine < 0): s_prev gets clamped once.
    leaky = table_metrics(text, ref, with_t, [[1.0, 2.0, 0.1], [0.5, 1.0, 0.9], [0.0, 1.0, -3.0]])
    clean = table_metrics(text, ref, with_t, [[1.0, 2.0, 0.1], [0.5, 1.0, 0.9], [1.0, 0.5, 3.0]])
    assert leaky["clamped"] == {"PS": 0, "IS": 0, "KPS": 1} and clean["clamped"] == {"PS": 0, "IS": 0, "KPS": 0}
    # The clamp is what makes the harmonic KPS meaningless: H(s_prev) ~ 3e-6, so KPS ~ 1.
    assert leaky["KPS"] > 0.9999 and leaky["KPS_mean"] < 0.9

    table = ek.format_table({"leaky": leaky, "clean": clean})
    titles = table_cells(table.splitlines()[0])
    rows = {table_cells(row)[0]: dict(zip(titles, table_cells(row))) for row in table_rows(table)}
    assert rows["leaky"]["KPS (9)"] == f"{leaky['KPS']:.4f}*"
    assert rows["leaky"]["PS (5)"] == f"{leaky['PS']:.4f}" and rows["leaky"]["IS (7)"] == f"{leaky['IS']:.4f}"
    assert rows["leaky"]["KPS mean"] == f"{leaky['KPS_mean']:.4f}"  # arithmetic means are never marked
    assert rows["leaky"]["clamped PS/IS/KPS"] == "0/0/1"
    assert not any(cell.endswith("*") for cell in rows["clean"].values())
    footnote = table.rstrip("\n").splitlines()[-1]
    assert footnote.startswith("* ") and "leaky KPS: 1 of 3" in footnote and "clean" not in footnote

    assert "*" not in ek.format_table({"clean": clean})  # no clamp: no mark, no footnote


def test_dino_images_are_resized_and_center_cropped_not_squashed():
    from PIL import Image

    # 40 wide x 80 high: red top and bottom quarters, green middle half. Resizing the shorter side to
    # round(32 * 256 / 224) = 37 gives 37 x 74; the central 32 x 32 lies inside the green band.
    image = Image.new("RGB", (40, 80), (255, 0, 0))
    image.paste((0, 255, 0), (0, 20, 40, 60))
    cropped = ek.resize_and_center_crop(image, 32)
    assert cropped.size == (32, 32)
    pixels = np.asarray(cropped, dtype=np.int16)
    assert np.abs(pixels - np.array([0, 255, 0])).max() <= 2  # only green: nothing of the red quarters
    assert ek.resize_and_center_crop(Image.new("RGB", (480, 640)), 224).size == (224, 224)


# ---------------------------------------------------------------------------------------------------------
# Folder mode
# ---------------------------------------------------------------------------------------------------------


def test_folder_mode_matches_open_clip_and_dino_directly(pairs_folder, tiny_clip, tiny_dino, tmp_path):
    import open_clip
    from PIL import Image
    from transformers import ViTImageProcessor, ViTModel

    out = tmp_path / "out"
    metrics = ek.main(["--pairs", str(pairs_folder), "--trigger_token", TRIGGER, "--output_dir", str(out),
                       "--batch_size", "2", *clip_args(tiny_clip, tiny_dino)])
    document = json.loads((out / "metrics.json").read_text())
    assert list(document["adapters"]) == ["same", "diff"]
    assert document["settings"]["clip_model_resolved"] == "tiny-kps-clip"
    assert document["settings"]["clip_pretrained"] == str(tiny_clip[1])
    assert document["settings"]["dino_model"] == str(tiny_dino)
    assert document["adapters"] == json.loads(json.dumps(metrics))

    # The same embeddings computed directly with open_clip and transformers.
    config, checkpoint = tiny_clip
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-kps-clip", pretrained=str(checkpoint))
    model.eval()
    tokenizer = open_clip.get_tokenizer("tiny-kps-clip")
    from torchvision import transforms

    dino = ViTModel.from_pretrained(tiny_dino).eval()
    processor = ViTImageProcessor.from_pretrained(tiny_dino)
    # DINO's evaluation transform for an input size of 32: Resize(round(32 * 256 / 224) = 37), CenterCrop(32).
    dino_crop = transforms.Compose([transforms.Resize(37, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(32)])
    lines = [json.loads(line) for line in pairs_folder.read_text().splitlines()]

    def load(rel):
        return Image.open(pairs_folder.parent / rel).convert("RGB")

    with torch.no_grad():
        for adapter in ("same", "diff"):
            group = [line for line in lines if line["adapter"] == adapter]
            prompts = [line["caption"].replace("sks ", "").replace(" sks", "") for line in group]
            assert prompts[0] == "a photo of teapot"
            text = model.encode_text(tokenizer(prompts)).numpy()
            img = {key: model.encode_image(torch.stack([preprocess(load(line[key])) for line in group])).numpy()
                   for key in ("reference", "with_trigger", "without_trigger")}
            dn = {key: dino(**processor(images=[dino_crop(load(line[key])) for line in group], do_resize=False,
                                        return_tensors="pt")).last_hidden_state[:, 0].numpy()
                  for key in ("reference", "with_trigger", "without_trigger")}
            cos = lambda a, b: np.sum(unit(a) * unit(b), axis=-1)  # noqa: E731
            s_prompt = cos(text, img["with_trigger"])
            s_id = cos(img["reference"], img["with_trigger"])
            s_prev = cos(img["without_trigger"], img["with_trigger"])
            m = document["adapters"][adapter]
            assert m["n"] == 3
            assert m["PS"] == pytest.approx(reference_harmonic_mean(s_prompt)[0], rel=1e-4, abs=1e-6)
            assert m["IS"] == pytest.approx(reference_harmonic_mean(s_id)[0], rel=1e-4, abs=1e-6)
            assert m["KPS"] == pytest.approx(1 - reference_harmonic_mean(s_prev)[0], rel=1e-4, abs=1e-6)
            assert m["clamped"] == {"PS": reference_harmonic_mean(s_prompt)[1],
                                    "IS": reference_harmonic_mean(s_id)[1], "KPS": reference_harmonic_mean(s_prev)[1]}
            assert m["PS_mean"] == pytest.approx(s_prompt.mean(), abs=1e-5)
            assert m["IS_mean"] == pytest.approx(s_id.mean(), abs=1e-5)
            assert m["KPS_mean"] == pytest.approx(1 - s_prev.mean(), abs=1e-5)
            assert m["CLIP-T"] == pytest.approx(s_prompt.mean(), abs=1e-5)
            assert m["CLIP-I"] == pytest.approx(np.mean(unit(img["with_trigger"]) @ unit(img["reference"]).T), abs=1e-5)
            assert m["DINO"] == pytest.approx(np.mean(unit(dn["with_trigger"]) @ unit(dn["reference"]).T), abs=1e-5)
            assert m["PRES"] == pytest.approx(np.mean(unit(dn["without_trigger"]) @ unit(dn["reference"]).T), abs=1e-5)

    # Identical images with and without the trigger: KPS = 0; different images: KPS > 0.
    assert abs(document["adapters"]["same"]["KPS"]) < 1e-6
    assert document["adapters"]["diff"]["KPS"] > 0

    rows = list(csv.DictReader((out / "per_sample.csv").open()))
    assert len(rows) == 6 and {row["adapter"] for row in rows} == {"same", "diff"}
    assert all(row["prompt"] and TRIGGER not in row["prompt"].split() for row in rows)
    table = (out / "table.md").read_text()
    assert [row.split("|")[1].strip() for row in table_rows(table)] == ["same", "diff"]
    assert "KPS (9)" in table
    for adapter in ("same", "diff"):
        assert Image.open(out / f"grid_{adapter}.png").size == (3 * 48, 3 * 48)  # 3 samples of 48 px


def test_folder_mode_without_dino(pairs_folder, tiny_clip, tmp_path):
    config, checkpoint = tiny_clip
    metrics = ek.main(["--pairs", str(pairs_folder), "--trigger_token", TRIGGER, "--output_dir", str(tmp_path),
                       "--clip_model", str(config), "--clip_pretrained", str(checkpoint), "--dino_model", "none"])
    assert metrics["diff"]["DINO"] is None and metrics["diff"]["PRES"] is None
    assert "| diff |" in (tmp_path / "table.md").read_text()


# ---------------------------------------------------------------------------------------------------------
# Generate mode
# ---------------------------------------------------------------------------------------------------------


def test_plan_samples_seeds_are_shared_between_adapters_and_prompts(tmp_path):
    items = [ek.Item("a sks dog", "a dog", tmp_path / "0.png"), ek.Item("sks cat", "cat", tmp_path / "1.png")]
    samples = ek.plan_samples({"x": None, "y": None}, items, num_images_per_prompt=3, seed=10)
    assert [(s.adapter, s.item, s.image, s.seed) for s in samples[:4]] == [
        ("x", 0, 0, 10), ("x", 0, 1, 11), ("x", 0, 2, 12), ("x", 1, 0, 13)]
    assert [s.seed for s in samples if s.adapter == "y"] == [s.seed for s in samples if s.adapter == "x"]
    assert samples[3].caption == "sks cat" and samples[3].prompt == "cat"


def test_generate_mode_two_adapters_and_base_load_pipeline_once(
    monkeypatch, tiny_pipeline, loras, eval_data_dir, tiny_clip, tiny_dino, tmp_path
):
    from diffusers import StableDiffusionPipeline

    calls = []
    original = StableDiffusionPipeline.from_pretrained.__func__

    def counting_from_pretrained(cls, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(counting_from_pretrained))
    out = tmp_path / "gen"
    metrics = ek.main([
        "--pretrained_model_name_or_path", str(tiny_pipeline), "--eval_data_dir", str(eval_data_dir),
        "--trigger_token", TRIGGER, "--lora", f"a={loras['a']}",
        "--lora", f"b={loras['b'] / 'pytorch_lora_weights.safetensors'}", "--lora", "base=none",
        "--num_images_per_prompt", "1", "--num_inference_steps", "4", "--resolution", "32",
        "--guidance_scale", "1", "--batch_size", "3", "--seed", "7", "--output_dir", str(out),
        *clip_args(tiny_clip, tiny_dino),
    ])
    assert calls == [str(tiny_pipeline)]  # the base pipeline is loaded once for all three adapters
    assert list(metrics) == ["a", "b", "base"]
    assert all(m["n"] == 2 for m in metrics.values())
    document = json.loads((out / "metrics.json").read_text())
    settings = document["settings"]
    assert settings["num_inference_steps"] == 4 and settings["seed"] == 7 and settings["mode"] == "generate"
    assert settings["lora"]["base"] is None and settings["lora"]["a"].endswith("pytorch_lora_weights.safetensors")

    from PIL import Image

    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 6
    first = {p["adapter"]: p for p in pairs if p["with_trigger"].endswith("0000_00_T.png")}
    images = {a: np.asarray(Image.open(out / first[a]["with_trigger"]), dtype=np.float32) for a in first}
    assert images["a"].shape == (32, 32, 3)
    assert np.abs(images["a"] - images["base"]).mean() > 0.1  # the LoRA was applied ...
    assert np.abs(images["a"] - images["b"]).mean() > 0.1  # ... and swapped for the next one
    rows = list(csv.DictReader((out / "per_sample.csv").open()))
    assert [int(r["seed"]) for r in rows if r["adapter"] == "a"] == [7, 8]  # the same seeds for every adapter
    assert [int(r["seed"]) for r in rows if r["adapter"] == "base"] == [7, 8]
    assert Image.open(out / "grid_b.png").size == (3 * 32, 2 * 32)
    # comparison.png: a row per adapter in the given order, its samples with the trigger | the same without it
    comparison = np.asarray(Image.open(out / "comparison.png").convert("RGB"), dtype=np.float32)
    tile, n = 64, 2
    for row, adapter in enumerate(["a", "b", "base"]):
        for column, pair in enumerate(p for p in pairs if p["adapter"] == adapter):
            for key, left in (("with_trigger", ek.COMPARISON_LABEL_WIDTH),
                              ("without_trigger", ek.COMPARISON_LABEL_WIDTH + n * tile + ek.COMPARISON_GAP)):
                top, left = ek.COMPARISON_HEADER + row * tile, left + column * tile
                cell = comparison[top:top + tile, left:left + tile]
                image = np.asarray(Image.open(out / pair[key]).convert("RGB"), dtype=np.float32)
                assert np.array_equal(cell[::2, ::2], image), (adapter, column, key)  # 32 px drawn at 64

    # Folder mode on the saved images reproduces the numbers.
    rescored = ek.main(["--pairs", str(out / "pairs.jsonl"), "--trigger_token", TRIGGER,
                        "--output_dir", str(tmp_path / "rescored"), *clip_args(tiny_clip, tiny_dino)])
    for adapter in metrics:
        for key in ("PS", "IS", "KPS", "CLIP-I", "DINO", "PRES"):
            assert rescored[adapter][key] == pytest.approx(metrics[adapter][key], abs=1e-5)


def test_generate_mode_eval_prompts_prints_the_table_of_metrics_json(
    tiny_pipeline, loras, tiny_clip, tiny_dino, tmp_path, capsys
):
    prompts = tmp_path / "prompts.jsonl"
    save_image(tmp_path / "refs" / "0.png", 600)
    save_image(tmp_path / "refs" / "1.png", 601, size=40)
    prompts.write_text(json.dumps({"caption": "a photo of sks teapot", "reference": "refs/0.png"}) + "\n"
                       + json.dumps({"caption": "sks teapot on a beach", "reference": "refs/1.png"}) + "\n")
    out = tmp_path / "gen"
    capsys.readouterr()
    ek.main([
        "--pretrained_model_name_or_path", str(tiny_pipeline), "--eval_prompts", str(prompts),
        "--trigger_token", TRIGGER, "--lora", f"cat.v1={loras['a']}", "--lora", "base=none",
        "--num_inference_steps", "2", "--resolution", "32", "--guidance_scale", "1", "--batch_size", "4",
        "--output_dir", str(out), *clip_args(tiny_clip, tiny_dino),
    ])
    printed = capsys.readouterr().out
    document = json.loads((out / "metrics.json").read_text())
    assert document["settings"]["eval_prompts"] == str(prompts)
    table = (out / "table.md").read_text()
    assert table in printed  # the printed table is the one written to table.md

    titles = table_cells(table.splitlines()[0])
    rows = [dict(zip(titles, table_cells(row))) for row in table_rows(printed)]
    assert [row["Method"] for row in rows] == ["cat.v1", "base"]  # one row per adapter, in --lora order; '.' is allowed
    for row in rows:
        m = document["adapters"][row["Method"]]
        assert int(row["n"]) == m["n"] == 2
        for title, key in ek.TABLE_COLUMNS:
            mark = "*" if m["clamped"].get(key, 0) else ""
            assert row[title] == f"{m[key]:.4f}{mark}", (row["Method"], title)
        assert row["clamped PS/IS/KPS"] == "/".join(str(m["clamped"][key]) for key in ("PS", "IS", "KPS"))
    # The rounding in the table is the only difference from metrics.json.
    assert float(rows[0]["KPS (9)"].rstrip("*")) == pytest.approx(document["adapters"]["cat.v1"]["KPS"], abs=5e-5)
    assert (out / "grid_cat.v1.png").is_file() and (out / "grid_base.png").is_file()


def test_sdxl_adapters_are_scored_on_one_base_pipeline(monkeypatch, tiny_sdxl_pipeline, instance_dir,
                                                       eval_data_dir, tiny_clip, tiny_dino, tmp_path):
    """An SDXL LoRA with text-encoder layers (both CLIPs), scored beside the base model, the pipeline loaded once."""
    from conftest import run_train_cat_lora, train_args
    from diffusers import StableDiffusionXLPipeline

    lora = tmp_path / "sdxl-lora"
    run_train_cat_lora(train_args(tiny_sdxl_pipeline, instance_dir, lora, "--train_text_encoder",
                                  "--learning_rate", "1e-2", steps=3))
    calls = []
    original = StableDiffusionXLPipeline.from_pretrained.__func__
    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", classmethod(
        lambda cls, *args, **kwargs: calls.append(1) or original(cls, *args, **kwargs)))
    out = tmp_path / "gen"
    metrics = ek.main([
        "--pretrained_model_name_or_path", str(tiny_sdxl_pipeline), "--eval_data_dir", str(eval_data_dir),
        "--trigger_token", TRIGGER, "--lora", f"cat={lora}", "--lora", "base=none", "--num_images_per_prompt", "1",
        "--num_inference_steps", "2", "--resolution", "32", "--guidance_scale", "1", "--output_dir", str(out),
        *clip_args(tiny_clip, tiny_dino),
    ])
    assert calls == [1] and list(metrics) == ["cat", "base"]
    from PIL import Image

    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    first = {p["adapter"]: np.asarray(Image.open(out / p["with_trigger"]), dtype=np.float32)
             for p in pairs if p["with_trigger"].endswith("0000_00_T.png")}
    assert np.abs(first["cat"] - first["base"]).mean() > 0.1  # the SDXL LoRA was applied


def test_flux_adapters_are_scored_with_the_distilled_guidance_value(tiny_flux_pipeline, instance_dir, eval_data_dir,
                                                                   tiny_clip, tiny_dino, tmp_path):
    """A Flux LoRA (transformer and CLIP layers) scored beside the base model: --guidance_scale reaches the
    transformer's guidance embedding as the value itself (Flux.1-dev is guidance-distilled: no second pass)."""
    from conftest import run_train_cat_lora, train_args
    from diffusers.models.embeddings import CombinedTimestepGuidanceTextProjEmbeddings

    lora = tmp_path / "flux-lora"
    run_train_cat_lora(train_args(tiny_flux_pipeline, instance_dir, lora, "--train_text_encoder",
                                  "--learning_rate", "1e-2", steps=3))
    out = tmp_path / "gen"
    seen = []  # the guidance argument of every call of the transformer's timestep + guidance embedding
    handle_hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: seen.append(args[1].tolist())
        if isinstance(module, CombinedTimestepGuidanceTextProjEmbeddings) else None)
    try:
        metrics = ek.main([
            "--pretrained_model_name_or_path", str(tiny_flux_pipeline), "--eval_data_dir", str(eval_data_dir),
            "--trigger_token", TRIGGER, "--lora", f"cat={lora}", "--lora", "base=none", "--num_images_per_prompt",
            "1", "--num_inference_steps", "2", "--resolution", "32", "--guidance_scale", "2.5", "--batch_size", "2",
            "--output_dir", str(out), *clip_args(tiny_clip, tiny_dino),
        ])
    finally:
        handle_hook.remove()
    assert list(metrics) == ["cat", "base"]
    # The transformer scales the guidance value by 1000 (as it does sigma) before embedding it.
    assert seen and all(value == [2500.0] * len(value) for value in seen)
    assert len(seen) == 2 * 2 * 2  # 2 adapters x 2 batches (with and without trigger) x 2 steps: one pass per step
    from PIL import Image

    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    first = {p["adapter"]: np.asarray(Image.open(out / p["with_trigger"]), dtype=np.float32)
             for p in pairs if p["with_trigger"].endswith("0000_00_T.png")}
    assert np.abs(first["cat"] - first["base"]).mean() > 0.1  # the Flux LoRA was applied


def test_pivotal_and_textual_inversion_adapters_prompt_with_their_new_tokens(tiny_pipeline, instance_dir,
                                                                             eval_data_dir, tiny_clip, tmp_path):
    """An adapter folder with embeddings (--train_text_encoder_ti) is scored with the trigger replaced by its new
    tokens in y_T, never in y; they are removed after it, so the base model evaluated next has none."""
    from conftest import run_train_cat_lora, train_args

    folders = {"pivotal": tmp_path / "pivotal", "ti": tmp_path / "ti"}
    for name, extra in (("pivotal", []), ("ti", ["--train_transformer_frac", "0", "--cat_alpha", "0"])):
        run_train_cat_lora(train_args(tiny_pipeline, instance_dir, folders[name], "--train_text_encoder_ti",
                                      "--token_abstraction", TRIGGER, *extra, steps=2))
    assert not (folders["ti"] / "pytorch_lora_weights.safetensors").exists()  # textual inversion alone: no LoRA
    passes = []  # per text-encoder pass: (rows of the token table, per prompt: does it hold a new token?)

    def watch_token_ids(module, inputs):
        if isinstance(module, torch.nn.Embedding) and module.num_embeddings >= BASE_VOCAB:
            passes.append((module.num_embeddings, [bool((row >= BASE_VOCAB).any()) for row in inputs[0]]))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(watch_token_ids)
    try:
        metrics = ek.main([
            "--pretrained_model_name_or_path", str(tiny_pipeline), "--eval_data_dir", str(eval_data_dir),
            "--trigger_token", TRIGGER, "--lora", f"pivotal={folders['pivotal']}", "--lora", f"ti={folders['ti']}",
            "--lora", "base=none", "--num_images_per_prompt", "1", "--num_inference_steps", "2", "--resolution", "32",
            "--guidance_scale", "1", "--batch_size", "2", "--output_dir", str(tmp_path / "eval"),
            "--clip_model", str(tiny_clip[0]), "--clip_pretrained", str(tiny_clip[1]), "--dino_model", "none",
        ])
    finally:
        handle.remove()
    assert list(metrics) == ["pivotal", "ti", "base"]
    # Each batch is one sample's y_T then its y (2 items: 2 batches per adapter); 2 new tokens, <s0><s1>. Then the
    # judge's text tower (also a 49,408-row table) encodes the prompts.
    assert passes[:6] == [(BASE_VOCAB + 2, [True, False])] * 4 + [(BASE_VOCAB, [False, False])] * 2
    assert all(rows == BASE_VOCAB for rows, _ in passes[6:])
    settings = json.loads((tmp_path / "eval" / "metrics.json").read_text())["settings"]["lora"]
    assert settings["ti"].endswith("ti_emb.safetensors") and "pytorch_lora_weights" in settings["pivotal"]


def test_load_adapter_keeps_saved_lora_config_and_unloads(tiny_pipeline, loras):
    pipe = ek.load_pipeline(T.model_family(Namespace(pretrained_model_name_or_path=str(tiny_pipeline))))
    ek.load_lora(pipe, "a", loras["a"] / "pytorch_lora_weights.safetensors")
    assert pipe.get_list_adapters() == {"unet": ["a"]}
    assert pipe.unet.peft_config["a"].lora_alpha == LORA_ALPHA and pipe.unet.peft_config["a"].r == 4
    pipe.unload_lora_weights()
    assert not any("lora" in key for key, _ in pipe.unet.named_parameters())


# ---------------------------------------------------------------------------------------------------------
# Input errors: one line naming the file or flag, exit status 2, nothing written
# ---------------------------------------------------------------------------------------------------------


def check_error_output(returncode, stderr, out):
    assert returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("evaluate_kps.py: error:")]
    assert len(errors) == 1, stderr
    assert not out.exists()  # nothing half-written
    return errors[0]


def run_cli(args, tmp_path):
    """Run the script in a fresh process; return its one error line (asserting exit status 2)."""
    out = tmp_path / "never"
    result = subprocess.run([PYTHON, str(REPO / "evaluate_kps.py"), *args, "--output_dir", str(out)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return check_error_output(result.returncode, result.stderr, out)


@pytest.fixture
def run_script(tmp_path, capsys, monkeypatch):
    """Run the script's ``__main__`` block in this process (imports paid once); return its error line."""

    def run(args):
        out = tmp_path / "never"
        monkeypatch.setattr(sys, "argv", ["evaluate_kps.py", *args, "--output_dir", str(out)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / "evaluate_kps.py"), run_name="__main__")
        return check_error_output(exit_info.value.code, capsys.readouterr().err, out)

    return run


def test_error_missing_image_in_pairs(pairs_folder, tiny_clip, tiny_dino, tmp_path):
    lines = pairs_folder.read_text().splitlines()
    record = json.loads(lines[1])
    record["with_trigger"] = "diff/missing.png"
    bad = pairs_folder.parent / "bad_missing.jsonl"
    bad.write_text("\n".join([lines[0], json.dumps(record)]) + "\n")
    message = run_cli(["--pairs", str(bad), "--trigger_token", TRIGGER, *clip_args(tiny_clip, tiny_dino)], tmp_path)
    assert f"{bad}:2" in message and "missing.png" in message and "not found" in message


def test_error_caption_without_trigger(eval_data_dir, tiny_pipeline, tmp_path, run_script):
    save_image(tmp_path / "ref.png", 1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"caption": "a photo of sks teapot", "reference": "ref.png"}) + "\n"
                       + json.dumps({"caption": "a photo of a teapot", "reference": "ref.png"}) + "\n")
    message = run_script(["--pretrained_model_name_or_path", str(tiny_pipeline), "--eval_prompts", str(prompts),
                          "--lora", "base=none", "--trigger_token", TRIGGER])
    assert f"{prompts}:2" in message and "'sks'" in message


def test_error_caption_without_trigger_in_eval_data_dir(tmp_path, tiny_pipeline):
    folder = tmp_path / "data"
    save_image(folder / "0.png", 3)
    (folder / "0.txt").write_text("a photo of teapot")
    with pytest.raises(InputError, match=r"0\.png: caption 'a photo of teapot' does not contain the trigger"):
        ek.main(["--pretrained_model_name_or_path", str(tiny_pipeline), "--eval_data_dir", str(folder),
                 "--lora", "base=none", "--trigger_token", TRIGGER, "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize("kind", ["shape", "keys"])
def test_error_lora_does_not_fit_base_model(kind, tiny_pipeline, loras, eval_data_dir, tiny_clip, tmp_path,
                                            run_script):
    from safetensors.torch import load_file, save_file

    weights = load_file(loras["a"] / "pytorch_lora_weights.safetensors")
    if kind == "shape":  # e.g. a LoRA trained on another base model
        weights = {key: torch.zeros(value.shape[0] + 1, value.shape[1]) for key, value in weights.items()}
    else:  # half of the layers do not exist in this model
        weights = {key.replace("attn1", "attn9"): value for key, value in weights.items()}
    bad = tmp_path / f"bad_{kind}.safetensors"
    save_file(weights, bad)
    args = ["--pretrained_model_name_or_path", str(tiny_pipeline), "--eval_data_dir", str(eval_data_dir),
            "--lora", f"a={loras['a']}", "--lora", f"bad={bad}", "--trigger_token", TRIGGER,
            "--clip_model", str(tiny_clip[0]), "--clip_pretrained", str(tiny_clip[1])]
    message = run_script(args)
    assert f"--lora bad={bad}" in message and "does not fit the base model" in message
    if kind == "keys":
        assert "match no layer" in message


def test_error_unknown_clip_model(pairs_folder, run_script):
    message = run_script(["--pairs", str(pairs_folder), "--trigger_token", TRIGGER, "--clip_model", "ViT-Q-99"])
    assert "--clip_model ViT-Q-99" in message and "unknown open_clip model" in message


def test_error_vit_l_14_with_openai_weights_is_refused(pairs_folder, run_script):
    with pytest.raises(InputError, match=r"--clip_model ViT-L-14 .*use ViT-L-14-quickgelu"):
        ek.resolve_clip_choice("ViT-L-14", "openai")
    assert ek.resolve_clip_choice("ViT-L-14-quickgelu", "openai") == "ViT-L-14-quickgelu"
    message = run_script(["--pairs", str(pairs_folder), "--trigger_token", TRIGGER, "--clip_model", "ViT-L-14"])
    assert "quick_gelu" in message


@pytest.mark.parametrize("kind", ["pairs", "prompts", "folder"])
def test_error_empty_evaluation_set(kind, tiny_pipeline, tmp_path, run_script):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    (tmp_path / "emptydir").mkdir()
    if kind == "pairs":
        message = run_script(["--pairs", str(empty), "--trigger_token", TRIGGER])
        assert f"--pairs {empty}: empty evaluation set" in message
        return
    source = ["--eval_prompts", str(empty)] if kind == "prompts" else ["--eval_data_dir", str(tmp_path / "emptydir")]
    with pytest.raises(InputError) as caught:
        ek.main(["--pretrained_model_name_or_path", str(tiny_pipeline), *source, "--lora", "base=none",
                 "--trigger_token", TRIGGER, "--output_dir", str(tmp_path / "out")])
    assert ("empty evaluation set" if kind == "prompts" else "no image files") in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_error_lora_spec(tiny_pipeline, eval_data_dir, tmp_path):
    base = ["--pretrained_model_name_or_path", str(tiny_pipeline), "--eval_data_dir", str(eval_data_dir),
            "--trigger_token", TRIGGER, "--output_dir", str(tmp_path / "out")]
    for spec, expected in [("nopath", "expected NAME=PATH"), (f"x={tmp_path / 'nope'}", "not found"),
                           (f"x={tmp_path}", "has no pytorch_lora_weights.safetensors")]:
        with pytest.raises(InputError, match=expected):
            ek.main([*base, "--lora", spec])
    with pytest.raises(InputError, match="used twice"):
        ek.main([*base, "--lora", "x=none", "--lora", "x=none"])


def test_argument_errors_exit_2(tmp_path):
    result = subprocess.run([PYTHON, str(REPO / "evaluate_kps.py"), "--trigger_token", TRIGGER,
                             "--output_dir", str(tmp_path / "o"), "--eval_data_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--pretrained_model_name_or_path" in result.stderr.strip().splitlines()[-1]


def test_paper_scores_helper_matches_folder_mode(pairs_folder, tiny_clip, tiny_dino, tmp_path):
    """The helper the training script can call gives the numbers of a full run."""
    import warnings

    from PIL import Image

    config, checkpoint = tiny_clip
    metrics = ek.main(["--pairs", str(pairs_folder), "--trigger_token", TRIGGER, "--output_dir", str(tmp_path),
                       "--clip_model", str(config), "--clip_pretrained", str(checkpoint), "--dino_model", "none"])
    clip = ek.load_clip(str(config), str(checkpoint), "cpu")
    assert not clip.model.training
    group = [json.loads(line) for line in pairs_folder.read_text().splitlines()]
    group = [line for line in group if line["adapter"] == "diff"]

    def load(key):
        return [Image.open(pairs_folder.parent / line[key]) for line in group]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        scores = ek.paper_scores(clip, [ek.strip_trigger(line["caption"], TRIGGER) for line in group],
                                 load("reference"), load("with_trigger"), load("without_trigger"), batch_size=2)
    for key in ("PS", "IS", "KPS", "clamped"):
        assert scores[key] == pytest.approx(metrics["diff"][key], abs=1e-6)


@pytest.mark.slow  # two CPU processes generating and scoring: 28 s
def test_two_processes_give_the_same_metrics_as_one(tiny_pipeline, loras, eval_data_dir, tiny_clip, tiny_dino,
                                                    tmp_path):
    common = ["evaluate_kps.py", "--pretrained_model_name_or_path", str(tiny_pipeline), "--eval_data_dir",
              str(eval_data_dir), "--trigger_token", TRIGGER, "--lora", f"a={loras['a']}", "--lora", "base=none",
              "--num_images_per_prompt", "2", "--num_inference_steps", "3", "--resolution", "32",
              "--guidance_scale", "1", "--batch_size", "2", "--seed", "3", *clip_args(tiny_clip, tiny_dino)]
    # One thread in every process of both runs: the same computation, so the same numbers. CPU kernels sum in
    # an order that depends on the thread count (1 vs 2 threads: generated pixels differ by up to 5e-7, which
    # flips an 8-bit pixel now and then and moves a tiny DINO's score by 1e-5).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([PYTHON, *common, "--output_dir", str(tmp_path / "one")], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          *common, "--output_dir", str(tmp_path / "two")], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())["adapters"]
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())["adapters"]
    assert a.keys() == b.keys() == {"a", "base"}
    for adapter in a:
        for metric in ("n", "PS", "IS", "KPS", "PS_mean", "IS_mean", "KPS_mean", "CLIP-T", "CLIP-I", "DINO", "PRES"):
            assert a[adapter][metric] == pytest.approx(b[adapter][metric], abs=1e-5), (adapter, metric)
    # Every (adapter, item, image) drawn exactly once, with the same seed and scores, whichever process drew it.
    runs = [{(r["adapter"], r["item"], r["image"]): r for r in csv.DictReader((tmp_path / run / "per_sample.csv").open())}
            for run in ("one", "two")]
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) == 8  # 2 adapters x 2 items x 2 images
    for key, row in runs[0].items():
        assert row["seed"] == runs[1][key]["seed"]
        for score in ("s_prompt", "s_id", "s_prev", "dino_id", "dino_pres"):
            assert float(row[score]) == pytest.approx(float(runs[1][key][score]), abs=1e-5), (key, score)


@pytest.mark.parametrize("family", ["sd3", "qwenimage", "zimage", "flux2_klein"])
def test_adapters_of_the_transformer_families_are_scored(family, request, instance_dir, eval_data_dir, tiny_clip,
                                                         tiny_dino, tmp_path):
    """A LoRA trained on SD3, Qwen-Image, Z-Image or FLUX.2 [klein] loads into its pipeline and is scored beside the
    base model; the images with it differ from the base model's."""
    from conftest import FAMILY_FIXTURES, offered, run_train_cat_lora, train_args
    from PIL import Image

    pipeline = request.getfixturevalue(FAMILY_FIXTURES[family])
    lora = tmp_path / "lora"
    run_train_cat_lora(train_args(pipeline, instance_dir, lora, *offered(pipeline, "--train_text_encoder"),
                                  "--learning_rate", "1e-2", steps=3))
    out = tmp_path / "gen"
    metrics = ek.main([
        "--pretrained_model_name_or_path", str(pipeline), "--eval_data_dir", str(eval_data_dir),
        "--trigger_token", TRIGGER, "--lora", f"cat={lora}", "--lora", "base=none", "--num_images_per_prompt", "1",
        "--num_inference_steps", "2", "--resolution", "32", "--guidance_scale", "1", "--batch_size", "2",
        "--output_dir", str(out), *clip_args(tiny_clip, tiny_dino),
    ])
    assert list(metrics) == ["cat", "base"]
    assert all(np.isfinite(value) for scores in metrics.values() for value in scores.values()
               if isinstance(value, float))
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    first = {p["adapter"]: np.asarray(Image.open(out / p["with_trigger"]), dtype=np.float32)
             for p in pairs if p["with_trigger"].endswith("0000_00_T.png")}
    assert np.abs(first["cat"] - first["base"]).max() > 0  # the LoRA was applied


# ---------------------------------------------------------------------------------------------------------
# CLIP-I masked (--masks, --segmenter)
# ---------------------------------------------------------------------------------------------------------


def save_mask(path: Path, seed: int, size: int) -> np.ndarray:
    """A random rectangle of white on black (the subject), saved as a PNG; returns it as a boolean array."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, size // 2, size=2)
    bottom, right = rng.integers(size // 2 + 4, size, size=2)
    mask = np.zeros((size, size), dtype=bool)
    mask[top:bottom, left:right] = True
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return mask


@pytest.fixture(scope="session")
def masked_pairs(tmp_path_factory):
    """(pairs file, masks folder, {image path relative to the pairs file: mask}): two adapters, two references,
    one image a JPEG (its mask is still a .png)."""
    folder = tmp_path_factory.mktemp("masked_pairs")
    masks_dir = folder / "masks"
    lines, masks = [], {}
    for i in range(2):
        masks[f"ref/{i}.png"] = None
        for adapter in ("a", "b"):
            suffix = ".jpg" if (adapter, i) == ("b", 1) else ".png"
            lines.append({"adapter": adapter, "caption": f"a photo of sks teapot {i}", "reference": f"ref/{i}.png",
                          "with_trigger": f"{adapter}/{i}_T{suffix}", "without_trigger": f"{adapter}/{i}.png"})
            masks[f"{adapter}/{i}_T{suffix}"] = None
            save_image(folder / adapter / f"{i}.png", 700 + i)
    for seed, relative in enumerate(masks):
        save_image(folder / relative, 600 + seed, size=40)
        masks[relative] = save_mask(masks_dir / Path(relative).with_suffix(".png"), seed, 40)
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return pairs, masks_dir, masks


def test_clip_i_masked_is_the_pairwise_mean_over_masked_images_embedded_by_hand(masked_pairs, tiny_clip, tmp_path):
    import open_clip
    from PIL import Image

    pairs, masks_dir, masks = masked_pairs
    config, checkpoint = tiny_clip
    flags = ["--pairs", str(pairs), "--trigger_token", TRIGGER, "--clip_model", str(config),
             "--clip_pretrained", str(checkpoint), "--dino_model", "none"]
    metrics = ek.main([*flags, "--masks", str(masks_dir), "--output_dir", str(tmp_path / "masked")])

    model, _, preprocess = open_clip.create_model_and_transforms("tiny-kps-clip", pretrained=str(checkpoint))
    model.eval()

    def embed(relatives):
        images = []
        for relative in relatives:
            pixels = np.asarray(Image.open(pairs.parent / relative).convert("RGB"))
            masked = np.where(masks[relative][..., None], pixels, np.uint8(128))  # gray outside the subject
            images.append(preprocess(Image.fromarray(masked)))
        with torch.no_grad():
            return unit(model.encode_image(torch.stack(images)).numpy())

    lines = [json.loads(line) for line in pairs.read_text().splitlines()]
    for adapter in ("a", "b"):
        group = [line for line in lines if line["adapter"] == adapter]
        expected = np.mean(embed([line["with_trigger"] for line in group]) @ embed(["ref/0.png", "ref/1.png"]).T)
        assert metrics[adapter]["CLIP-I_masked"] == pytest.approx(expected, abs=1e-5)
        assert abs(metrics[adapter]["CLIP-I_masked"] - metrics[adapter]["CLIP-I"]) > 1e-3  # the masks mattered
        assert metrics[adapter]["empty_masks"] == 0
    document = json.loads((tmp_path / "masked" / "metrics.json").read_text())
    assert document["settings"]["masks"] == str(masks_dir) and document["settings"]["mask_fill"] == [128, 128, 128]
    table = (tmp_path / "masked" / "table.md").read_text()
    header, *rows = [line for line in table.splitlines() if line.startswith("| ")]
    column = table_cells(header).index("CLIP-I masked")
    assert table_cells(header)[column - 1] == "CLIP-I"  # beside CLIP-I
    assert table_cells(rows[0])[0] == "a"
    assert float(table_cells(rows[0])[column]) == pytest.approx(metrics["a"]["CLIP-I_masked"], abs=1e-4)
    assert Image.open(tmp_path / "masked" / "masked_a.png").size == (2 * 40, 2 * 40)

    # Without masks nothing changes: no column, no key, no setting, no picture.
    plain = ek.main([*flags, "--output_dir", str(tmp_path / "plain")])
    for adapter in ("a", "b"):
        assert plain[adapter] == {key: value for key, value in metrics[adapter].items()
                                  if key not in ("CLIP-I_masked", "empty_masks")}
    assert "masked" not in (tmp_path / "plain" / "table.md").read_text()
    settings = json.loads((tmp_path / "plain" / "metrics.json").read_text())["settings"]
    assert not {"masks", "segmenter", "mask_fill"} & set(settings)
    assert not list((tmp_path / "plain").glob("masked_*"))


def test_border_segmenter_finds_the_subject_the_toy_world_painted():
    """Every shape x color x background x size of the toy world and every personal concept, painted at random places:
    the segmented pixels against the painter's own (at least half covered by the shape)."""
    import make_concepts
    import world
    from PIL import Image

    def painted(shape, cx, cy, extent, size=32):
        res = size * world.SUPERSAMPLE
        coverage = world.shape_mask(shape, cx, cy, extent, res).reshape(size, res // size, size, res // size)
        return coverage.mean(axis=(1, 3)) >= 0.5

    rng = np.random.default_rng(0)
    cases = []
    for shape in world.SHAPES:
        for color in world.COLORS:
            for background in world.BACKGROUNDS:
                for size, extent in world.SIZES.items():
                    cx, cy = rng.uniform(0.35, 0.65, size=2)
                    image = world.render(world.Scene(shape, color, size, background, cx, cy))
                    cases.append((f"{size} {color} {shape} on {background}", image, painted(shape, cx, cy, extent)))
    for trigger, shape, pattern, backgrounds in make_concepts.CONCEPTS:
        for background in backgrounds:
            cx, cy = rng.uniform(0.4, 0.6, size=2)
            image = make_concepts.render_concept(shape, pattern, background, cx, cy, 0.62)
            cases.append((f"{trigger} {shape} on {background}", image, painted(shape, cx, cy, 0.62)))
    for name, image, truth in cases:
        found = ek.border_mask(Image.fromarray(image))
        assert (found & truth).sum() / (found | truth).sum() >= 0.95, name


def test_masked_clip_i_helper_with_the_border_segmenter_is_the_scripts_column(tmp_path, tiny_clip):
    """The function other scripts call gives the column of --segmenter border; a generated image in which the
    segmenter finds nothing is scored (as a gray image) and counted."""
    import world
    from PIL import Image

    images = {}
    for n, (shape, color, background) in enumerate([("circle", "red", "gray"), ("square", "blue", "black"),
                                                    ("cross", "green", "white"), ("circle", "red", "black")]):
        images[f"{n}.png"] = Image.fromarray(world.render(world.Scene(shape, color, "large", background, 0.5, 0.5)))
    images["4.png"] = Image.new("RGB", (32, 32), world.BACKGROUNDS["white"])  # nothing drawn
    for name, image in images.items():
        image.save(tmp_path / name)
    generated = (1, 2, 3, 4)
    lines = [{"adapter": "a", "caption": "a sks circle", "reference": "0.png", "with_trigger": f"{n}.png",
              "without_trigger": f"{n}.png"} for n in generated]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    config, checkpoint = tiny_clip
    metrics = ek.main(["--pairs", str(tmp_path / "pairs.jsonl"), "--trigger_token", TRIGGER, "--segmenter", "border",
                       "--clip_model", str(config), "--clip_pretrained", str(checkpoint), "--dino_model", "none",
                       "--output_dir", str(tmp_path / "out")])
    clip = ek.load_clip(str(config), str(checkpoint), "cpu")
    helper = ek.masked_clip_i(clip, [images["0.png"]], [images[f"{n}.png"] for n in generated])
    assert metrics["a"]["CLIP-I_masked"] == pytest.approx(helper, abs=1e-6)
    assert metrics["a"]["empty_masks"] == 1
    unmasked = ek.masked_clip_i(clip, [images["0.png"]], [images[f"{n}.png"] for n in generated],
                                [np.ones((32, 32), bool)], [np.ones((32, 32), bool)] * len(generated))
    assert unmasked == pytest.approx(metrics["a"]["CLIP-I"], abs=1e-5)  # all-subject masks: plain CLIP-I
    assert abs(helper - unmasked) > 1e-3


@pytest.mark.parametrize("problem", ["missing", "size", "empty", "outside", "no_subject", "no_folder", "generate"])
def test_error_bad_mask_one_line_before_any_model(problem, masked_pairs, tmp_path, run_script):
    """Each bad mask stops with one line naming it, before CLIP is loaded: the CLIP checkpoint given here does not
    exist, so an error about masks shows they were checked first."""
    from PIL import Image

    pairs, masks_dir, _ = masked_pairs
    masks = tmp_path / "masks"
    import shutil

    shutil.copytree(masks_dir, masks)
    flags = ["--pairs", str(pairs), "--masks", str(masks)]
    if problem == "missing":
        (masks / "a" / "1_T.png").unlink()
        expected = ["--masks", "no mask", str(masks / "a" / "1_T.png")]
    elif problem == "size":
        Image.new("L", (20, 40), 255).save(masks / "ref" / "0.png")
        expected = ["--masks", str(masks / "ref" / "0.png"), "20x40", "40x40"]
    elif problem == "empty":
        Image.new("L", (40, 40), 0).save(masks / "b" / "0_T.png")
        expected = ["--masks", str(masks / "b" / "0_T.png"), "empty"]
    elif problem == "outside":
        outside = pairs.parent / "sub" / "pairs.jsonl"
        outside.parent.mkdir(exist_ok=True)
        outside.write_text(pairs.read_text().replace('"ref/', '"../ref/').replace('"a/', '"../a/')
                           .replace('"b/', '"../b/'))
        flags = ["--pairs", str(outside), "--masks", str(masks)]
        expected = ["--masks", "outside the folder of --pairs"]
    elif problem == "no_subject":  # a reference in which the segmenter finds nothing is bad input
        flat = tmp_path / "flat"
        flat.mkdir()
        Image.new("RGB", (32, 32), (128, 128, 128)).save(flat / "ref.png")
        (flat / "pairs.jsonl").write_text(json.dumps({"adapter": "a", "caption": "a sks circle", "reference": "ref.png",
                                                      "with_trigger": "ref.png", "without_trigger": "ref.png"}) + "\n")
        flags = ["--pairs", str(flat / "pairs.jsonl"), "--segmenter", "border"]
        expected = [str(flat / "ref.png"), "finds no subject"]
    elif problem == "no_folder":
        flags = ["--pairs", str(pairs), "--masks", str(tmp_path / "no_such_masks")]
        expected = ["--masks", "no_such_masks", "no such folder"]
    else:  # generated images have no mask files
        flags = ["--eval_data_dir", str(tmp_path), "--pretrained_model_name_or_path", str(tmp_path), "--lora",
                 "base=none", "--masks", str(masks)]
        expected = ["--masks is for folder mode", "--segmenter"]
    message = run_script([*flags, "--trigger_token", TRIGGER, "--clip_model", "ViT-B-32",
                          "--clip_pretrained", str(tmp_path / "no_such_clip.pt"), "--dino_model", "none"])
    assert all(part in message for part in expected), message
