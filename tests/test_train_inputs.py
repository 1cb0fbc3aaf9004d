"""train_cat_lora.py's data paths (captions, datasets, concepts lists, class images) and its bad-input errors."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, draw_subject, train_args
from PIL import Image

import train_cat_lora as T


def args_for(*argv):
    return T.parse_args(["--pretrained_model_name_or_path", "unused", *argv])


# ----------------------------------------------------------------------------- captions and concepts


def test_captions_from_txt_files_and_metadata_jsonl(tmp_path):
    for i in range(3):
        draw_subject(tmp_path / f"{i}.png", shift=i)
    (tmp_path / "0.txt").write_text("a photo of sks teapot on a table\n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "1.png", "text": "sks, a teapot"}) + "\n")
    pairs = T.load_image_caption_pairs(tmp_path, default_caption="a sks teapot")
    assert [(p.name, c) for p, c in pairs] == [
        ("0.png", "a photo of sks teapot on a table"), ("1.png", "sks, a teapot"), ("2.png", "a sks teapot")]
    args = args_for("--instance_data_dir", str(tmp_path), "--trigger_token", "sks", "--instance_prompt", "a sks teapot")
    examples = T.collect_instance_examples(args, T.load_concepts(args))
    assert [e.cat_caption for e in examples] == ["a photo of teapot on a table", "a teapot", "a teapot"]


def test_concepts_list_strips_each_samples_own_trigger(tmp_path, tiny_pipeline, run_training):
    for name, color in (("teapot", (200, 30, 30)), ("mug", (30, 160, 30))):
        (tmp_path / name).mkdir()
        for i in range(2):
            draw_subject(tmp_path / name / f"{i}.png", shift=i, color=color)
    concepts = [
        {"instance_data_dir": "teapot", "instance_prompt": "a photo of sks teapot", "trigger_token": "sks",
         "class_word": "teapot"},
        {"instance_data_dir": "mug", "instance_prompt": "a photo of zwx mug", "trigger_token": "zwx",
         "class_word": "mug"},
    ]
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    argv = ["--concepts_list", str(tmp_path / "concepts.json")]
    args = args_for(*argv)
    examples = T.collect_instance_examples(args, T.load_concepts(args))
    assert {(e.caption, e.cat_caption) for e in examples} == {
        ("a photo of sks teapot", "a photo of teapot"), ("a photo of zwx mug", "a photo of mug")}
    args = args_for(*argv, "--cat_prompt", "class")
    examples = T.collect_instance_examples(args, T.load_concepts(args))
    assert {e.cat_caption for e in examples} == {"a photo of teapot teapot", "a photo of mug mug"}

    out = tmp_path / "out"
    base = train_args(tiny_pipeline, tmp_path, out, "--validation_prompt", "sks and zwx on a table",
                      "--num_validation_images", "1", "--num_validation_inference_steps", "2", steps=2)
    cli = base[: base.index("--instance_data_dir")] + base[base.index("--output_dir"):]  # drop the single-concept flags
    run_training(cli + argv)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "`sks`, `zwx`" in card
    assert T.validation_prompts("sks and zwx on a table", ["sks", "zwx"]) == (
        "sks and zwx on a table", "and on a table", False)  # (top, bottom, bottom row with the adapters off)


def test_datasets_source_with_caption_column(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for i in range(2):
        draw_subject(data / f"{i}.png", shift=i)
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"sks teapot number {i}"}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    args = args_for("--dataset_name", str(data), "--caption_column", "text", "--trigger_token", "sks")
    examples = T.collect_instance_examples(args, T.load_concepts(args))
    assert sorted(e.cat_caption for e in examples) == ["teapot number 0", "teapot number 1"]
    assert all(isinstance(e.image, Image.Image) for e in examples)


def test_trigger_warnings(tiny_pipeline, caplog):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer")
    with caplog.at_level(logging.WARNING, logger="train_cat_lora"):
        T.warn_about_triggers(tokenizer, ["sks"])
        assert caplog.records == []
        T.warn_about_triggers(tokenizer, ["dog", "ohwxqz"])
    messages = [r.getMessage() for r in caplog.records]
    assert any("'dog' is a common word" in m for m in messages)
    assert any("'ohwxqz' splits into" in m for m in messages)


# ----------------------------------------------------------------------------- training variants


def test_prior_preservation_generates_class_images_and_v_prediction_trains(tmp_path, instance_dir, run_training):
    from tiny_pipeline import build_tiny_pipeline

    pipeline = build_tiny_pipeline(tmp_path / "tiny-v", prediction_type="v_prediction")
    class_dir = tmp_path / "class"
    out = tmp_path / "out"
    run_training(train_args(pipeline, instance_dir, out, "--with_prior_preservation", "--class_data_dir",
                            str(class_dir), "--class_prompt", "a photo of teapot", "--num_class_images", "3",
                            "--snr_gamma", "5", "--noise_offset", "0.05", "--gradient_accumulation_steps", "2",
                            "--gradient_checkpointing", "--train_text_encoder", "--lr_scheduler", "cosine",
                            "--lr_warmup_steps", "1", "--validation_prompt", "a sks teapot", "--validation_steps",
                            "2", "--num_validation_images", "2", "--num_validation_inference_steps", "2",
                            "--report_to", "tensorboard", steps=2))
    assert len(T.list_images(class_dir)) == 3
    grid = Image.open(out / "validation" / "step-2.png")
    assert grid.size == (2 * 32, 2 * 32)  # two images wide, with- and without-trigger rows
    card = (out / "README.md").read_text()
    for expected in ("Trigger(s): `sks`", "CAT alpha: 1.0", "`strip`", "Steps: 2", "validation/step-2.png"):
        assert expected in card
    logged = tensorboard_tags(out / "logs")
    assert {"loss/loss", "loss/diffusion", "loss/cat", "loss/prior", "lr"} <= logged["scalars"], logged
    assert "validation" in logged["images"], logged


def tensorboard_tags(log_dir: Path) -> dict:
    """The scalar and image tags written in every TensorBoard events file under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {"scalars": set(), "images": set()}
    files = list(log_dir.rglob("events.out.tfevents.*"))
    assert files, f"no events file under {log_dir}"
    for events in files:
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for kind in tags:
            tags[kind].update(accumulator.Tags()[kind])
    return tags


# ----------------------------------------------------------------------------- bad input


def bad_input_cases(tmp_path: Path, instance_dir: Path):
    """(extra flags, flags to drop from the default command line, expected message) per bad input."""
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    draw_subject(corrupt / "good.png", shift=0)
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    draw_subject(uncaptioned / "a.png", shift=0)
    (uncaptioned / "a.txt").write_text("a photo of a teapot")
    latin1_txt = tmp_path / "latin1_txt"
    latin1_txt.mkdir()
    draw_subject(latin1_txt / "a.png", shift=0)
    (latin1_txt / "a.txt").write_bytes("une photo de sks théière".encode("latin-1"))
    latin1_jsonl = tmp_path / "latin1_jsonl"
    latin1_jsonl.mkdir()
    draw_subject(latin1_jsonl / "a.png", shift=0)
    (latin1_jsonl / "metadata.jsonl").write_bytes('{"file_name": "a.png", "text": "sks théière"}'.encode("latin-1"))
    corrupt_class = tmp_path / "corrupt_class"
    corrupt_class.mkdir()
    draw_subject(corrupt_class / "0.png", shift=0, color=(30, 30, 200))
    (corrupt_class / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    prior = ["--with_prior_preservation", "--class_prompt", "a photo of teapot", "--num_class_images", "2"]
    (tmp_path / "bad.json").write_text("[{")
    (tmp_path / "lacking.json").write_text(json.dumps([{"instance_data_dir": str(instance_dir)}]))
    (tmp_path / "typed.json").write_text(json.dumps([
        {"instance_data_dir": str(instance_dir), "instance_prompt": "a photo of sks teapot", "trigger_token": 5}]))
    (tmp_path / "latin1.json").write_bytes(json.dumps([
        {"instance_data_dir": str(instance_dir), "instance_prompt": "a photo of sks théière", "trigger_token": "sks"}],
        ensure_ascii=False).encode("latin-1"))
    concepts = ["--instance_data_dir"]
    return [
        (["--instance_data_dir", str(tmp_path / "missing")], [], "missing: no such folder"),
        (["--instance_data_dir", str(empty)], [], "empty: no image files"),
        (["--instance_data_dir", str(corrupt)], [], "broken.png: cannot read image"),
        (["--instance_data_dir", str(uncaptioned)], [], "a.png: caption 'a photo of a teapot' does not contain"),
        (["--instance_data_dir", str(latin1_txt)], [], "latin1_txt/a.txt: not UTF-8 text"),
        (["--instance_data_dir", str(latin1_jsonl)], [], "latin1_jsonl/metadata.jsonl: not UTF-8 text"),
        (["--class_data_dir", str(corrupt_class), *prior], [], "--class_data_dir: " + str(corrupt_class / "1.png")
         + ": cannot read image"),
        (["--cat_alpha", "-1"], [], "--cat_alpha must be >= 0"),
        (["--cat_alpha", "0.5"], ["--trigger_token"], "--trigger_token is required when --cat_alpha is 0.5"),
        (["--cat_prompt", "class"], [], "--cat_prompt class needs --cat_class_word"),
        (["--resolution", "30"], [], "--resolution must be a positive multiple of 8"),
        (["--resume_from_checkpoint", str(tmp_path / "checkpoint-9")], [], "checkpoint-9: no such checkpoint"),
        (["--checkpoints_total_limit", "0"], [], "--checkpoints_total_limit must be positive"),
        (["--validation_prompt", "a photo of teapot"], [], "--validation_prompt 'a photo of teapot' does not contain"),
        (["--concepts_list", str(tmp_path / "bad.json")], concepts, "bad.json: not valid JSON"),
        (["--concepts_list", str(tmp_path / "lacking.json")], concepts, "entry 0 lacks instance_prompt, trigger_token"),
        (["--concepts_list", str(tmp_path / "typed.json")], concepts,
         "typed.json: entry 0: trigger_token must be a non-empty string, got 5"),
        (["--concepts_list", str(tmp_path / "latin1.json")], concepts, "--concepts_list: " + str(tmp_path / "latin1.json")
         + ": not UTF-8 text"),
    ]


def without_flags(argv: list[str], flags: list[str]) -> list[str]:
    """``argv`` without each of ``flags`` and the value that follows it."""
    argv = list(argv)
    for flag in flags:
        position = argv.index(flag)
        del argv[position:position + 2]
    return argv


def test_each_bad_input_is_one_clear_error_before_anything_is_written(tmp_path, instance_dir, family_pipeline):
    """Every bad input stops with one line, before any model is built (no torch module is even constructed) and
    before anything is written; for every family."""
    import torch

    built = []
    handle = torch.nn.modules.module.register_module_module_registration_hook(lambda *args: built.append(1))
    try:
        for extra, dropped, message in bad_input_cases(tmp_path, instance_dir):
            out = tmp_path / "out"
            argv = without_flags(train_args(family_pipeline, instance_dir, out, *extra), dropped)
            with pytest.raises(T.InputError) as error:
                T.main(argv)
            assert message in str(error.value), (extra, str(error.value))
            assert "\n" not in str(error.value)
            assert not out.exists(), extra
            assert not built, extra
    finally:
        handle.remove()


def test_validation_prompt_of_a_concepts_list_needs_one_of_its_triggers(tmp_path, instance_dir):
    concepts = [{"instance_data_dir": str(instance_dir), "instance_prompt": "a photo of sks teapot",
                 "trigger_token": "sks"},
                {"instance_data_dir": str(instance_dir), "instance_prompt": "a photo of zwx teapot",
                 "trigger_token": "zwx"}]
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    for prompt in ("zwx on a table", "SKS on a table", "sks and zwx"):
        args = args_for("--concepts_list", str(tmp_path / "concepts.json"), "--validation_prompt", prompt)
        T.check_validation_prompt(args.validation_prompt, args.cat_alpha, T.load_concepts(args))
    args = args_for("--concepts_list", str(tmp_path / "concepts.json"), "--validation_prompt", "a teapot")
    with pytest.raises(T.InputError, match="does not contain the trigger 'sks' or 'zwx'"):
        T.check_validation_prompt(args.validation_prompt, args.cat_alpha, T.load_concepts(args))
    T.check_validation_prompt("a teapot", 0.0, T.load_concepts(args))  # no CAT: no trigger needed


def test_class_images_are_checked_and_noted_like_instance_images(tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(class_dir / "a.png")
    Image.new("RGB", (16, 16), "white").save(class_dir / "b.png")
    (class_dir / "c.png").write_bytes(b"not an image")  # beyond --num_class_images 2: never used, never read
    notes = {}
    T.check_class_images(class_dir, 2, 32, notes)
    lines = T.summarize_notes(notes)
    assert any("transparency" in line and "a.png" in line for line in lines), lines
    assert any("smaller than --resolution 32" in line and "b.png" in line for line in lines), lines
    with pytest.raises(T.InputError, match=r"--class_data_dir: .*c\.png: cannot read image"):
        T.check_class_images(class_dir, 3, 32, {})
    T.check_class_images(tmp_path / "not-yet-generated", 3, 32, {})


def test_command_line_error_exits_2_with_one_line(tmp_path, tiny_pipeline, instance_dir):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_cat_lora.py"), *train_args(tiny_pipeline, instance_dir, out, "--cat_alpha", "-0.5")],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "train_cat_lora.py: error: --cat_alpha must be >= 0, got -0.5"
    assert not out.exists()
