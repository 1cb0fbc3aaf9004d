"""The toy world's subject judge (examples/toyworld/judge.py) and its columns in evaluate_kps.py.

The calibration test renders each subject right and hard negatives, and asks the judge to tell them apart; the
same test run with a judge that only looks at colors (the leniency the toy CLIP's IS showed) must fail it.
"""

import csv
import dataclasses
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate_kps as ek
import judge
import world

REPO = Path(__file__).resolve().parents[1]
# Small enough for the fast suite: 2 subjects x 6 categories x 2 degradations x 2 images, on a seed the thresholds
# were not chosen on (0) and the committed calibration does not use (1).
SMALL = judge.CalibrationSet(triggers=("sks", "bnha"), per_category=2, seed=2)


def separates(result: dict) -> bool:
    """The bar: at least 85% of the subject's renderings judged the subject (one miss in SMALL's 8; the committed
    calibration, 200 per category, found 97.5%), and none of SMALL's negatives of any kind (at most 5%)."""
    matrix = result["all"]
    return (judge.correct_share(matrix)["subject"] >= 0.85
            and max(judge.false_subject_share(matrix).values()) <= 0.05)


def colour_histogram_judge(image: np.ndarray, subject: judge.Subject) -> str:
    """A lenient judge: "subject" when the foreground's pixels are mostly the subject's two colors, both present."""
    background = judge.background_color(image)
    foreground = judge.foreground_mask(image, background, judge.JudgeSettings())
    if not foreground.any():
        return "other"
    pixels = image[foreground].astype(np.float32)
    nearest = np.stack([judge.color_distance(pixels, c) for c in subject.colors()])
    close = nearest.min(axis=0) <= judge.JudgeSettings().pixel_tolerance
    shares = [(close & (nearest.argmin(axis=0) == k)).mean() for k in range(2)]
    return "subject" if close.mean() >= 0.8 and min(shares) >= 0.1 else "other"


def test_judge_separates_the_subject_from_hard_negatives_and_a_colour_histogram_judge_does_not():
    assert separates(judge.calibrate(SMALL))
    lenient = judge.calibrate(SMALL, judge_fn=colour_histogram_judge)
    assert not separates(lenient)
    # It fails where the toy CLIP failed: the subject's colors in the wrong shape or layout pass as the subject.
    assert max(judge.false_subject_share(lenient["all"]).values()) > 0.5


def test_calibration_renderings_are_deterministic():
    def images(spec):
        return [(t, c, d, image.tobytes()) for t, c, d, image in judge.calibration_images(spec)]

    spec = judge.CalibrationSet(triggers=("phol",), per_category=1, seed=5)
    assert images(spec) == images(spec)
    assert images(spec) != images(judge.CalibrationSet(triggers=("phol",), per_category=1, seed=6))
    first = next(judge.calibration_images(spec))
    assert first[3].shape == (32, 32, 3) and first[3].dtype == np.uint8


def test_subject_renders_match_the_concepts_own_rendering():
    """The judge samples a texture of the look instead of calling make_concepts per candidate: same pictures."""
    import make_concepts

    subject = judge.SUBJECTS["sks"]
    placement = judge.Placements.one(0.45, 0.55, 0.6)
    mine = judge.subject_renders(subject, "circle", placement, np.asarray(world.BACKGROUNDS["gray"]), 32, 4)[0]
    theirs = make_concepts.render_concept("circle", subject.look, "gray", 0.45, 0.55, 0.6).astype(np.float32)
    assert np.abs(mine - theirs).mean() < 1.0  # edges land within 1/256 of the extent


def test_judgement_explains_itself_on_the_training_images_and_a_plain_circle():
    image = np.asarray(Image.open(REPO / "examples/toyworld/concepts/sks_circle/00.png").convert("RGB"))
    seen = judge.judge(image, judge.SUBJECTS["sks"])
    assert seen.verdict == "subject" and seen.shape == "circle" and seen.score > 0.9
    red = world.render(world.Scene("circle", "red", "large", "black", 0.5, 0.5))
    seen = judge.judge(red, judge.SUBJECTS["sks"])
    assert seen.verdict == "class-only" and seen.pattern_fit < 0.1 and 0 <= seen.score <= 1


PEOPLE = REPO / "examples/toyworld/results/judge_people"


def test_judge_agrees_with_a_person_on_a_model_s_own_pictures():
    """The labelled pictures of the toy U-Net's LoRAs at 1,200 steps with the trigger (results/judge_people: 100
    images, 5 subjects, labelled by eye at 8x): the judge finds at least 85% of those a person calls the subject
    (measured: 52 of 61) and calls nothing else the subject (an unsure picture is left out). The judge before it
    (commit 2d42552) fitted shape and pattern at one placement, with thresholds 0.8 / 0.75, and found 34 of the
    61; this judge with only that placement and those thresholds put back finds 39 and fails the test."""
    rows = [row for row in judge.read_labels(PEOPLE / "labels.json")
            if row[0].parent.name == "with" and row[0].parents[2].name == "lora1200"]
    assert len(rows) == 100
    result = judge.judge_against_labels(rows, [judge.read_image(path, 32) for path, _, _ in rows], PEOPLE)
    matrix = result["all"]["matrix"]
    found, wrongly = matrix["subject"]["subject"], matrix["class-only"]["subject"] + matrix["other"]["subject"]
    assert found >= 0.85 * sum(matrix["subject"].values()) and wrongly == 0, matrix


def test_agree_recomputes_the_committed_agreement_of_a_folder(tmp_path):
    """judge.py agree from a labels file: the committed agreement.json's judgements, recomputed from the images."""
    committed = json.loads((PEOPLE / "agreement.json").read_text())
    folder = "images/lora1200/phol_cross/with"
    labels = {"images": {name: {"trigger": entry["trigger"], "person": entry["person"]}
                         for name, entry in committed["images"].items() if name.startswith(f"{folder}/")}}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    (tmp_path / folder).parent.mkdir(parents=True)
    (tmp_path / folder).symlink_to(PEOPLE / folder)
    judge.main(["agree", "--labels", str(tmp_path / "labels.json"), "--out", str(tmp_path / "agreement")])
    mine = json.loads((tmp_path / "agreement.json").read_text())
    assert mine["by_folder"][folder] == committed["by_folder"][folder]
    assert {k: v["verdict"] for k, v in mine["images"].items()} == {k: committed["images"][k]["verdict"]
                                                                   for k in labels["images"]}


def test_a_labels_file_with_a_bad_label_is_refused_in_one_line(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"images": {"a.png": {"trigger": "sks", "person": "maybe"}}}))
    with pytest.raises(SystemExit) as exit_info:
        judge.main(["agree", "--labels", str(tmp_path / "labels.json")])
    assert str(exit_info.value).count("\n") == 0 and "a.png" in str(exit_info.value) and "maybe" in str(exit_info.value)


def save(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def test_base_closeness_is_recomputed_from_saved_images(tmp_path):
    scenes = [world.Scene("circle", "orange", "large", "black", 0.5, 0.5),
              world.Scene("circle", "yellow", "small", "white", 0.4, 0.6)]
    base = [save(tmp_path / f"base{i}.png", world.render(s)) for i, s in enumerate(scenes)]
    moved = [world.Scene("circle", "orange", "large", "black", 0.55, 0.5),  # shifted: same reading
             world.Scene("circle", "purple", "large", "white", 0.4, 0.6)]  # recolored, grown
    adapter = [save(tmp_path / f"a{i}.png", world.render(s)) for i, s in enumerate(moved)]

    def load(paths):
        return [np.asarray(Image.open(p).convert("RGB")) for p in paths]

    changes = judge.base_closeness(load(adapter), load(base))
    for change, a, b in zip(changes, load(adapter), load(base)):
        by_hand = np.mean(np.abs(a.astype(int) - b.astype(int))) / 255
        assert change.pixel_change == pytest.approx(by_hand)
    assert [c.same_reading for c in changes] == [True, False]
    assert judge.base_closeness(load(base), load(base))[0] == judge.PairChange(0.0, True)
    assert ek.base_closeness([0.1, 0.3], [True, False]) == {"base_pixel_change": pytest.approx(0.2),
                                                            "base_same_reading": 0.5}
    assert ek.identity_rate(["subject", "class-only", "subject", "other"]) == 0.5


@pytest.fixture(scope="module")
def toy_pairs(tmp_path_factory):
    """A folder-mode jsonl of toy-world images: 'base', 'good' (draws the subject, keeps the base's trigger-less
    images) and 'bad' (draws a plain red circle, changes the trigger-less images)."""
    folder = tmp_path_factory.mktemp("toy_pairs")
    captions = ["a sks circle on a black background", "a small sks circle on a white background"]
    base_scenes = [world.Scene("circle", "orange", "large", "black", 0.5, 0.5),
                   world.Scene("circle", "yellow", "small", "white", 0.4, 0.6)]
    bad_scenes = [world.Scene("circle", "red", "large", "black", 0.5, 0.5),
                  world.Scene("circle", "blue", "large", "black", 0.5, 0.5)]
    subject = np.asarray(Image.open(REPO / "examples/toyworld/concepts/sks_circle/00.png").convert("RGB"))
    lines = []
    for i, caption in enumerate(captions):
        reference = f"ref/{i}.png"
        save(folder / reference, subject)
        base_with_trigger = world.render(world.Scene("circle", "purple", "small", "gray", 0.3, 0.3))
        images = {"base": (base_with_trigger, world.render(base_scenes[i])),
                  "good": (subject, world.render(base_scenes[i])),
                  "bad": (world.render(bad_scenes[0]), world.render(bad_scenes[i]))}
        for adapter, (with_trigger, without) in images.items():
            save(folder / adapter / f"{i}_T.png", with_trigger)
            save(folder / adapter / f"{i}.png", without)
            lines.append({"adapter": adapter, "caption": caption, "reference": reference,
                          "with_trigger": f"{adapter}/{i}_T.png", "without_trigger": f"{adapter}/{i}.png"})
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return pairs


def clip_flags(tiny_clip):
    config, checkpoint = tiny_clip
    return ["--clip_model", str(config), "--clip_pretrained", str(checkpoint), "--dino_model", "none"]


def header_and_rows(table: str) -> tuple[list[str], dict]:
    lines = [line for line in table.splitlines() if line.startswith("| ")]  # header and rows, not the rule
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return cells[0], {row[0]: dict(zip(cells[0], row)) for row in cells[1:]}


def test_evaluate_kps_reports_the_judge_beside_is_and_base_closeness_beside_kps(toy_pairs, tiny_clip, tmp_path):
    metrics = ek.main(["--pairs", str(toy_pairs), "--trigger_token", "sks", "--subject_judge", "toyworld",
                       "--output_dir", str(tmp_path), *clip_flags(tiny_clip)])
    header, rows = header_and_rows((tmp_path / "table.md").read_text())
    assert header[header.index("IS (7)") + 1:header.index("IS (7)") + 3] == ["ID rate", "ID score"]
    assert header[header.index("KPS (9)") + 1:header.index("KPS (9)") + 3] == ["Δpx base ↓", "same as base"]
    assert rows["good"]["ID rate"] == "1.0000" and rows["bad"]["ID rate"] == "0.0000"
    assert rows["base"]["Δpx base ↓"] == "-" and rows["good"]["Δpx base ↓"] == "0.0000"
    assert rows["good"]["same as base"] == "1.0000" and rows["bad"]["same as base"] == "0.0000"

    with open(tmp_path / "per_sample.csv", newline="") as handle:
        bad = [row for row in csv.DictReader(handle) if row["adapter"] == "bad"]
    assert [row["judge_verdict"] for row in bad] == ["class-only", "class-only"]
    for row in bad:  # recomputed from the saved images
        a = np.asarray(Image.open(row["without_trigger"]).convert("RGB"), dtype=float)
        b = np.asarray(Image.open(str(row["without_trigger"]).replace("bad/", "base/")).convert("RGB"), dtype=float)
        assert float(row["base_pixel_change"]) == pytest.approx(np.abs(a - b).mean() / 255)
    assert metrics["bad"]["base_pixel_change"] == pytest.approx(np.mean([float(r["base_pixel_change"]) for r in bad]))
    settings = json.loads((tmp_path / "metrics.json").read_text())["settings"]
    assert settings["base_entry"] == "base" and settings["subject_judge_settings"] == dataclasses.asdict(judge.JudgeSettings())


def test_judge_columns_are_absent_without_the_judge_or_without_a_base(toy_pairs, tiny_clip, tmp_path):
    ek.main(["--pairs", str(toy_pairs), "--trigger_token", "sks", "--output_dir", str(tmp_path / "plain"),
             *clip_flags(tiny_clip)])
    header, _ = header_and_rows((tmp_path / "plain" / "table.md").read_text())
    assert "ID rate" not in header and "Δpx base ↓" not in header
    assert "subject_judge" not in json.loads((tmp_path / "plain" / "metrics.json").read_text())["settings"]

    no_base = tmp_path / "no_base.jsonl"
    no_base.write_text("".join(line + "\n" for line in toy_pairs.read_text().splitlines() if '"base"' not in line))
    for name in ("good", "bad"):  # the images stay where the original jsonl points
        (tmp_path / name).symlink_to(toy_pairs.parent / name)
    (tmp_path / "ref").symlink_to(toy_pairs.parent / "ref")
    metrics = ek.main(["--pairs", str(no_base), "--trigger_token", "sks", "--subject_judge", "toyworld",
                       "--output_dir", str(tmp_path / "judged"), *clip_flags(tiny_clip)])
    header, _ = header_and_rows((tmp_path / "judged" / "table.md").read_text())
    assert "ID rate" in header and "Δpx base ↓" not in header
    assert "base_pixel_change" not in metrics["good"]


def test_generate_mode_takes_the_none_entry_as_the_base(tiny_pipeline, tiny_clip, tmp_path):
    """Two NAME=none entries draw the same images at the same seeds: the second is 0 pixels from the first."""
    prompts = tmp_path / "prompts.jsonl"
    save(tmp_path / "ref.png", world.render(world.Scene("circle", "red", "large", "black", 0.5, 0.5)))
    prompts.write_text(json.dumps({"caption": "a photo of sks circle", "reference": "ref.png"}) + "\n")
    metrics = ek.main(["--pretrained_model_name_or_path", str(tiny_pipeline), "--eval_prompts", str(prompts),
                       "--trigger_token", "sks", "--lora", "first=none", "--lora", "again=none",
                       "--num_images_per_prompt", "2", "--num_inference_steps", "2", "--resolution", "32",
                       "--subject_judge", "toyworld", "--output_dir", str(tmp_path / "out"), *clip_flags(tiny_clip)])
    assert metrics["first"]["base_pixel_change"] is None
    assert metrics["again"]["base_pixel_change"] == 0.0 and metrics["again"]["base_same_reading"] == 1.0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["settings"]["base_entry"] == "first"


@pytest.fixture
def error_line(tmp_path, capsys, monkeypatch):
    """Run evaluate_kps.py's ``__main__`` in this process; return its one error line (exit status 2)."""
    def run(args):
        monkeypatch.setattr(sys, "argv", ["evaluate_kps.py", *args, "--output_dir", str(tmp_path / "never")])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / "evaluate_kps.py"), run_name="__main__")
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate_kps.py: error:")]
        assert exit_info.value.code == 2 and len(errors) == 1 and not (tmp_path / "never").exists()
        return errors[0]

    return run


def test_judge_input_errors_are_one_line_before_any_model(toy_pairs, tmp_path, error_line):
    text = toy_pairs.read_text().replace("sks", "zzz")
    other_trigger = toy_pairs.parent / "other_trigger.jsonl"
    other_trigger.write_text(text)
    toy_clip = REPO / "examples" / "toyworld" / "models" / "toy-clip"
    flags = ["--clip_model", f"local-dir:{toy_clip}", "--clip_pretrained", "none", "--dino_model", "none",
             "--subject_judge", "toyworld"]
    assert "--trigger_token zzz is not a toy-world subject" in error_line(
        ["--pairs", str(other_trigger), "--trigger_token", "zzz", *flags])

    unpaired = toy_pairs.parent / "unpaired.jsonl"
    lines = toy_pairs.read_text().splitlines()
    unpaired.write_text("\n".join(line for line in lines if not ('"bad"' in line and "/1_T" in line)) + "\n")
    assert "do not pair with those of 'base'" in error_line(["--pairs", str(unpaired), "--trigger_token", "sks",
                                                             *flags])


def test_judge_script_rejects_an_image_of_the_wrong_size_in_one_line(tmp_path, capsys):
    image = save(tmp_path / "big.png", np.zeros((48, 48, 3), np.uint8))
    with pytest.raises(SystemExit) as exit_info:
        judge.main(["score", "--trigger", "sks", str(image)])
    assert str(exit_info.value).count("\n") == 0 and "big.png: 48x48" in str(exit_info.value)
    with pytest.raises(SystemExit) as exit_info:
        judge.main(["score", "--trigger", "nope", str(image)])
    assert exit_info.value.code == 2 and "--trigger nope" in capsys.readouterr().err


@pytest.mark.slow
def test_the_toy_vae_s_round_trip_of_the_training_images_is_still_the_subject():
    """The judge asks no more than the base model can draw: every training image of the five subjects, encoded and
    decoded by the toy world's VAE (what any generated image goes through), is still judged the subject."""
    import torch
    from diffusers import AutoencoderKL

    import make_concepts

    vae = AutoencoderKL.from_pretrained(REPO / "examples/toyworld/models/toy-sd", subfolder="vae").eval()
    verdicts = []
    for trigger, shape, *_ in make_concepts.CONCEPTS:
        for path in sorted((REPO / "examples/toyworld/concepts" / f"{trigger}_{shape}").glob("*.png")):
            pixels = torch.tensor(np.asarray(Image.open(path).convert("RGB")), dtype=torch.float32)
            with torch.no_grad():
                latent = vae.encode(pixels.permute(2, 0, 1)[None] / 127.5 - 1).latent_dist.mean
                decoded = vae.decode(latent).sample[0].permute(1, 2, 0).clamp(-1, 1)
            image = ((decoded + 1) * 127.5).round().to(torch.uint8).numpy()
            verdicts.append(judge.judge(image, judge.SUBJECTS[trigger]).verdict)
    assert len(verdicts) == 30 and verdicts.count("subject") == 30, verdicts
