"""benchmarks/gpu_check.sh: the smoke run on the CPU (its JSON and Markdown), the plan for a GPU (--dry_run), the
budget, one failing or hanging item not stopping the rest, bad input; and what only a GPU runs, checked up to where
the CPU stops (random weights built on the bench's device, an NF4 base saved and then refused by the quantized
loader, out of memory as one line, the report's CUDA figures)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from argparse import Namespace

import pytest
import torch
from conftest import ROOT

import cat_step_cost as B
import gpu_check as G
import train_cat_lora as T

GIB = 2**30


def read_report(out):
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def item_lines(printed: str, name: str) -> list[str]:
    """The console lines that report the outcome of item ``name`` (one per item)."""
    return [line for line in printed.splitlines() if re.match(rf"\[ *\d+ s\] {re.escape(name)}: (?!.*\(estimated)",
                                                              line)]


@pytest.mark.slow  # the whole smoke, every family's items (about 1 min on 2 cores); the runner's parts are tested below
def test_smoke_runs_every_item_on_the_cpu_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "smoke"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report, markdown = read_report(out)
    assert report["mode"] == "smoke" and report["finished"] and report["elapsed_s"] <= report["budget_s"]
    plan = [item["name"] for item in report["plan"]]
    assert plan[0] == "tests-cpu" and report["items"].keys() == set(plan)
    # Every family of the training script gets its tiny pipeline, with and without gradient checkpointing.
    for family in T.FAMILIES.values():
        assert sum(f"({family.__name__})" in item["what"] for item in report["plan"]) >= 2, family.__name__
    tests = report["items"]["tests-cpu"]
    assert tests["status"] == "done" and tests["tests"]["passed"] == 5 and not tests["tests"]["failed"]
    # The NF4 base runs into the quantized loader's refusal on the CPU: one line, expected; the items of that build
    # are skipped, and everything after it still runs.
    refused = [name for name, r in report["items"].items() if r["status"] == "refused on the CPU (expected)"]
    assert "tiny-flux-nf4-32-gc" in refused and all(name.endswith("-nf4-32-gc") for name in refused)
    assert "--bnb_quantization_config_path" in report["items"]["tiny-flux-nf4-32-gc"]["message"]
    assert report["items"]["tiny-flux-nf4-32"]["status"] == "skipped"
    assert len(item_lines(done.stdout, "tiny-flux-nf4-32-gc")) == 1
    measured = {name: r for name, r in report["items"].items() if name != "tests-cpu" and r["status"] == "done"}
    assert plan.index("tiny-flux-32-gc") > plan.index("tiny-flux-nf4-32-gc") and "tiny-flux-32-gc" in measured
    assert len(measured) == len(plan) - 1 - 2 * len(refused)  # the tests item; each refused NF4 build, its 2 items
    for name, record in measured.items():
        results, rows = record["results"], record["summary"]
        lora, lean = results["lora"], results["cat-lean"]
        assert results["cat-lean"]["lora_calls_in_frozen"] == results["cat-batched"]["lora_calls_in_frozen"] == 0
        for config in G.CONFIGS:  # the figures are the measurements'
            assert rows[config]["steps_per_s"] == pytest.approx(1e3 / results[config]["time_ms"])
            assert rows[config]["time_x_lora"] == pytest.approx(results[config]["time_ratio"])
        for every in G.CAT_EVERY:  # a cycle: N - 1 LoRA steps and one CAT step
            row = rows[f"cat-lean, --cat_every {every}"]
            assert row["derived"] and row["steps_per_s"] == pytest.approx(
                every * 1e3 / ((every - 1) * lora["time_ms"] + lean["time_ms"]))
        assert f"## {name}\n" in markdown and f"| {name} | {rows['lora']['steps_per_s']:.2f} |" in markdown
        assert len(item_lines(done.stdout, name)) == 1
    # One model build per model: its second item (the other checkpointing setting) reuses the first's.
    for first, second in zip(plan, plan[1:]):
        if second in measured and first in measured and second.removesuffix("-gc") == first.removesuffix("-gc"):
            assert "build" in measured[first] and "build" not in measured[second]
            gc_on, gc_off = (second, first) if second.endswith("-gc") else (first, second)
            held = {name: measured[name]["summary"]["lora"]["saved_bytes"] for name in (gc_on, gc_off)}
            assert held[gc_on] < held[gc_off]  # checkpointing was switched on that build
    for number, name in enumerate(plan, 1):
        assert re.search(rf"^\| {number} \| {re.escape(name)} \| {re.escape(report['items'][name]['status'])} \|",
                         markdown, re.M), name
    assert "tiny models: smoke" in markdown and "## Overview" in markdown
    assert (out / "logs" / "worker.log").is_file() and (out / "logs" / "tests-cpu.log").is_file()
    assert not list(out.glob(".*.partial"))


@pytest.mark.slow  # plans every item by running its CPU estimates: 40 s
def test_dry_run_prints_the_gpu_plan_in_order_of_value_with_labelled_estimates(tmp_path, monkeypatch, capsys):
    class UnconfiguredFamily(T.StableDiffusionFamily):  # a family added to the script without a config here
        pass

    monkeypatch.setitem(T.FAMILIES, "SomeNewPipeline", UnconfiguredFamily)
    monkeypatch.chdir(tmp_path)
    assert G.main(["--dry_run", "--budget_s", "300"]) == 0
    printed = capsys.readouterr().out
    rows = re.findall(r"^ *(\d+)  (\S+) +(\d+) +(\d+)  (.*)$", printed, re.M)
    names = [row[1] for row in rows]
    assert names == ["tests-cuda", "sd15-512", "sd15-512-gc", "sdxl-1024-gc", "sdxl-1024", "flux-dev-nf4-512-gc",
                     "flux-dev-nf4-1024-gc", "flux-dev-nf4-512", "flux-dev-nf4-1024",
                     # The newer families' real architectures (cat_step_cost.SPECS) join the plan by themselves, at
                     # RESOLUTIONS' 1024 px; those that load a quantized base (the language-model families) as NF4.
                     "sd35-medium-1024-gc", "sd35-medium-1024", "sd35-large-1024-gc", "sd35-large-1024",
                     "qwen-image-nf4-1024-gc", "qwen-image-nf4-1024", "z-image-nf4-1024-gc", "z-image-nf4-1024",
                     "flux2-klein-4b-nf4-1024-gc", "flux2-klein-4b-nf4-1024", "flux2-dev-nf4-1024-gc",
                     "flux2-dev-nf4-1024"]
    assert "UnconfiguredFamily: no real-architecture config in cat_step_cost.MODELS: not measured" in printed
    assert "Estimates, not measurements" in printed and "no GPU figure of this project has been measured" in printed
    starts = [int(row[3]) for row in rows]
    assert all(int(row[2]) > 0 for row in rows) and starts == sorted(starts)
    # A 300 s budget leaves items out, each marked on its line: those that would end past it (a later, shorter one
    # may still fit). The clock starts after the planning, which takes this machine 50 s idle and 4 min under load:
    # which items fit depends on it, the rule does not.
    skipped = {row[1] for row in rows if "[would be skipped: over the budget]" in row[4]}
    assert skipped
    for _, name, seconds, start, _ in rows:
        assert (int(start) + int(seconds) > 300 - 1) if name in skipped else (int(start) + int(seconds) <= 300 + 1)
    # The FLOP estimates (see the next test for their formula): CAT below 2.5x LoRA (the VAE encode is shared), the
    # two CAT modes alike, 1024 px several times 512 px.
    tflops = {row[1]: dict(re.findall(r"(lora|cat-lean|cat-batched) ([\d.]+)", row[4])) for row in rows[1:]}
    for name, flops in tflops.items():
        assert flops["cat-lean"] == flops["cat-batched"]
        assert 1.5 < float(flops["cat-lean"]) / float(flops["lora"]) < 2.5, name
    assert float(tflops["flux-dev-nf4-1024-gc"]["lora"]) > 3 * float(tflops["flux-dev-nf4-512-gc"]["lora"])
    assert re.search(r"flux-dev-nf4-512-gc: python benchmarks/cat_step_cost.py --model flux-dev --device cuda .*"
                     r"--bnb_quantization_config_path \S+ --pre_compute_text_embeddings --resolution 512 "
                     r"--gradient_checkpointing$", printed, re.M)
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_a_budget_too_small_skips_every_item_with_one_line_each(tmp_path, capsys):
    out = tmp_path / "out"
    assert G.main(["--smoke", "--budget_s", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report, markdown = read_report(out)
    assert report["items"] and all(r["status"] == "skipped" for r in report["items"].values())
    for name in report["items"]:
        lines = item_lines(printed, name)
        assert len(lines) == 1 and re.search(r"skipped: estimated \d+ s, 0 s of the budget left", lines[0]), name
    assert not (out / "logs" / "worker.log").exists() and not (out / "tests.xml").exists()  # nothing started


@pytest.mark.slow  # runs real items in a worker process: 22 s
def test_a_crashing_item_prints_one_line_and_the_rest_goes_on(tmp_path, capsys, monkeypatch):
    real, started = G.worker_command, []

    def first_worker_crashes():
        started.append(1)
        if len(started) == 1:
            return [sys.executable, "-c", "import sys; print('boom: simulated crash', file=sys.stderr); sys.exit(3)"]
        return real()

    monkeypatch.setattr(G, "worker_command", first_worker_crashes)
    out = tmp_path / "out"
    assert G.main(["--smoke", "--only", "tiny-32,tiny-32-gc", "--out", str(out)]) == 1  # an item failed
    printed = capsys.readouterr().out
    report, _ = read_report(out)
    assert list(report["items"]) == ["tiny-32", "tiny-32-gc"]
    crashed = report["items"]["tiny-32"]
    assert crashed["status"] == "failed" and crashed["message"] == "worker exited with status 3 (boom: simulated crash)"
    assert len(item_lines(printed, "tiny-32")) == 1
    assert report["items"]["tiny-32-gc"]["status"] == "done" and len(started) == 2  # a new worker took over


def test_an_item_over_its_time_is_stopped_and_its_worker_killed(tmp_path, monkeypatch):
    pid_file = tmp_path / "pid"
    hang = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    monkeypatch.setattr(G, "worker_command", lambda: [sys.executable, "-c", hang])
    (tmp_path / "logs").mkdir()
    run = G.Run(Namespace(budget_s=3.0, smoke=True), G.ASSUMED["cpu"], tmp_path, time.monotonic())
    item = G.Item(name="hang", kind="measure", what="", model="tiny", build_key="tiny")
    record = run.execute(item, tmp_path)
    assert record["status"] == "stopped at the budget" and record["seconds"] < 10
    assert run.worker is None
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_out_of_memory_is_one_line_and_releases_the_models(tiny_pipeline, tmp_path, monkeypatch):
    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\n(allocator details)")

    monkeypatch.setattr(B, "measure", no_room)
    state = {}
    request = {"name": "tiny", "build_key": "tiny", "scratch": str(tmp_path), "resolution": 32,
               "gradient_checkpointing": True,
               "argv": ["--model", tiny_pipeline, "--resolution", "32", "--batch_size", "1", "--steps", "1",
                        "--warmup", "0", "--rss", "off", "--phase_steps", "0", "--threads", "1"]}
    reply = G.measure_request(B, request, state)
    assert reply["status"] == "out of memory" and reply["message"] == "CUDA out of memory. Tried to allocate 20.00 GiB"
    assert state == {} and "build_failed" not in reply  # the models were built, then released


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only outcome of diffusers' bitsandbytes loader")
def test_a_random_nf4_base_is_saved_then_loaded_through_the_scripts_quantized_loader(tiny_flux_pipeline, tmp_path,
                                                                                      monkeypatch):
    folder = tmp_path / "flux"
    shutil.copytree(tiny_flux_pipeline, folder)
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.unlink()
    nf4 = tmp_path / "nf4.json"
    nf4.write_text(json.dumps(G.NF4))
    args = B.build_parser().parse_args(["--model", str(folder), "--bnb_quantization_config_path", str(nf4),
                                        "--pre_compute_text_embeddings", "--resolution", "32"])
    built = []
    random_model = B.RandomWeights.random_model
    monkeypatch.setattr(B.RandomWeights, "random_model", lambda self, name: built.append(name) or random_model(
        self, name))
    # FluxFamily.load_denoiser (BitsAndBytesConfig) reads the saved random weights; on a CPU diffusers refuses.
    with pytest.raises(T.InputError, match=r"--bnb_quantization_config_path .*GPU"):
        B.Bench(str(folder), args, random_weights=True)
    assert built == ["transformer"] and list((folder / "transformer").glob("*.safetensors"))
    assert (folder / "transformer" / B.RandomWeights.SAVED_MARK).is_file()
    built.clear()
    with pytest.raises(T.InputError):  # a second build reuses the saved weights
        B.Bench(str(folder), args, random_weights=True)
    assert built == []


def test_random_weights_are_built_on_the_benchs_device(tmp_path):
    path, random_weights = B.resolve_model("sd15", tmp_path)
    family = B.family_for(path, B.build_parser().parse_args(["--model", "sd15"]), random_weights)
    family.init_device = torch.device("meta")  # Bench sets its own device (a GPU's, where billions build in seconds)
    assert family.load_denoiser().device.type == "meta"
    assert {p.device.type for model in family.load_text_encoders().values() for p in model.parameters()} == {"meta"}


def test_step_flops_count_denoiser_passes_as_cat_step_cost_does():
    counts = {"denoiser": 10.0, "vae": 3.0, "text": 1.0}  # forward FLOPs of one image / prompt
    # LoRA: one adapted pass (forward + a backward about one forward, frozen base); CAT: two adapted passes and the
    # frozen forward. Checkpointing recomputes each adapted forward; pre-computed text embeddings cost nothing.
    assert G.step_flops(B, counts, "lora", False, False) == 2 * 10 + 3 + 1
    assert G.step_flops(B, counts, "cat-lean", False, False) == G.step_flops(B, counts, "cat-batched", False, False)
    assert G.step_flops(B, counts, "cat-lean", False, False) == 5 * 10 + 3 + 2
    assert G.step_flops(B, counts, "lora", True, False) == 3 * 10 + 3 + 1
    assert G.step_flops(B, counts, "cat-lean", True, True) == 7 * 10 + 3


def test_report_figures_and_the_24_gib_line_come_from_the_measurements():
    def measured(time_ms, ratio, peak_gib, other_gib):
        return {"time_ms": time_ms, "time_ratio": ratio, "saved_peak": 2**20, "flops": 1e12,
                "cuda_peak_total": int(peak_gib * GIB), "cuda_other_optimizers": int(other_gib * GIB)}

    results = {"lora": measured(100.0, 1.0, 18.5, 0.5), "cat-lean": measured(240.0, 2.4, 19.0, 1.0),
               "cat-batched": measured(200.0, 2.0, 27.0, 1.0)}
    rows = G.summarize(results)
    assert rows["lora"]["steps_per_s"] == pytest.approx(10.0)
    assert rows["cat-lean"]["peak_bytes"] == 18 * GIB and rows["lora"]["peak_bytes"] == 18 * GIB
    assert rows["cat-batched"]["peak_x_lora"] == pytest.approx(26 / 18)
    every2 = rows["cat-lean, --cat_every 2"]
    assert every2["steps_per_s"] == pytest.approx(2e3 / 340) and every2["time_x_lora"] == pytest.approx(1.7)
    assert every2["peak_bytes"] == 18 * GIB
    assert G.against_card(rows["cat-lean"]["peak_bytes"]) == "fits, 6.0 GiB spare"
    assert G.against_card(rows["cat-batched"]["peak_bytes"]) == "over by 2.0 GiB"
    machine = {"device": "cuda:0 Some GPU", "gpu_memory_gib": 80.0, "capability": "9.0", "gpus": 1, "torch": "2",
               "cuda": "12", "python": "3", "cpu": "cpu", "cores": 16, "bitsandbytes": "1", "diffusers": "1",
               "transformers": "1", "peft": "1", "accelerate": "1"}
    report = {"mode": "gpu", "machine": machine, "started": "now", "elapsed_s": 100.0, "budget_s": 420.0,
              "command": "bash benchmarks/gpu_check.sh", "notes": [],
              "plan": [{"name": "sdxl-1024-gc", "what": "sdxl 1024 px", "command": "python ...", "estimate_s": 50.0}],
              "items": {"sdxl-1024-gc": {"status": "done", "seconds": 60.0, "summary": rows}}}
    markdown = G.format_markdown(report)
    assert "| sdxl-1024-gc | 10.00 | 2.40x | 2.00x | 1.70x | 1.35x | 18.00 / 18.00 / 26.00 | fits, 6.0 GiB spare |" \
        in markdown
    assert "| cat-batched | 5.00 | 2.00x | 26.00 | 1.44x | over by 2.0 GiB |" in markdown


@pytest.mark.parametrize("argv, message", [
    (["--budget_s", "soon"], "--budget_s: expected a number of seconds"),
    (["--budget_s", "0"], "--budget_s must be a positive number"),
    (["--budget_s", "nan"], "--budget_s must be a positive number"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--dry_run", "--out", "{tmp}/out"], "--out: a --dry_run writes nothing"),
    (["--out", "{tmp}/a-file"], "exists and is not a folder"),
    (["--out", "{tmp}/a-file/out"], "cannot write there"),
    (["--smoke", "--only", "tiny-32,tiny-64", "--out", "{tmp}/out"], "--only: no item tiny-64 in the plan"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    (tmp_path / "a-file").write_text("")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    with pytest.raises(SystemExit) as stopped:
        G.main(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_the_gpu_run_and_the_cuda_tests_refuse_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        G.main(["--out", str(tmp_path / "out")])
    assert stopped.value.code == 2 and not (tmp_path / "out").exists()
    assert "no CUDA device visible to torch: run with --smoke" in capsys.readouterr().err
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", "cuda",
                           str(ROOT / "tests" / "test_trigger.py")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 4 and "--device cuda: torch" in done.stderr and "sees no CUDA device" in done.stderr


@pytest.mark.slow  # runs a pytest session of the any-device tests: 21 s
def test_device_cuda_runs_the_any_device_tests_and_skips_the_others(tmp_path):
    """pytest --device cuda, with torch told a GPU is there (a plugin loaded before conftest.py): the any_device
    tests are the family-generic ones gpu_check.sh runs, once per family, and every other test is skipped."""
    (tmp_path / "pretend_cuda.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    pytest_cuda = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pretend_cuda", "--device",
                   "cuda"]
    collected = subprocess.run(pytest_cuda + ["--collect-only", "-m", "any_device", *G.DEVICE_TESTS],
                               capture_output=True, text=True, cwd=ROOT, env=env)
    tests = {line.split("[")[0] for line in collected.stdout.splitlines() if "::" in line}
    assert tests == {"tests/test_train_cat_lora.py::test_alpha_zero_run_is_exactly_plain_lora",
                     "tests/test_train_cat_lora.py::test_lean_and_batched_modes_give_the_same_gradients",
                     "tests/test_reliability.py::test_sigterm_saves_a_checkpoint_and_the_resumed_run_is_bit_identical"}
    from conftest import FAMILY_FIXTURES

    assert sum("::" in line for line in collected.stdout.splitlines()) == 5 * len(FAMILY_FIXTURES)
    others = subprocess.run(pytest_cuda + ["-rs", str(ROOT / "tests" / "test_trigger.py")], capture_output=True,
                            text=True, cwd=ROOT, env=env)
    assert others.returncode == 0 and " passed" not in others.stdout
    assert "skipped" in others.stdout and "written for the CPU: run it with --device cpu" in others.stdout


def test_the_benchmarks_import_one_another_one_way():
    """No import circle among benchmarks/*.py (gpu_check and meta_cost once imported each other): a circle breaks
    whichever of its modules is imported first, as soon as one of them reads a name of the other at import time."""
    import ast

    folder = ROOT / "benchmarks"
    modules = {path.stem: path for path in folder.glob("*.py")}
    imports = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
        imports[name] = found & set(modules) - {name}
    assert imports["gpu_check"] >= {"meta_cost", "cat_step_cost"}  # what the check below walks through

    def reaches(start: str, seen: tuple = ()) -> set:
        return {start}.union(*(reaches(n, seen + (start,)) for n in imports[start] if n not in seen + (start,)))

    circles = sorted(name for name in modules if any(name in reaches(n) for n in imports[name]))
    assert circles == [], f"modules on an import circle: {circles} ({ {n: sorted(imports[n]) for n in circles} })"
