"""benchmarks/cat_step_cost.py: exact saved-tensor accounting, CAT memory modes, and the report end to end.

Nothing here measures time: memory is counted in bytes (deterministic), so the assertions hold on a loaded CPU.
"""

import gc
import statistics
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


def table_section(printed: str, first_titles: str) -> tuple[list[str], dict[str, list[str]]]:
    """The markdown table of ``printed`` whose header starts with ``| first_titles``: (titles, {config: cells})."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_titles}"))
    titles = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return titles, rows


def test_unet_floors_count_passes_and_the_flop_counter_lands_on_the_frozen_base_one(bench):
    # Counting a forward as 1 and a backward as b: LoRA 1 + b, CAT 2 (1 + b) + 1 (the frozen forward).
    assert B.unet_units("lora", 2) == 3 and B.unet_units("cat-lean", 2) == 7
    assert B.unet_units("lora", 1) == 2 and B.unet_units("cat-batched", 1) == 5
    assert B.unet_floor_ratio("cat-lean", 2) == pytest.approx(7 / 3)
    assert B.unet_floor_ratio("cat-lean", 1) == pytest.approx(5 / 2)
    # The FLOP counter on real steps: the base is frozen, so a LoRA backward is about one forward, and the
    # measured U-Net ratio sits on the frozen-base floor for every configuration, not on 7/3.
    unet = {name: bench.measure_counts(name, seed=7)["flops_by_model"]["U-Net"] for name in B.CONFIGS}
    for name, flops in unet.items():
        measured = flops / unet["lora"]
        assert measured == pytest.approx(B.unet_floor_ratio(name, B.BACKWARD_UNITS["frozen base"]), rel=0.03), name
    assert unet["cat-lean"] / unet["lora"] > B.unet_floor_ratio("cat-lean", B.BACKWARD_UNITS["issue"]) + 0.1


def test_main_prints_a_table_whose_ratios_are_computed_from_the_measurements(tmp_path, capsys):
    output = tmp_path / "table.md"
    report = B.main(["--model", "tiny", "--resolution", "32", "--batch_size", "2", "--steps", "3", "--warmup", "1",
                     "--rss", "inprocess", "--threads", "1", "--phase_steps", "1", "--output", str(output)])
    printed = capsys.readouterr().out
    assert report["table"] in printed
    assert output.read_text(encoding="utf-8") == report["table"]
    assert "torch " + torch.__version__ in printed
    results = report["results"]
    lora = results["lora"]
    titles, rows = table_section(printed, "config | step ms (median)")
    assert list(rows)[:4] == ["lora", "lora+prior", "cat-lean", "cat-batched"]

    def ratio_after(cells, title):  # the "x LoRA" cell that follows the column ``title``
        column = titles.index(title) + 1
        assert titles[column] == "x LoRA"
        return cells[column]

    for name, r in results.items():
        cells = rows[name]
        # Time: the median of the per-round ratios, from the recorded per-round times.
        per_round = [t / b for t, b in zip(r["times_ms"], lora["times_ms"])]
        assert len(per_round) == 3 and r["time_ratio"] == pytest.approx(statistics.median(per_round))
        assert ratio_after(cells, "step ms (median)") == f"{r['time_ratio']:.2f}x"
        # FLOPs, saved bytes, peak RSS and RSS rise: each "x LoRA" cell is that quantity over LoRA's.
        assert cells[titles.index("GFLOP/step")] == f"{r['flops'] / 1e9:.3f}"
        assert cells[titles.index("peak RSS MiB")] == f"{r['rss_peak'] / B.MIB:.1f}"
        assert ratio_after(cells, "GFLOP/step") == f"{r['flops'] / lora['flops']:.2f}x"
        assert ratio_after(cells, "saved for backward MiB") == f"{r['saved_peak'] / lora['saved_peak']:.2f}x"
        assert ratio_after(cells, "peak RSS MiB") == f"{r['rss_peak'] / lora['rss_peak']:.2f}x"
        # In one process the heap is reused, so LoRA's RSS rise can be 0: then there is no ratio.
        rise_ratio = f"{r['rss_step'] / lora['rss_step']:.2f}x" if lora["rss_step"] else "n/a"
        assert ratio_after(cells, "step RSS rise MiB") == rise_ratio
    # Memory: lean holds no more than 1.15x LoRA for backward, batched clearly more.
    saved = {name: r["saved_peak"] for name, r in results.items()}
    assert saved["cat-lean"] <= 1.15 * saved["lora"] < saved["cat-batched"]
    # The measured U-Net FLOP ratio is printed beside both floors.
    titles, flop_rows = table_section(printed, "config | U-Net")
    unet = {name: r["flops_by_model"]["U-Net"] for name, r in results.items()}
    for name in results:
        row = dict(zip(titles, flop_rows[name]))
        assert row["U-Net x LoRA, measured"] == f"{unet[name] / unet['lora']:.2f}x"
        assert row["floor: fwd 1, bwd 2"] == f"{B.unet_floor_ratio(name, 2):.2f}x"
        assert row["floor: frozen base, bwd 1"] == f"{B.unet_floor_ratio(name, 1):.2f}x"
    phases = results["cat-lean"]["phases_ms"]
    assert phases["U-Net fwd (frozen)"] > 0 and results["lora"]["phases_ms"]["U-Net fwd (frozen)"] == 0
    assert sum(v for k, v in phases.items() if k != "total") == pytest.approx(phases["total"])


def test_toy_model_alias_and_bf16_halve_the_bytes_saved_for_backward():
    assert B.resolve_model("toy", ROOT) == str(ROOT / "examples" / "toyworld" / "models" / "toy-sd")
    saved, dtypes = {}, {}
    for precision in ("no", "bf16"):
        args = B.build_parser().parse_args(["--model", "toy", "--resolution", "32", "--batch_size", "1",
                                            "--mixed_precision", precision])
        bench = B.Bench(B.resolve_model(args.model, ROOT), args)
        counts = bench.measure_counts("cat-lean", seed=3)
        assert counts["lora_calls_in_frozen"] == 0 and counts["saved_left"] == 0
        saved[precision] = counts["saved_peak"]
        dtypes[precision] = ({p.dtype for p in bench.unet.parameters() if not p.requires_grad},
                             {p.dtype for p in bench.trainable})
    assert dtypes["no"] == ({torch.float32}, {torch.float32})
    assert dtypes["bf16"] == ({torch.bfloat16}, {torch.float32})  # frozen base in bf16, LoRA weights float32
    # Activations are saved in bfloat16 (2 bytes instead of 4); a few float32 tensors (losses, norms) remain.
    assert 0.4 * saved["no"] < saved["bf16"] < 0.7 * saved["no"]
