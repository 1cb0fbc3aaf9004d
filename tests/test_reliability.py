"""Interruption, bit-exact resume after a signal, hostile input, and several processes."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, draw_subject, families_slow_except, offered, reset_accelerate_state, train_args, watch_forward
from PIL import Image
from safetensors.torch import load_file

import train_cat_lora as T

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "pytorch_lora_weights.safetensors"), load_file(b / "pytorch_lora_weights.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ----------------------------------------------------------------------------- interruption


@pytest.mark.any_device
def test_sigterm_saves_a_checkpoint_and_the_resumed_run_is_bit_identical(family_pipeline, instance_dir, tmp_path,
                                                                          run_training):
    # On cuda, bit-exact because conftest.py turns on deterministic kernels (--device cuda).
    from conftest import denoiser_class

    common = ("--random_flip", "--checkpointing_steps", "100", *offered(family_pipeline, "--train_text_encoder"))
    run_training(train_args(family_pipeline, instance_dir, tmp_path / "full", *common, steps=6))

    calls = []

    def signal_in_third_step(module):
        calls.append(1)
        if len(calls) == 7:  # 3 denoiser passes per CAT step: the first pass of the third optimizer step
            os.kill(os.getpid(), signal.SIGTERM)

    with watch_forward(denoiser_class(family_pipeline), signal_in_third_step), pytest.raises(T.TrainingInterrupted) as stopped:
        run_training(train_args(family_pipeline, instance_dir, tmp_path / "cut", *common, steps=6))
    assert stopped.value.step == 3 and stopped.value.signum == signal.SIGTERM
    assert [p.name for p in T.checkpoint_folders(tmp_path / "cut")] == ["checkpoint-3"]
    assert not (tmp_path / "cut" / "pytorch_lora_weights.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    run_training(train_args(family_pipeline, instance_dir, tmp_path / "cut", *common,
                            "--resume_from_checkpoint", "latest", steps=6))
    assert same_weights(tmp_path / "full", tmp_path / "cut")


def test_a_real_signal_exits_non_zero_with_how_to_resume(tiny_pipeline, instance_dir, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train_cat_lora.py"),
         *train_args(tiny_pipeline, instance_dir, out, "--report_to", "tensorboard", steps=100000)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not list(out.glob("logs/*/events.out.tfevents.*")) and time.time() < deadline:
        time.sleep(0.5)  # the tracker file appears just before the first step
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    assert "interrupted by SIGINT at step" in last_line and "--resume_from_checkpoint latest" in last_line
    step = int(last_line.split("at step ")[1].split(";")[0])
    assert [p.name for p in T.checkpoint_folders(out)] == [f"checkpoint-{step}"]
    assert not list(out.glob(".checkpoint-*"))


def test_a_crash_mid_save_leaves_no_checkpoint_for_latest(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / ".checkpoint-4.partial").mkdir()  # what a crash during save_state leaves behind
    assert [p.name for p in T.checkpoint_folders(tmp_path)] == ["checkpoint-2"]


def test_out_of_disk_during_a_save_is_one_line_and_latest_resumes_from_the_previous_checkpoint(
        tiny_pipeline, instance_dir, tmp_path, monkeypatch, capsys):
    """The second checkpoint's save writes a partial file, then the disk is full (ENOSPC)."""
    import accelerate

    out = tmp_path / "out"
    argv = train_args(tiny_pipeline, instance_dir, out, "--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
                      steps=6)
    original_save_state, original_load_state = accelerate.Accelerator.save_state, accelerate.Accelerator.load_state
    saves, loads = [], []

    def disk_full_on_second_save(self, output_dir=None, **kwargs):
        saves.append(output_dir)
        if len(saves) < 2:
            return original_save_state(self, output_dir, **kwargs)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "optimizer.bin").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(output_dir) / "optimizer.bin"))

    monkeypatch.setattr(accelerate.Accelerator, "save_state", disk_full_on_second_save)
    reset_accelerate_state()
    assert T.cli(argv) == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("train_cat_lora.py:")] == [
        f"train_cat_lora.py: error: could not save {out / 'checkpoint-4'} (No space left on device); the previous "
        "checkpoints are intact. Fix the cause, then run the same command plus --resume_from_checkpoint latest"]
    # --checkpoints_total_limit 1 prunes only after a save succeeded: checkpoint-2 is still there.
    assert [p.name for p in T.checkpoint_folders(out)] == ["checkpoint-2"]
    assert not list(out.glob(".checkpoint-*"))  # the partial folder is removed (and would be ignored)
    assert not (out / "pytorch_lora_weights.safetensors").exists()

    monkeypatch.setattr(accelerate.Accelerator, "save_state", original_save_state)
    monkeypatch.setattr(accelerate.Accelerator, "load_state", lambda self, path, **kw: (
        loads.append(path), original_load_state(self, path, **kw))[1])
    reset_accelerate_state()
    assert T.cli([*argv, "--resume_from_checkpoint", "latest"]) == 0
    assert loads == [str(out / "checkpoint-2")]
    assert [p.name for p in T.checkpoint_folders(out)] == ["checkpoint-4"]
    assert (out / "pytorch_lora_weights.safetensors").is_file()


class RecordingAccelerator:
    """Stands in for the main process of an accelerator: records what the output folder holds at each call."""

    is_main_process = True

    def __init__(self, output_dir: Path):
        self.output_dir, self.events = output_dir, []

    def folders(self) -> list[str]:
        return sorted(p.name for p in self.output_dir.iterdir())

    def save_state(self, path):
        self.events.append(("save_state", self.folders()))
        Path(path).mkdir()
        (Path(path) / "random_states_0.pkl").write_bytes(b"state")

    def wait_for_everyone(self):
        self.events.append(("wait", self.folders()))


def test_save_waits_for_every_process_before_the_rename_and_prunes_after_it(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    accelerator = RecordingAccelerator(tmp_path)
    assert T.save_checkpoint(accelerator, tmp_path, 4, total_limit=1) == tmp_path / "checkpoint-4"
    assert accelerator.events == [
        ("wait", ["checkpoint-2"]),
        ("save_state", ["checkpoint-2"]),
        # the other processes write their random states into the partial folder before it is renamed
        ("wait", [".checkpoint-4.partial", "checkpoint-2"]),
        ("wait", ["checkpoint-4"]),  # renamed, then the old checkpoint pruned
    ]
    assert (tmp_path / "checkpoint-4" / "random_states_0.pkl").is_file()


def test_checkpoints_are_pruned_only_beyond_the_limit():
    folders = [Path(f"checkpoint-{n}") for n in (2, 4, 6)]
    assert T.checkpoints_to_prune(folders, None) == []
    assert T.checkpoints_to_prune(folders, 1) == folders[:2]
    assert T.checkpoints_to_prune(folders, 3) == []
    assert T.checkpoints_to_prune(folders, 5) == []


# ----------------------------------------------------------------------------- hostile input


def hostile_folder(folder: Path) -> dict:
    """One image of each awkward kind, all of the same red subject; returns name -> expected note category."""
    folder.mkdir()
    base = Image.new("RGB", (40, 40), "white")
    base.paste((200, 30, 30), (10, 10, 30, 30))
    base.convert("CMYK").save(folder / "cmyk.jpg")
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.new("L", (40, 40), 0))  # fully transparent: must become white, not black
    rgba.save(folder / "rgba.png")
    sixteen = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(sixteen).save(folder / "gray16.png")
    base.convert("L").save(folder / "gray.png")
    rotated = base.transpose(Image.Transpose.ROTATE_90)  # stored sideways, EXIF says rotate back
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(folder / "exif.jpg", exif=exif.tobytes())
    base.resize((16, 16)).save(folder / "small.png")
    Image.new("RGB", (3000, 2000), "white").save(folder / "large.png")
    return {"cmyk.jpg": "converted from CMYK", "rgba.png": "transparency", "gray16.png": "16-bit",
            "exif.jpg": "EXIF", "small.png": "smaller than --resolution"}


def test_hostile_images_are_converted_and_listed_once(tmp_path):
    expected = hostile_folder(tmp_path / "data")
    args = T.parse_args(["--pretrained_model_name_or_path", "unused", "--instance_data_dir", str(tmp_path / "data"),
                         "--instance_prompt", "a sks teapot", "--trigger_token", "sks", "--resolution", "32"])
    notes = {}
    examples = T.collect_instance_examples(args, T.load_concepts(args), notes)
    assert len(examples) == 7
    lines = T.summarize_notes(notes)
    for name, category in expected.items():
        assert sum(name in line and category in line for line in lines) == 1, (name, lines)
    rgba = T.open_rgb_image(tmp_path / "data" / "rgba.png", "rgba.png")
    assert rgba.getpixel((20, 20)) == (255, 255, 255)
    gray16 = T.open_rgb_image(tmp_path / "data" / "gray16.png", "gray16.png")
    assert gray16.getpixel((0, 0)) == (255, 255, 255) and gray16.getpixel((20, 20))[0] < 100
    upright = T.open_rgb_image(tmp_path / "data" / "exif.jpg", "exif.jpg")
    assert upright.size == (40, 40) and np.asarray(upright)[20, 20, 0] > 150
    dataset = T.make_dataset(examples, [], 32, False, True)
    assert all(dataset[i]["pixel_values"].shape == (3, 32, 32) for i in range(len(examples)))


def _tokenizer():
    from tiny_pipeline import build_clip_tokenizer
    import tempfile

    return build_clip_tokenizer(Path(tempfile.mkdtemp()))


@pytest.mark.parametrize("content, message", [
    (b"", "cannot read image"),
    (b"GIF89a truncated", "cannot read image"),
    ("truncated", "cannot read image"),
    (b"this is a text file with an image name", "cannot read image"),
])
def test_broken_image_files_are_one_clear_error(tmp_path, content, message):
    folder = tmp_path / "data"
    folder.mkdir()
    draw_subject(folder / "good.png", shift=0)
    if content == "truncated":
        draw_subject(tmp_path / "whole.png", shift=1, size=200)
        data = (tmp_path / "whole.png").read_bytes()
        (folder / "bad.png").write_bytes(data[: len(data) // 2])
    else:
        (folder / "bad.png").write_bytes(content)
    args = T.parse_args(["--pretrained_model_name_or_path", "unused", "--instance_data_dir", str(folder),
                         "--instance_prompt", "a sks teapot", "--trigger_token", "sks"])
    with pytest.raises(T.InputError, match=rf"bad\.png: {message}"):
        T.collect_instance_examples(args, T.load_concepts(args))


def test_long_captions_warn_and_a_trigger_past_the_limit_is_an_error():
    tokenizer = _tokenizer()
    long_tail = " ".join(["on a wooden table"] * 30)
    ok = T.Example("a.png", f"a photo of sks teapot {long_tail}", "", "a.png", "sks")
    notes = {}
    T.check_caption_lengths(tokenizer, [ok], notes)
    assert notes == {"with captions truncated to 75 tokens": ["a.png"]}
    cut = T.Example("b.png", f"{long_tail} and sks", "", "b.png", "sks")
    with pytest.raises(T.InputError, match="b.png: the trigger 'sks' falls after"):
        T.check_caption_lengths(tokenizer, [cut], {})


def test_unicode_captions_train(tiny_pipeline, tmp_path, run_training):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        draw_subject(folder / f"{i}.png", shift=i)
        (folder / f"{i}.txt").write_text("une photo de sks théière rouge 🫖 sur la table", encoding="utf-8")
    args = T.parse_args(["--pretrained_model_name_or_path", "unused", "--instance_data_dir", str(folder),
                         "--trigger_token", "sks"])
    assert {e.cat_caption for e in T.collect_instance_examples(args, T.load_concepts(args))} == {
        "une photo de théière rouge 🫖 sur la table"}
    run_training(train_args(tiny_pipeline, folder, tmp_path / "out", steps=1))
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_unwritable_output_folder_is_an_error(tiny_pipeline, instance_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(T.InputError, match="--output_dir .*a_file is not a folder"):
        T.main(train_args(tiny_pipeline, instance_dir, blocker / "out"))
    with pytest.raises(T.InputError, match="--output_dir /proc/cat-lora-out: cannot write in /proc"):
        T.main(train_args(tiny_pipeline, instance_dir, Path("/proc/cat-lora-out")))


# ----------------------------------------------------------------------------- several processes


# Sharding and gradient sync are the script's, not a family's: SD in the default suite, every family with the slow
# tests (15-22 s each on 2 cores).
@pytest.mark.parametrize("family_pipeline", families_slow_except("sd"), indirect=True)
def test_two_processes_match_one_process_with_the_same_global_batch(family_pipeline, instance_dir, tmp_path):
    """2 processes x batch 1 against 1 process x batch 2: same samples, same per-sample noise, same weights.

    Equal weights also show that the processes saw disjoint samples: had both drawn the same image, the
    averaged gradient would differ from the single process's.
    """
    single, double = tmp_path / "single", tmp_path / "double"
    # A large Adam epsilon makes the update proportional to the gradient: float-rounding differences between
    # the two reductions then stay rounding-sized instead of flipping the sign of near-zero updates.
    common = [*offered(family_pipeline, "--train_text_encoder"), "--learning_rate", "1e-1", "--adam_epsilon", "1", "--checkpointing_steps", "2"]
    subprocess.run([sys.executable, str(ROOT / "train_cat_lora.py"),
                    *train_args(family_pipeline, instance_dir, single, *common, steps=4)],
                   check=True, env=ENV, capture_output=True)
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         str(ROOT / "train_cat_lora.py"),
         *train_args(family_pipeline, instance_dir, double, *common, "--train_batch_size", "1", steps=4)],
        env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)  # one thread per process: 2 cores
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("wrote ") == 2  # weights and model card, written once (main process only)
    # Each process saves its own random state: both must be inside the checkpoint when it is renamed into place.
    saved = {p.name for p in (double / "checkpoint-2").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "pytorch_lora_weights.safetensors"} <= saved, saved
    assert not list(double.glob(".checkpoint-*"))
    a = load_file(single / "pytorch_lora_weights.safetensors")
    b = load_file(double / "pytorch_lora_weights.safetensors")
    initial = {k: v for k, v in load_file(single / "checkpoint-2" / "pytorch_lora_weights.safetensors").items()}
    for key in a:
        change = (a[key] - initial[key]).norm()
        assert (a[key] - b[key]).norm() <= 1e-4 * change, key
