"""examples/toyworld/reproduce_table1.py end to end at a tiny scale: trainings, evaluations, table, sweep plot."""

import json
import os
import re
import statistics
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
    result = run_script("--output_dir", str(out), "--concept_names", "sks_circle", "--seeds", "0", "1",
                        "--max_train_steps", "2", "--alphas", "0", "0.5", "1", "--num_images_per_prompt", "1",
                        "--num_inference_steps", "2", "--train_text_encoder")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    adapters = out / "adapters" / "sks_circle"
    names = {f"{method}-seed{seed}" for method in ("lora", "dreambooth", "cat", "alpha0.5") for seed in (0, 1)}
    # alpha 0 and 1 reuse the lora and cat trainings; only alpha 0.5 is trained for the sweep, once per seed.
    assert {p.name for p in adapters.iterdir()} == names
    for folder in adapters.iterdir():
        assert (folder / "pytorch_lora_weights.safetensors").is_file(), folder
        # --train_text_encoder reached the training: text-encoder LoRA weights were saved
        assert "text_encoder" in (folder / "pytorch_lora_weights.safetensors").read_bytes()[:20000].decode("latin-1")
    # DreamBooth's prior preservation generated its class images once, for the class of the concept
    assert len(list((out / "class_images" / "circle").glob("*.png"))) == 24

    metrics = json.loads((out / "eval" / "sks_circle" / "metrics.json").read_text())["adapters"]
    assert set(metrics) == names
    table = (out / "table1.md").read_text()
    rows = table_rows(table)

    def mean_std(values):
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    keys = ("PS", "IS", "KPS", "PS_mean", "IS_mean", "KPS_mean")
    for method in ("lora", "dreambooth", "cat"):
        assert rows[method][:6] == [mean_std([metrics[f"{method}-seed{s}"][k] for s in (0, 1)]) for k in keys]
        assert rows[method][-1] == "2"
    for baseline in ("lora", "dreambooth"):  # paired by seed: mean of the differences, standard error, wins
        cells = []
        for key in ("PS_mean", "IS_mean", "KPS_mean"):
            d = [metrics[f"cat-seed{s}"][key] - metrics[f"{baseline}-seed{s}"][key] for s in (0, 1)]
            cells.append(f"{statistics.mean(d):+.4f} ± {statistics.stdev(d) / 2 ** 0.5:.4f} ({sum(x > 0 for x in d)}/2)")
        assert rows[f"cat − {baseline}"] == cells, baseline
    for alpha, method in (("0", "lora"), ("0.5", "alpha0.5"), ("1", "cat")):
        assert rows[alpha][:6] == [mean_std([metrics[f"{method}-seed{s}"][k] for s in (0, 1)]) for k in keys], alpha
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
