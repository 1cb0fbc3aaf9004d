"""benchmarks/cat_step_cost.py: exact saved-tensor accounting, what a CAT step costs on tiny SD and tiny SDXL
(FLOPs, bytes held for backward, the frozen pass seen by hooks), the real architectures' sizes, the report.

Nothing here asserts a time: FLOPs and bytes are deterministic, so the assertions hold on a loaded CPU. The real
SD 1.5 and SDXL architectures are built on the meta device (no memory, no forward pass).
"""

import gc
import statistics

import pytest
import torch
from conftest import ROOT

import cat_step_cost as B

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


BATCH = 2
# The FLOP counter slows a step down several times: the fixture measures the three configurations the goals are
# about (lora+prior is exercised by the report test).
MEASURED = ("lora", "cat-lean", "cat-batched")


@pytest.fixture(scope="module", params=["sd", "sdxl", "flux"])
def counts(request):
    """{config: measure_counts} of one step of every configuration, on tiny SD, SDXL and Flux.1."""
    pipeline = request.getfixturevalue({"sd": "tiny_pipeline", "sdxl": "tiny_sdxl_pipeline",
                                        "flux": "tiny_flux_pipeline"}[request.param])
    torch.set_num_threads(1)
    args = B.build_parser().parse_args(["--resolution", "32", "--batch_size", str(BATCH)])
    bench = B.Bench(pipeline, args)
    assert type(bench.family).__name__ == {"sd": "StableDiffusionFamily", "sdxl": "StableDiffusionXLFamily",
                                           "flux": "FluxFamily"}[request.param]
    return {name: bench.measure_counts(name, seed=5) for name in MEASURED}


def test_frozen_pass_seen_by_the_hooks_runs_without_grad_and_without_lora(counts):
    # The denoiser calls of each step, in order: (autograd on, rows). The frozen pass is the one without autograd.
    calls = {name: [(call["grad"], call["rows"]) for call in c["denoiser_calls"]] for name, c in counts.items()}
    assert calls["lora"] == [(True, BATCH)]
    assert calls["cat-lean"] == [(True, BATCH), (True, BATCH), (False, BATCH)]
    assert calls["cat-batched"] == [(True, 2 * BATCH), (False, BATCH)]
    for name in ("cat-lean", "cat-batched"):
        adapted, frozen = counts[name]["denoiser_calls"][:-1], counts[name]["denoiser_calls"][-1]
        assert frozen["lora_calls"] == counts[name]["lora_calls_in_frozen"] == 0  # adapters disabled
        assert all(call["lora_calls"] > 0 for call in adapted)  # the adapted passes did run the LoRA layers
        assert counts[name]["frozen_passes"] == 1
    assert counts["cat-lean"]["lora_passes"] == 2 and counts["cat-batched"]["lora_passes"] == 1


def test_denoiser_flops_sit_on_the_frozen_base_floor(counts):
    # Counting a forward as 1 and a backward as b: LoRA 1 + b, CAT 2 (1 + b) + 1 (the frozen forward).
    assert B.denoiser_units("lora", 2) == 3 and B.denoiser_units("cat-lean", 2) == 7
    assert B.denoiser_units("lora", 1) == 2 and B.denoiser_units("cat-batched", 1) == 5
    # The FLOP counter on real steps: the base is frozen, so a LoRA backward is about one forward, and the
    # measured denoiser ratio sits on the frozen-base floor (5/2 for CAT), clearly above the 7/3.
    denoiser = {name: c["flops_by_model"]["denoiser"] for name, c in counts.items()}
    for name, flops in denoiser.items():
        assert flops / denoiser["lora"] == pytest.approx(B.denoiser_floor_ratio(name, 1), rel=0.03), name
    assert denoiser["cat-lean"] / denoiser["lora"] > 7 / 3 + 0.1
    # Both CAT modes do the same work; the VAE encode is shared (once per step in every configuration).
    assert counts["cat-lean"]["flops"] == counts["cat-batched"]["flops"]
    vae = {name: c["flops_by_model"]["VAE encode"] for name, c in counts.items()}
    assert vae["cat-lean"] == vae["cat-batched"] == vae["lora"]


def test_memory_held_for_backward_lean_as_lora_batched_twice(counts):
    saved = {name: c["saved_peak"] for name, c in counts.items()}
    assert saved["lora"] > 0
    assert saved["cat-lean"] / saved["lora"] == pytest.approx(1.0, abs=0.05)  # the goal: lean <= 1.05x LoRA
    assert saved["cat-batched"] / saved["lora"] == pytest.approx(2.0, rel=0.05)
    for name, c in counts.items():
        assert c["saved_left"] == 0, name  # every graph was backwarded and released


@pytest.mark.parametrize("model, expected", [
    ("sd15", {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}),
    ("sdxl", {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
              "vae": 83_653_863}),
])
def test_real_architectures_build_their_published_parameter_counts(tmp_path, model, expected):
    path, random_weights = B.resolve_model(model, tmp_path)
    assert random_weights
    args = B.build_parser().parse_args(["--model", model, "--resolution", "64"])
    family = B.family_for(path, args, random_weights)
    with torch.device("meta"):  # the architecture without memory or initialisation
        models = family.load_models()
    assert B.base_parameter_counts(models) == expected
    assert family.denoiser == "unet" and set(family.text_encoders) == set(expected) - {"unet", "vae"}
    # The configs the models were built from are the published ones (spot checks).
    unet = models["unet"].config
    assert list(unet.block_out_channels) == ([320, 640, 1280, 1280] if model == "sd15" else [320, 640, 1280])
    assert unet.cross_attention_dim == (768 if model == "sd15" else 2048)
    assert models["vae"].config.scaling_factor == (0.18215 if model == "sd15" else 0.13025)


def test_the_real_flux_dev_architecture_builds_its_published_parameter_counts(tmp_path):
    """Flux.1-dev from its configs (random weights, nothing downloaded): 11.9 B transformer, T5-XXL encoder."""
    path, random_weights = B.resolve_model("flux-dev", tmp_path)
    assert random_weights
    args = B.build_parser().parse_args(["--model", "flux-dev", "--max_sequence_length", "512"])
    family = B.family_for(path, args, random_weights)
    assert type(family).__name__ == "RandomWeightsFluxFamily" and family.denoiser == "transformer"
    with torch.device("meta"):
        models = family.load_models()
    assert B.base_parameter_counts(models) == {"transformer": 11_901_408_320, "text_encoder": 123_060_480,
                                               "text_encoder_2": 4_762_310_656, "vae": 83_819_683}
    transformer = models["transformer"].config
    assert (transformer.num_layers, transformer.num_single_layers, transformer.guidance_embeds) == (19, 38, True)
    assert models["vae"].config.latent_channels == 16



# The newer families' real architectures (cat_step_cost.SPECS): the family train_cat_lora.py recognizes, the
# parameters of every component as the published configs give them (built on the meta device: no memory, no
# initialisation), and spot checks of the configs. Cross-checks: Qwen2.5-VL-7B 8.29 B, Qwen3-4B 4.02 B, Mistral Small
# 3.x 24.0 B, Qwen-Image 20 B, Z-Image 6 B, FLUX.2 [dev] 32 B, SD3.5 large 8 B (SD3.5 medium's "2.5 B" counts its
# positional-embedding buffer, 384^2 x 1536 values, which is no parameter).
SD35_TEXT = {"text_encoder": 123_650_304, "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656,
             "vae": 83_819_683}
NEW_ARCHITECTURES = {
    "sd35-medium": ("StableDiffusion3Family", {"transformer": 2_243_171_520, **SD35_TEXT},
                    {"num_layers": 24, "caption_projection_dim": 1536, "qk_norm": "rms_norm"}),
    "sd35-large": ("StableDiffusion3Family", {"transformer": 8_056_627_520, **SD35_TEXT},
                   {"num_layers": 38, "caption_projection_dim": 2432, "qk_norm": "rms_norm"}),
    "qwen-image": ("QwenImageFamily", {"transformer": 20_430_401_088, "text_encoder": 8_292_166_656,
                                       "vae": 126_892_531}, {"num_layers": 60, "joint_attention_dim": 3584}),
    "z-image": ("ZImageFamily", {"transformer": 6_154_908_736, "text_encoder": 4_022_468_096, "vae": 83_819_683},
                {"n_layers": 30, "dim": 3840, "cap_feat_dim": 2560}),
    "flux2-klein-4b": ("Flux2KleinFamily", {"transformer": 3_875_544_576, "text_encoder": 4_022_468_096,
                                            "vae": 84_046_115},
                       {"num_layers": 5, "num_single_layers": 20, "joint_attention_dim": 7680,
                        "guidance_embeds": False}),
    "flux2-dev": ("Flux2Family", {"transformer": 32_223_281_152, "text_encoder": 24_011_361_280, "vae": 84_046_115},
                  {"num_layers": 8, "num_single_layers": 48, "joint_attention_dim": 15360, "guidance_embeds": True}),
}


@pytest.mark.parametrize("model", NEW_ARCHITECTURES)
def test_the_newer_families_real_architectures_are_recognized_and_count_their_published_parameters(tmp_path, model):
    family_name, expected, denoiser_config = NEW_ARCHITECTURES[model]
    path, random_weights = B.resolve_model(model, tmp_path)
    assert random_weights and B.MODELS[model].random_weights  # gpu_check.py plans every such entry
    args = B.build_parser().parse_args(["--model", model, "--resolution", "1024"])
    args.max_sequence_length = None  # the family's default, as train_cat_lora.py's
    assert type(B.family_for(path, args)).__name__ == family_name  # train_cat_lora.model_family on the folder
    family = B.family_for(path, args, random_weights)
    with torch.device("meta"):
        models = family.load_models()
    assert B.base_parameter_counts(models) == expected
    assert {p.device.type for model in models.values() if isinstance(model, torch.nn.Module)
            for p in model.parameters()} == {"meta"}
    config = models[family.denoiser].config
    assert {name: getattr(config, name) for name in denoiser_config} == denoiser_config


@pytest.mark.parametrize("fixture", ["tiny_qwenimage_pipeline", "tiny_zimage_pipeline"])
def test_a_step_on_the_meta_device_holds_what_a_cpu_step_holds(request, tmp_path, fixture):
    """benchmarks/meta_cost.py runs the training script's step on meta tensors (the masks' values known, a GPU's
    attention kernels): on a tiny pipeline it saves the bytes a CPU step saves (to the attention kernels' seeds) and
    runs the same denoiser passes, with no LoRA call in the frozen one."""
    import meta_cost as M

    pipeline = request.getfixturevalue(fixture)
    torch.set_num_threads(1)
    args = B.build_parser().parse_args(["--resolution", "32", "--batch_size", "1", "--max_sequence_length", "64"])
    cpu = B.Bench(pipeline, args)
    meta = M.measure_model(pipeline, tmp_path, ("cat-lean", "cat-batched"), resolution=32, rank=args.rank,
                           max_sequence_length=64)
    assert meta["parameters"] == B.base_parameter_counts(cpu.models)
    for config, counted in meta["results"].items():
        reference = cpu.measure_counts(config, seed=1000)
        assert counted["saved_peak"] == pytest.approx(reference["saved_peak"], abs=128), config
        assert counted["saved_left"] == 0 and counted["lora_calls_in_frozen"] == 0
        assert [(c["grad"], c["rows"], c["lora_calls"]) for c in counted["denoiser_calls"]] == \
            [(c["grad"], c["rows"], c["lora_calls"]) for c in reference["denoiser_calls"]]
        # The CPU's attention kernel has no FLOP formula in torch's counter; the GPU kernels counted here have.
        assert counted["flops_by_model"]["denoiser"] > reference["flops_by_model"]["denoiser"]


def test_meta_cost_prints_the_parameters_and_the_ratios_it_counted(tmp_path, capsys):
    import meta_cost as M

    output = tmp_path / "meta.md"
    reports = M.main(["--models", "tiny", "--resolution", "32", "--output", str(output)])
    printed = capsys.readouterr().out
    assert output.read_text(encoding="utf-8") in printed
    (report,) = reports
    assert report["parameters"] == B.base_parameter_counts(B.Bench(B.resolve_model("tiny", tmp_path)[0],
                                                                  B.build_parser().parse_args([])).models)
    results = report["results"]
    assert list(results) == ["lora", "cat-lean", "cat-batched"]
    denoiser = {name: r["flops_by_model"]["denoiser"] for name, r in results.items()}
    assert denoiser["cat-lean"] == denoiser["cat-batched"] and 2 < denoiser["cat-lean"] / denoiser["lora"] < 3
    saved = {name: r["saved_peak"] for name, r in results.items()}
    assert saved["cat-lean"] / saved["lora"] == pytest.approx(1.0, abs=0.05)
    assert saved["cat-batched"] / saved["lora"] == pytest.approx(2.0, rel=0.05)
    titles, rows = table_section(printed, "model | px")
    row = dict(zip(titles, rows["tiny"]))
    assert row["denoiser FLOPs cat-lean x LoRA"] == f"{denoiser['cat-lean'] / denoiser['lora']:.2f}x"
    assert row["all FLOPs cat-lean x LoRA"] == f"{results['cat-lean']['flops'] / results['lora']['flops']:.2f}x"
    assert row["saved cat-batched x LoRA"] == f"{saved['cat-batched'] / saved['lora']:.2f}x"
    assert row["LoRA calls in the frozen pass"] == "0, 0"
    assert f"| {report['parameters']['unet']:,} |" in printed

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


def test_main_prints_a_table_whose_ratios_are_computed_from_the_measurements(tiny_sdxl_pipeline, tmp_path, capsys):
    output = tmp_path / "table.md"
    report = B.main(["--model", tiny_sdxl_pipeline, "--resolution", "32", "--batch_size", "1", "--steps", "2",
                     "--warmup", "0", "--rss", "inprocess", "--threads", "1", "--phase_steps", "1",
                     "--configs", "lora+prior,cat-lean", "--output", str(output)])
    printed = capsys.readouterr().out
    assert report["table"] in printed
    assert output.read_text(encoding="utf-8") == report["table"]
    assert "torch " + torch.__version__ in printed and "(StableDiffusionXLFamily)" in printed
    results = report["results"]
    lora = results["lora"]
    titles, rows = table_section(printed, "config | step ms (median)")
    assert list(rows) == ["lora", "lora+prior", "cat-lean"]  # lora is always measured: the ratios' reference

    def ratio_after(cells, title):  # the "x LoRA" cell that follows the column ``title``
        column = titles.index(title) + 1
        assert titles[column] == "x LoRA"
        return cells[column]

    for name, r in results.items():
        cells = rows[name]
        # Time: the median of the per-round ratios, from the recorded per-round times.
        per_round = [t / b for t, b in zip(r["times_ms"], lora["times_ms"])]
        assert len(per_round) == 2 and r["time_ratio"] == pytest.approx(statistics.median(per_round))
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
    calls_column = titles.index("denoiser calls (rows, autograd)")
    assert rows["cat-lean"][calls_column] == "1 grad, 1 grad, 1 no grad"
    assert rows["lora+prior"][calls_column] == "2 grad"  # the class rows join the instance rows
    # Prior preservation doubles the diffusion batch: twice the bytes held for backward.
    assert results["lora+prior"]["saved_peak"] / lora["saved_peak"] == pytest.approx(2.0, rel=0.05)
    # The measured denoiser FLOP ratio is printed beside both floors.
    titles, flop_rows = table_section(printed, "config | denoiser")
    denoiser = {name: r["flops_by_model"]["denoiser"] for name, r in results.items()}
    for name in results:
        row = dict(zip(titles, flop_rows[name]))
        assert row["denoiser x LoRA, measured"] == f"{denoiser[name] / denoiser['lora']:.2f}x"
        assert row["floor: fwd 1, bwd 2"] == f"{B.denoiser_floor_ratio(name, 2):.2f}x"
        assert row["floor: frozen base, bwd 1"] == f"{B.denoiser_floor_ratio(name, 1):.2f}x"
    # --cat_every N: N - 1 LoRA steps and one CAT step per cycle, from the measured ratios; the floor 1 + 1.5/N.
    titles, every_rows = table_section(printed, "N | time x LoRA")
    time_ratio, flop_ratio = results["cat-lean"]["time_ratio"], denoiser["cat-lean"] / denoiser["lora"]
    for every in (1, 2, 4):
        row = dict(zip(titles, every_rows[str(every)]))
        assert row["time x LoRA"] == f"{(every - 1 + time_ratio) / every:.2f}x"
        assert row["denoiser FLOPs x LoRA"] == f"{(every - 1 + flop_ratio) / every:.2f}x"
        assert row["floor: frozen base"] == f"{1 + 1.5 / every:.2f}x"
    phases = results["cat-lean"]["phases_ms"]
    assert phases["denoiser fwd (frozen)"] > 0 and results["lora"]["phases_ms"]["denoiser fwd (frozen)"] == 0
    assert sum(v for k, v in phases.items() if k != "total") == pytest.approx(phases["total"])


@pytest.mark.parametrize("argv, flag", [
    (["--configs", "lora,cat-fast"], "--configs"),
    (["--resolution", "36"], "--resolution"),
    (["--batch_size", "0"], "--batch_size"),
    (["--model", "/nonexistent/pipeline"], "--model"),
])
def test_bad_input_exits_2_with_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as stopped:
        B.main(argv + ["--steps", "1", "--rss", "off", "--phase_steps", "0"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and flag in error


def test_toy_model_alias_and_bf16_halve_the_bytes_saved_for_backward():
    path, random_weights = B.resolve_model("toy", ROOT)
    assert path == str(ROOT / "examples" / "toyworld" / "models" / "toy-sd") and not random_weights
    saved, dtypes = {}, {}
    for precision in ("no", "bf16"):
        args = B.build_parser().parse_args(["--model", "toy", "--resolution", "32", "--batch_size", "1",
                                            "--mixed_precision", precision])
        bench = B.Bench(path, args)
        counts = bench.measure_counts("cat-lean", seed=3)
        assert counts["lora_calls_in_frozen"] == 0 and counts["saved_left"] == 0
        saved[precision] = counts["saved_peak"]
        dtypes[precision] = ({p.dtype for p in bench.denoiser.parameters() if not p.requires_grad},
                             {p.dtype for p in bench.trainable})
    assert dtypes["no"] == ({torch.float32}, {torch.float32})
    assert dtypes["bf16"] == ({torch.bfloat16}, {torch.float32})  # frozen base in bf16, LoRA weights float32
    # Activations are saved in bfloat16 (2 bytes instead of 4); a few float32 tensors (losses, norms) remain.
    assert 0.4 * saved["no"] < saved["bf16"] < 0.7 * saved["no"]


def test_pre_computed_text_embeddings_drop_the_text_encoders(tiny_flux_pipeline):
    """--pre_compute_text_embeddings (the Flux.1 24 GB recipe of benchmarks/gpu_check.sh): the prompts are encoded
    once, the text encoders leave the bench, and a step runs no text encoder (the frozen pass still no LoRA)."""
    args = B.build_parser().parse_args(["--resolution", "32", "--batch_size", "1", "--pre_compute_text_embeddings"])
    bench = B.Bench(tiny_flux_pipeline, args)
    assert bench.text_encoders == {} and not set(bench.family.text_encoders) & set(bench.models)
    counts = bench.measure_counts("cat-lean", seed=1)
    assert "text encoders" not in counts["flops_by_model"] and counts["flops_by_model"]["denoiser"] > 0
    assert counts["lora_calls_in_frozen"] == 0 and counts["saved_left"] == 0
    with pytest.raises(SystemExit):
        B.check_args(B.build_parser().parse_args(["--pre_compute_text_embeddings", "--train_text_encoder"]))


def test_bench_changes_resolution_and_checkpointing_in_place(tiny_pipeline):
    """gpu_check.py measures several resolutions and both checkpointing settings on one model build."""
    args = B.build_parser().parse_args(["--resolution", "32", "--batch_size", "1"])
    bench = B.Bench(tiny_pipeline, args)
    plain = bench.measure_counts("lora", seed=1)
    bench.set_gradient_checkpointing(True)
    assert bench.denoiser.is_gradient_checkpointing
    checkpointed = bench.measure_counts("lora", seed=1)
    assert checkpointed["saved_peak"] < plain["saved_peak"] and checkpointed["flops"] > plain["flops"]
    bench.set_gradient_checkpointing(False)
    bench.set_resolution(64)
    assert bench.batches[False]["pixel_values"].shape[-1] == 64 and bench.family.config.resolution == 64
    larger = bench.measure_counts("lora", seed=1)
    assert larger["flops_by_model"]["denoiser"] > 3 * plain["flops_by_model"]["denoiser"]
