"""examples/toyworld/reproduce_table1.py end to end at a tiny scale: trainings, evaluations, table, sweep plot."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "examples" / "toyworld" / "reproduce_table1.py"


def run_script(*flags, cwd=ROOT):
    return subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def table_rows(markdown: str) -> dict[str, list[str]]:
    """First-column label -> cells, for every markdown table row."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| method") and not line.startswith("| alpha") \
                and not line.startswith("| difference"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_small_run_writes_table_and_sweep_from_the_evaluations(tmp_path):
    out = tmp_path / "table1"
    result = run_script("--output_dir", str(out), "--concept_names", "sks_circle", "--seeds", "0",
                        "--max_train_steps", "2", "--alphas", "0", "0.5", "1", "--num_images_per_prompt", "1",
                        "--num_inference_steps", "2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    adapters = out / "adapters" / "sks_circle"
    # alpha 0 and 1 at the first seed reuse the lora and cat trainings; only alpha 0.5 is trained for the sweep.
    assert sorted(p.name for p in adapters.iterdir()) == ["alpha0.5", "cat-seed0", "dreambooth-seed0", "lora-seed0"]
    for folder in adapters.iterdir():
        assert (folder / "pytorch_lora_weights.safetensors").is_file(), folder
    # DreamBooth's prior preservation generated its class images once, for the class of the concept
    assert len(list((out / "class_images" / "circle").glob("*.png"))) == 24

    metrics = json.loads((out / "eval" / "sks_circle" / "metrics.json").read_text())["adapters"]
    assert set(metrics) == {"lora-seed0", "dreambooth-seed0", "cat-seed0", "alpha0.5"}
    table = (out / "table1.md").read_text()
    rows = table_rows(table)
    for method in ("lora", "dreambooth", "cat"):
        m = metrics[f"{method}-seed0"]
        cells = rows[method]
        # one adapter per method: mean = its score, std 0
        for cell, key in zip(cells, ("PS", "IS", "KPS", "PS_mean", "IS_mean", "KPS_mean")):
            assert cell == f"{m[key]:.4f} ± 0.0000", (method, key, cell)
        assert cells[-1] == "1"
    for baseline in ("lora", "dreambooth"):  # one pair: the difference itself, standard error 0
        expected = [metrics["cat-seed0"][key] - metrics[f"{baseline}-seed0"][key]
                    for key in ("PS_mean", "IS_mean", "KPS_mean")]
        assert rows[f"cat − {baseline}"] == [f"{d:+.4f} ± 0.0000 ({int(d > 0)}/1)" for d in expected], baseline
    for alpha, name in (("0", "lora-seed0"), ("0.5", "alpha0.5"), ("1", "cat-seed0")):
        assert rows[alpha][:3] == [f"{metrics[name][key]:.4f}" for key in ("PS", "IS", "KPS")], alpha
    assert (out / "alpha_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table in result.stdout


@pytest.mark.parametrize("flags, message", [
    (["--concept_names", "nope"], "--concept_names: nope not in"),
    (["--concept_names", "sks_circle", "--sweep_concept", "ohwx_square"], "--sweep_concept: ohwx_square is not"),
    (["--concepts", "missing.json"], "--concepts: missing.json does not exist"),
])
def test_bad_concept_selection_fails_before_any_training(tmp_path, flags, message):
    result = run_script("--output_dir", str(tmp_path / "out"), *flags)
    assert result.returncode != 0
    assert re.search(re.escape(message), result.stderr), result.stderr
    assert not (tmp_path / "out").exists()
