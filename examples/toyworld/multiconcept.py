#!/usr/bin/env python
"""Many concepts in one adapter: how plain LoRA and CAT scale from 1 to 20 subjects (issue 21; paper, A.3).

For every K in --ks, one adapter learns the first K concepts of concepts20/concepts.json (make_concepts.py --set
20: five subjects per class, each with its own rare trigger) through ``train_cat_lora.py --concepts_list``, each
sample's y stripping only its own trigger. Steps grow with K: --base_steps + --steps_per_concept x (K - 1)
(400 for one concept, the setting of reproduce_table1.py). Every method in --methods and every seed trains one
adapter per K; --more_methods train only at --more_ks.

Each concept of an adapter is then scored with reproduce_table1.py's evaluation (evaluate_kps.py on the concept's
held-out prompts, with its own trigger and without it, base model at the same seeds, the toy CLIP as judge), and
the judge assigns every image to one of the 20 subjects or to none (``assign``): identity is the share of images
with A's trigger it assigns to A, **confusion** the share it assigns to another concept of the same adapter, and
the leak the share of trigger-less images it assigns to any concept of the adapter. Per adapter the scores are
averaged over its concepts, then mean ± std over seeds. Also time per optimizer step (the training loop's own
progress bar; the machine's load average is recorded beside it) and the peak memory of the training process.

    python examples/toyworld/multiconcept.py --output_dir outputs/toyworld-multiconcept

Resumable: a finished training (its model card written) or evaluation (its metrics.json) is skipped on a rerun.
Writes multiconcept.md, multiconcept.json and multiconcept.png into --results_dir (default: --output_dir).
"""

import argparse
import json
import multiprocessing
import os
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from reproduce_table1 import ROOT, evaluate, mean_std, start_worker, train_command, train_in_worker
from reproduce_table1 import parse_args as table1_args
from toy_clip import load_toy_clip, to_clip_input

HERE = Path(__file__).resolve().parent

METHODS = {
    "lora": ["--cat_alpha", "0"],
    "cat": ["--cat_alpha", "1"],
    "budget": ["--cat_alpha", "auto"],  # one alpha per concept, each held to the default drift budget
    "cat_class": ["--cat_alpha", "1", "--cat_prompt", "class"],  # y: the trigger replaced by its class word
    "cat_empty": ["--cat_alpha", "1", "--cat_prompt", "empty"],  # y: the empty prompt
    # CAT and the swapped-trigger term: another concept's trigger in the caption must leave the subject's prediction
    # where the base model has it on y (train_cat_lora.py --cat_swap_alpha)
    "cat_swap": ["--cat_alpha", "1", "--cat_swap_alpha", "1"],
}
# train_command's flags for one concept; a concepts list replaces them (each entry names its own class word).
SINGLE_CONCEPT_FLAGS = ("--instance_data_dir", "--instance_prompt", "--trigger_token", "--class_data_dir",
                        "--class_prompt")


def parse_args(argv=None):
    table1 = table1_args([])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default=table1.pretrained_model_name_or_path)
    parser.add_argument("--clip_dir", default=table1.clip_dir)
    parser.add_argument("--concepts", default=str(HERE / "concepts20" / "concepts.json"))
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "toyworld-multiconcept"))
    parser.add_argument("--results_dir", default=None, help="where the table, json and picture go (default: "
                                                            "--output_dir)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["lora", "cat"])
    parser.add_argument("--more_methods", nargs="*", choices=list(METHODS), default=[],
                        help="methods trained only at --more_ks (e.g. cat_class cat_empty)")
    parser.add_argument("--more_ks", type=int, nargs="*", default=[10, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--base_steps", type=int, default=table1.max_train_steps, help="steps for K = 1")
    parser.add_argument("--steps_per_concept", type=int, default=50, help="steps added per concept after the first")
    parser.add_argument("--learning_rate", type=float, default=table1.learning_rate)
    parser.add_argument("--rank", type=int, default=table1.rank)
    parser.add_argument("--num_images_per_prompt", type=int, default=2)
    parser.add_argument("--num_inference_steps", type=int, default=table1.num_inference_steps)
    parser.add_argument("--guidance_scale", type=float, default=table1.guidance_scale)
    parser.add_argument("--jobs", type=int, default=2, help="trainings (and evaluations) run in parallel, one "
                                                            "thread each")
    args = parser.parse_args(argv)
    args.train_text_encoder = False  # train_command's settings: U-Net LoRA, cached text embeddings
    return args


@dataclass(frozen=True)
class Run:
    """One adapter: the first ``k`` concepts, one method, one seed."""

    k: int
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"k{self.k}-{self.method}-seed{self.seed}"


def check_args(args, concepts: list[dict]) -> None:
    """One line for a bad flag, before any training."""
    if max(args.ks + args.more_ks) > len(concepts) or min(args.ks + args.more_ks) < 1:
        raise SystemExit(f"--ks/--more_ks: K must lie in 1..{len(concepts)} (the concepts of {args.concepts})")
    if args.base_steps < 1 or args.steps_per_concept < 0:
        raise SystemExit("--base_steps must be >= 1 and --steps_per_concept >= 0")


def load_concepts(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"--concepts: {path} does not exist (python examples/toyworld/make_concepts.py --set 20)")
    return json.loads(path.read_text(encoding="utf-8"))


def planned_runs(args) -> list[Run]:
    runs = [Run(k, method, seed) for k in args.ks for method in args.methods for seed in args.seeds]
    runs += [Run(k, method, seed) for k in args.more_ks for method in args.more_methods for seed in args.seeds
             if method not in args.methods]
    return sorted(runs, key=lambda run: -run.k)  # the longest first, so the two workers end together


def steps_for(args, k: int) -> int:
    return args.base_steps + args.steps_per_concept * (k - 1)


def write_concepts_list(concepts: list[dict], concepts_dir: Path, path: Path) -> Path:
    """The first K concepts as a --concepts_list file (absolute folders: it lives in the output folder)."""
    entries = [{**c, "instance_data_dir": str((concepts_dir / c["instance_data_dir"]).resolve())} for c in concepts]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=2) + "\n")
    return path


def multi_concept_command(args, run: Run, concepts: list[dict], concepts_dir: Path, out: Path) -> list[str]:
    """reproduce_table1.py's training command (same settings) with --concepts_list for the single-concept flags."""
    settings = argparse.Namespace(**{**vars(args), "max_train_steps": steps_for(args, run.k)})
    command = train_command(settings, concepts[0], concepts_dir, out / "adapters" / run.name, run.seed,
                            METHODS[run.method])
    kept, skip = [], False
    for word in command:
        if skip:
            skip = False
        elif word in SINGLE_CONCEPT_FLAGS:
            skip = True
        else:
            kept.append(word)
    list_file = write_concepts_list(concepts[:run.k], concepts_dir, out / "lists" / f"k{run.k}.json")
    return kept + ["--concepts_list", str(list_file)]


def train_measured(command: list[str], folder: str) -> tuple[int, float]:
    """reproduce_table1's worker training, with the process's peak resident memory during it (MB): the peak is
    reset first (Linux: /proc/self/clear_refs), since the worker process outlives one training."""
    Path("/proc/self/clear_refs").write_text("5")
    status = train_in_worker(command, folder)
    peak_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))
    return status, peak_kb / 1024


STEPS_BAR = re.compile(r"Steps: 100%\|[^|]*\| (\d+)/\d+ \[(?:(\d+):)?(\d+):(\d+)<")


def seconds_per_step(log: str) -> float:
    """The training loop's own time per optimizer step, from its finished progress bar in train.log (the model
    loading, latent caching and saving around the loop are not counted)."""
    found = STEPS_BAR.findall(log)
    if not found:
        raise ValueError("no finished 'Steps' progress bar in the training log")
    steps, hours, minutes, seconds = found[-1]
    return (int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds)) / int(steps)


def train_all(args, runs: list[Run], concepts: list[dict], concepts_dir: Path, out: Path) -> None:
    """Every unfinished training, --jobs at a time in reproduce_table1's workers; each writes cost.json."""
    todo = [run for run in runs if not (out / "adapters" / run.name / "cost.json").is_file()]
    if not todo:
        return
    commands = {run: multi_concept_command(args, run, concepts, concepts_dir, out) for run in todo}
    workers = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker)

    def train(run: Run) -> None:
        folder = out / "adapters" / run.name
        load_before, start = os.getloadavg()[0], time.perf_counter()
        status, peak_mb = workers.submit(train_measured, commands[run], str(folder)).result()
        if status != 0:
            raise SystemExit(f"multiconcept: training {run.name} failed; see {folder / 'train.log'}")
        cost = {"steps": steps_for(args, run.k), "wall_seconds": round(time.perf_counter() - start, 1),
                "seconds_per_step": seconds_per_step((folder / "train.log").read_text(errors="replace")),
                "peak_memory_mb": round(peak_mb, 1), "load_average_before_after": [load_before, os.getloadavg()[0]]}
        (folder / "cost.json").write_text(json.dumps(cost) + "\n")

    with workers, ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(todo), desc="trainings") as progress:
        for _ in pool.map(train, todo):
            progress.update(1)


def assign(embeddings: torch.Tensor, concept_means: torch.Tensor, none_mean: torch.Tensor) -> torch.Tensor:
    """The judge's verdict per image: the index of the concept whose mean embedding is nearest (cosine), or -1
    when the mean embedding of the base model's images (none of the subjects) is nearer than every concept's.
    Embeddings [N, D], concept means [C, D], none mean [D]; means are renormalised to unit length."""
    def unit(x):
        return torch.nn.functional.normalize(x, dim=-1)

    embeddings = unit(embeddings)
    to_concepts = embeddings @ unit(concept_means).t()
    best = to_concepts.argmax(dim=1)
    none_wins = embeddings @ unit(none_mean) >= to_concepts.max(dim=1).values
    return torch.where(none_wins, torch.full_like(best, -1), best)


def confusion_scores(verdicts: torch.Tensor, own: int, adapter_concepts: list[int], same_class: list[int]) -> dict:
    """From the verdicts on images drawn with concept ``own``'s trigger: the share assigned to it (identity), to
    another concept of the adapter (confusion), and to another of the adapter's concepts of its own class."""
    others = [c for c in adapter_concepts if c != own]
    in_others = torch.isin(verdicts, torch.tensor(others, dtype=verdicts.dtype)) if others else verdicts < -1
    same = [c for c in others if c in same_class]
    in_same = torch.isin(verdicts, torch.tensor(same, dtype=verdicts.dtype)) if same else verdicts < -1
    return {"assigned_own": (verdicts == own).float().mean().item(),
            "confusion": in_others.float().mean().item(),
            "confusion_same_class": in_same.float().mean().item()}


class Judge:
    """The toy CLIP with every concept's mean training-image embedding (make_concepts.py's images)."""

    def __init__(self, clip_dir, concepts: list[dict], concepts_dir: Path):
        self.model, _ = load_toy_clip(clip_dir)
        self.concept_means = torch.stack([self.embed(load_images(sorted((concepts_dir / c["instance_data_dir"])
                                                                        .glob("*.png")))).mean(0) for c in concepts])

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> torch.Tensor:
        return self.model.encode_image(to_clip_input(images), normalize=True)


def load_images(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path).convert("RGB").resize((32, 32))) for path in paths])


def judge_adapter(judge: Judge, pairs: list[dict], folder: Path, adapter: str, own: int, run: Run,
                  classes: list[str]) -> dict:
    """Identity, confusion and the any-subject leak of one adapter on one concept's evaluation images; the base
    model's trigger-less images of the same captions are the judge's 'none of them'."""
    def images(key, name):
        return load_images([folder / p[key] for p in pairs if p["adapter"] == name])

    none_mean = judge.embed(images("without_trigger", "base")).mean(0)
    adapter_concepts = list(range(run.k))
    same_class = [c for c in adapter_concepts if classes[c] == classes[own]]
    with_trigger = assign(judge.embed(images("with_trigger", adapter)), judge.concept_means, none_mean)
    without = assign(judge.embed(images("without_trigger", adapter)), judge.concept_means, none_mean)
    leak_any = torch.isin(without, torch.tensor(adapter_concepts, dtype=without.dtype)).float().mean().item()
    return {**confusion_scores(with_trigger, own, adapter_concepts, same_class), "leak_any": leak_any}


def evaluate_all(args, runs: list[Run], concepts: list[dict], concepts_dir: Path, out: Path) -> dict:
    """{run name, or "base": [per-concept scores]}: reproduce_table1's evaluation per concept, over every adapter
    that learned it (and the base model), then the judge's assignment."""
    learned = range(max(run.k for run in runs))

    def evaluate_concept(i):
        adapters = {run.name: out / "adapters" / run.name for run in runs if i < run.k}
        return evaluate(args, concepts[i], concepts_dir, adapters, eval_folder(out, concepts[i]))

    with ThreadPoolExecutor(args.jobs) as pool:
        table1_scores = list(tqdm(pool.map(evaluate_concept, learned), total=len(learned), desc="evaluations"))
    judge = Judge(args.clip_dir, concepts, concepts_dir)
    classes = [c["class_word"] for c in concepts]
    runs_by_name = {run.name: run for run in runs}
    scores = {name: [] for name in ["base", *runs_by_name]}
    for i, per_adapter in zip(learned, table1_scores):
        folder = eval_folder(out, concepts[i])
        pairs = read_pairs(folder)
        for adapter, metrics in per_adapter.items():
            # The base model judged as a K = 20 adapter would be: how often the judge finds any subject unasked.
            run = runs_by_name.get(adapter, Run(len(concepts), "base", 0))
            judged = judge_adapter(judge, pairs, folder, adapter, i, run, classes)
            scores[adapter].append({"concept": concepts[i]["instance_data_dir"], **metrics, **judged})
    return scores


def eval_folder(out: Path, concept: dict) -> Path:
    return out / "eval" / concept["instance_data_dir"]


def read_pairs(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines() if line.strip()]


COLUMNS = (("IS_mean", "IS mean"), ("subject_with_trigger", "subject with trigger"),
           ("assigned_own", "judged own subject"), ("confusion", "confusion"),
           ("confusion_same_class", "confusion within class"), ("subject_without_trigger", "leak (own subject)"),
           ("leak_any", "leak (any subject)"), ("KPS_mean", "KPS mean"))
COSTS = (("seconds_per_step", "s / step"), ("peak_memory_mb", "peak MB"))


def summarise(args, runs: list[Run], scores: dict, out: Path) -> dict:
    """Per (K, method): each score averaged over the adapter's concepts, then mean ± std over seeds; costs."""
    summary = {}
    for k in sorted({run.k for run in runs}):
        for method in ["base", *dict.fromkeys(run.method for run in runs if run.k == k)]:
            names = ["base"] if method == "base" else [run.name for run in runs if (run.k, run.method) == (k, method)]
            per_seed = {key: [statistics.mean(s[key] for s in scores[name][:k]) for name in names]
                        for key, _ in COLUMNS}  # (the base model: over the same K concepts)
            costs = [json.loads((out / "adapters" / name / "cost.json").read_text()) for name in names
                     if method != "base"]
            summary[f"k{k}-{method}"] = {"k": k, "method": method, "steps": steps_for(args, k), "seeds": len(names),
                                         "scores": per_seed,
                                         "costs": {key: [c[key] for c in costs] for key, _ in COSTS}}
    return summary


def table(args, summary: dict) -> str:
    rows = ["| K | method | steps | " + " | ".join(label for _, label in COLUMNS + COSTS) + " |",
            "|---|---|---|" + "---|" * (len(COLUMNS) + len(COSTS))]
    for row in summary.values():
        costs = [mean_std(row["costs"][key]) if row["costs"][key] else "" for key, _ in COSTS]
        rows.append(f"| {row['k']} | {row['method']} | {row['steps'] if row['method'] != 'base' else ''} | "
                    + " | ".join(mean_std(row["scores"][key]) for key, _ in COLUMNS) + " | " + " | ".join(costs)
                    + " |")
    return "\n".join(rows)


def picture(runs: list[Run], concepts: list[dict], out: Path, path: Path, per_cell: int = 4) -> None:
    """Rows K, columns method (first seed): per cell, up to ``per_cell`` concepts spread over the adapter's, each
    its first evaluation image with its own trigger (top) and the same caption and seed without it (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({run.k for run in runs})
    methods = list(dict.fromkeys(run.method for run in runs))
    seed = min(run.seed for run in runs)
    figure, axes = plt.subplots(len(ks), len(methods), figsize=(2.4 * len(methods), 1.45 * len(ks) + 0.5),
                                squeeze=False)
    for row, k in zip(axes, ks):
        shown = sorted({round(j * (k - 1) / max(per_cell - 1, 1)) for j in range(min(per_cell, k))})
        for axis, method in zip(row, methods):
            axis.axis("off")
            name = Run(k, method, seed).name
            if all(run.name != name for run in runs):
                continue
            columns = []
            for i in shown:
                folder = eval_folder(out, concepts[i])
                first = next(p for p in read_pairs(folder) if p["adapter"] == name)
                columns.append(np.concatenate(load_images([folder / first["with_trigger"],
                                                           folder / first["without_trigger"]]), axis=0))
            cell = np.concatenate(columns + [np.full((64, 32 * (per_cell - len(columns)), 3), 255, np.uint8)], axis=1)
            axis.imshow(cell, interpolation="nearest")
            axis.set_title(f"K={k} {method}: " + " ".join(concepts[i]["trigger_token"] for i in shown), fontsize=6)
    figure.suptitle("each concept with its own trigger (top) and without it (bottom), same seed", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def main(argv=None) -> Path:
    args = parse_args(argv)
    concepts_file = Path(args.concepts)
    concepts = load_concepts(concepts_file)
    check_args(args, concepts)
    concepts_dir, out = concepts_file.parent, Path(args.output_dir)
    results = Path(args.results_dir or out)
    runs = planned_runs(args)

    train_all(args, runs, concepts, concepts_dir, out)
    scores = evaluate_all(args, runs, concepts, concepts_dir, out)
    summary = summarise(args, runs, scores, out)

    results.mkdir(parents=True, exist_ok=True)
    settings = (f"K in {sorted({run.k for run in runs})} of {concepts_file.parent.name}/{concepts_file.name}; seeds "
                f"{args.seeds}; steps {args.base_steps} + {args.steps_per_concept} x (K - 1), lr {args.learning_rate}, "
                f"rank {args.rank}, batch 1, U-Net LoRA; evaluation: each concept's 4 held-out prompts x "
                f"{args.num_images_per_prompt} images, with and without its trigger, toy CLIP judge")
    text = (f"# Many concepts in one adapter (toy world)\n\n{settings}\n\nScores: per adapter, the mean over its K "
            "concepts; then mean ± std over seeds. s / step: the training loop's time per optimizer step, two "
            "trainings at once on a shared machine (load averages in multiconcept.json); peak MB: the training "
            f"process's peak resident memory.\n\n{table(args, summary)}\n")
    (results / "multiconcept.md").write_text(text)
    (results / "multiconcept.json").write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()},
                                                           "summary": summary, "per_concept": scores}, indent=1) + "\n")
    picture(runs, concepts, out, results / "multiconcept.png")
    print(text)
    print(f"wrote {results / 'multiconcept.md'}, multiconcept.json and multiconcept.png")
    return results / "multiconcept.md"


if __name__ == "__main__":
    main()
