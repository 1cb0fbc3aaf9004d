"""benchmarks/cat_step_cost.py: exact saved-tensor accounting, CAT memory modes, and the report end to end.

Nothing here measures time: memory is counted in bytes (deterministic), so the assertions hold on a loaded CPU.
"""

import gc
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import cat_step_cost as B  # noqa: E402

FLOAT32, FLOAT64 = 4, 8


def test_meter_counts_the_exact_bytes_of_a_chain_and_releases_them():
    n = 1000
    x = torch.randn(n, requires_grad=True)
    with B.SavedTensorMeter() as meter:
        h1 = x * 2  # a Python scalar factor: nothing saved
        h2 = h1.sin()  # saves h1: n float32
        h2b = h1[: n // 2].cos()  # saves a view of h1: same storage, counted once
        h4 = h2.double().cos()  # saves the float64 copy: n float64
        h5 = h4.exp()  # saves its own output: n float64
        loss = h5.sum() + h2b.sum()
        expected = n * FLOAT32 + n * FLOAT64 + n * FLOAT64
        assert meter.current == meter.peak == expected
        assert meter.saves == 4
        loss.backward()
    assert meter.current == 0  # backward released every saved tensor
    assert meter.peak == expected

    # A graph dropped without backward releases its bytes too (no reference cycle through saved outputs).
    with B.SavedTensorMeter() as meter:
        y = (x * 2).sin().exp()  # sin saves its input, exp its output
        assert meter.current == 2 * n * FLOAT32
        del y
        gc.collect()
    assert meter.current == 0


def test_meter_peak_is_the_maximum_over_time_and_weights_can_be_excluded():
    layer = torch.nn.Linear(64, 64, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    with B.SavedTensorMeter(exclude=B.weight_storage_keys(layer)) as meter:
        first = layer(x).relu().sum()  # saves x (input, for the weight grad) and the relu output: 2 * 8*64 floats
        first.backward()
        second = (x * x).sum()  # saves x twice (one storage): 8*64 floats
        second.backward()
    assert meter.peak == 2 * 8 * 64 * FLOAT32
    assert meter.current == 0
    with B.SavedTensorMeter() as meter:  # without the exclusion the weight (64*64 floats) counts as well
        layer(x).relu().sum().backward()
    assert meter.peak == 2 * 8 * 64 * FLOAT32 + 64 * 64 * FLOAT32


@pytest.fixture(scope="module")
def bench(tiny_pipeline):
    torch.set_num_threads(1)
    args = B.build_parser().parse_args(["--resolution", "32", "--batch_size", "2"])
    return B.Bench(tiny_pipeline, args)


def test_lean_mode_holds_less_for_backward_than_batched_and_no_more_than_lora(bench):
    counts = {name: bench.measure_counts(name, seed=5) for name in B.CONFIGS}
    peaks = {name: c["saved_peak"] for name, c in counts.items()}
    assert peaks["cat-lean"] < peaks["cat-batched"]
    assert peaks["cat-lean"] <= 1.15 * peaks["lora"]
    # Prior preservation doubles the diffusion batch; the batched CAT call doubles the adapted batch.
    assert peaks["lora+prior"] > 1.8 * peaks["lora"]
    assert peaks["cat-batched"] > 1.8 * peaks["lora"]
    for name, c in counts.items():
        assert c["saved_left"] == 0, name  # every graph was backwarded and released
    # The frozen pass runs no LoRA layer; lean runs the adapter in two U-Net calls, batched in one.
    assert counts["cat-lean"]["lora_calls_in_frozen"] == counts["cat-batched"]["lora_calls_in_frozen"] == 0
    assert counts["cat-lean"]["lora_passes"] == 2 and counts["cat-batched"]["lora_passes"] == 1
    assert counts["lora"]["lora_passes"] == 1
    # Same FLOPs in both CAT modes; the U-Net does 5 (forward, backward) units against LoRA's 2.
    assert counts["cat-lean"]["flops"] == counts["cat-batched"]["flops"]
    unet = {name: c["flops_by_model"]["U-Net"] for name, c in counts.items()}
    assert unet["cat-lean"] / unet["lora"] == pytest.approx(2.5, rel=0.03)


def test_main_prints_a_table_with_every_configuration(tmp_path, capsys):
    output = tmp_path / "table.md"
    report = B.main(["--model", "tiny", "--resolution", "32", "--batch_size", "2", "--steps", "2", "--warmup", "1",
                     "--rss", "inprocess", "--threads", "1", "--phase_steps", "1", "--output", str(output)])
    printed = capsys.readouterr().out
    assert report["table"] in printed
    assert output.read_text(encoding="utf-8") == report["table"]
    rows = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| config")]
    names = [row.split("|")[1].strip() for row in rows]
    assert names[:4] == ["lora", "lora+prior", "cat-lean", "cat-batched"]
    assert "7/3 = 2.33x" in printed and "torch " + torch.__version__ in printed
    results = report["results"]
    assert all(len(r["times_ms"]) == 2 and r["time_ms"] > 0 for r in results.values())
    assert results["lora"]["time_ratio"] == 1.0
    assert all(r["rss_peak"] > 0 for r in results.values())
    assert "Where the time goes" in printed
    phases = results["cat-lean"]["phases_ms"]
    assert phases["U-Net fwd (frozen)"] > 0 and results["lora"]["phases_ms"]["U-Net fwd (frozen)"] == 0
    assert sum(v for k, v in phases.items() if k != "total") == pytest.approx(phases["total"])
