#!/usr/bin/env python
"""The paper's open questions 2 and 3 in the toy world (issue 31).

--question 2: many training images. Each subject gets training sets of --sizes rendered images (a stream: the set of
6 is the start of the set of 24; positions, sizes and backgrounds varied as make_concepts.py varies them), and LoRA,
DreamBooth-style prior preservation and CAT train on each, per seed, under two step rules: "total" (every size
trains --steps steps) and "per_image" (--steps x n / the smallest n: the same number of steps per image). The
subjects default to Table 1's five and two that need geometric precision (make_concepts.OQ_SUBJECTS: elio, 6 thin
stripes; folia, a square with a notch). Besides identity (the subject judge's ID rate, IS) and preservation (KPS,
base-closeness of the trigger-less images), it measures diversity: for each prompt, the mean pairwise distance of
the generated images with the trigger, in the judge's features (where the subject fits best and the background
color: judge.diversity_features) and in pixels, against the training set's own diversity; and how stable that is
across training seeds.

--question 3: subjects from outside the base model's domain (a star, an outline ring, a gradient fill, a noisy
light-blue background; make_concepts.OQ_SUBJECTS, group "out-of-domain") against Table 1's five in-domain subjects,
at Table 1's settings (6 images, --steps steps): identity, KPS, the base-closeness of the trigger-less prompts and
the drift on prompts unlike the captions (evaluate_kps.py --unrelated_prompts), for the same three methods.

Both train with reproduce_table1.py's training command (lr 1.5e-3, rank 4, batch 1, cached latents and text
embeddings, batched CAT passes), score with its evaluation (evaluate_kps.py --subject_judge toyworld, the unseen
prompts of each subject, whose references are rendered apart from every training image), skip every training and
evaluation whose outputs exist (run the command again to resume), and write the question's section of
results/open_questions.md and open_questions.json, and its picture (open_questions_q2.png / _q3.png).

    python examples/toyworld/open_questions.py --question 2      # full protocol: resumable, hours on 2 cores
    python examples/toyworld/open_questions.py --question 3

Bad input is refused in one line before any training.
"""

import argparse
import json
import math
import shlex
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_concepts  # noqa: E402
import reproduce_table1 as table1  # noqa: E402

METHODS = {name: table1.METHODS[name] for name in ("lora", "dreambooth", "cat")}
RULES = ("total", "per_image")
GROUPS = {2: ("in-domain", "precision"), 3: ("in-domain", "out-of-domain")}
DEFAULT_SUBJECTS = {q: [s.name for s in make_concepts.OQ_SUBJECTS if s.group in groups] for q, groups in GROUPS.items()}
DEFAULT_SIZES = {2: [6, 24, 60], 3: [6]}
# The metrics each question reports (metrics.json keys of evaluate_kps.py, and the diversity of open_questions).
Q2_KEYS = ("ID_rate", "IS_mean", "KPS_mean", "base_pixel_change", "div_judge", "div_pixels")
Q3_KEYS = ("ID_rate", "IS_mean", "KPS_mean", "base_pixel_change", "base_same_reading", "unrelated_cosine",
           "unrelated_pixel_change")
TITLES = {"ID_rate": "ID rate", "IS_mean": "IS mean", "KPS_mean": "KPS mean", "base_pixel_change": "Δpx base ↓",
          "base_same_reading": "same as base", "unrelated_cosine": "unrelated cos", "unrelated_pixel_change":
          "unrelated Δpx ↓", "div_judge": "diversity (judge)", "div_pixels": "diversity (pixels)"}


class InputError(SystemExit):
    """Bad input, refused in one line before any work."""

    def __init__(self, message: str):
        super().__init__(f"open_questions.py: error: {message}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--question", type=int, choices=[2, 3], required=True)
    parser.add_argument("--subjects", nargs="+", default=None,
                        help=f"subject names (make_concepts.OQ_SUBJECTS: {', '.join(make_concepts.OQ_BY_NAME)}); "
                             "default: the question's groups")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="training images per subject (question 2: 6 24 60; question 3: 6)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=f"of {', '.join(METHODS)}")
    parser.add_argument("--rules", nargs="+", default=list(RULES),
                        help="question 2's step rules: total (--steps for every size), per_image (--steps x n / the "
                             "smallest n)")
    parser.add_argument("--steps", type=int, default=400, help="training steps at the smallest size")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the rendered training and reference images")
    parser.add_argument("--num_images_per_prompt", type=int, default=None,
                        help="images per evaluation prompt (question 2: 6, for the diversity; question 3: 4)")
    parser.add_argument("--output_dir", default=None, help="default: outputs/toyworld-oq<question>")
    parser.add_argument("--results_dir", default=str(HERE / "results"),
                        help="where open_questions.md/.json and the picture go")
    parser.add_argument("--label", default="",
                        help="a note for the results (e.g. 'reduced protocol: ...'); the command line is always given")
    parser.add_argument("--tag", default="",
                        help="a suffix for this run's results (open_questions_q<question><tag>.md/.png, json key "
                             "q<question><tag>), to keep a partial protocol beside the main one")
    parser.add_argument("--jobs", type=int, default=2, help="trainings (and evaluations) at a time, one thread each")
    parser.add_argument("--unrelated_prompts", default=str(HERE / "unrelated_prompts.txt"))
    defaults = table1.parse_args([])
    for name in ("pretrained_model_name_or_path", "clip_dir", "learning_rate", "rank", "num_inference_steps",
                 "guidance_scale"):
        parser.add_argument(f"--{name}", type=type(getattr(defaults, name)), default=getattr(defaults, name))
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args) -> None:
    """Fill the question's defaults and refuse bad input in one line (InputError)."""
    q = args.question
    args.subjects = args.subjects or DEFAULT_SUBJECTS[q]
    args.sizes = args.sizes or DEFAULT_SIZES[q]
    args.num_images_per_prompt = args.num_images_per_prompt or (6 if q == 2 else 4)
    args.output_dir = args.output_dir or str(table1.ROOT / "outputs" / f"toyworld-oq{q}")
    unknown = [s for s in args.subjects if s not in make_concepts.OQ_BY_NAME]
    if unknown:
        raise InputError(f"--subjects: {', '.join(unknown)} unknown (known: {', '.join(make_concepts.OQ_BY_NAME)})")
    for flag, values in (("--subjects", args.subjects), ("--sizes", args.sizes), ("--seeds", args.seeds),
                         ("--methods", args.methods), ("--rules", args.rules)):
        if len(set(values)) != len(values):
            raise InputError(f"{flag}: {' '.join(map(str, values))} repeats a value")
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise InputError(f"--methods: {', '.join(bad)} unknown (known: {', '.join(METHODS)})")
    bad = [r for r in args.rules if r not in RULES]
    if bad:
        raise InputError(f"--rules: {', '.join(bad)} unknown (known: {', '.join(RULES)})")
    if "cat" not in args.methods or len(args.methods) < 2:
        raise InputError(f"--methods {' '.join(args.methods)}: the results pair cat against lora or dreambooth; give "
                         "cat and at least one of them")
    if any(n < 2 for n in args.sizes):
        raise InputError(f"--sizes {' '.join(map(str, args.sizes))}: a training set needs at least 2 images")
    if args.steps < 1:
        raise InputError(f"--steps {args.steps}: must be at least 1")
    if args.num_images_per_prompt < 2:
        raise InputError(f"--num_images_per_prompt {args.num_images_per_prompt}: the diversity needs at least 2")
    if args.tag and not args.tag.replace("_", "").isalnum():
        raise InputError(f"--tag {args.tag!r}: letters, digits and underscores only")
    if args.jobs < 1:
        raise InputError(f"--jobs {args.jobs}: must be at least 1")
    groups = {make_concepts.OQ_BY_NAME[s].group for s in args.subjects}
    if q == 2 and len(args.sizes) < 2:
        raise InputError(f"--sizes {' '.join(map(str, args.sizes))}: question 2 compares sizes; give at least two")
    if q == 3:
        if len(args.sizes) != 1:
            raise InputError(f"--sizes {' '.join(map(str, args.sizes))}: question 3 trains at one size")
        missing = [g for g in GROUPS[3] if g not in groups]
        if missing:
            raise InputError(f"--subjects: question 3 compares out-of-domain with in-domain subjects; none is "
                             f"{' or '.join(missing)}")
        if "precision" in groups:
            raise InputError("--subjects: the precision subjects belong to question 2")
    if not Path(args.pretrained_model_name_or_path).is_dir():
        raise InputError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: no such folder")
    if q == 3 and not Path(args.unrelated_prompts).is_file():
        raise InputError(f"--unrelated_prompts {args.unrelated_prompts}: no such file")


def steps_for(args, n: int, rule: str) -> int:
    """Training steps at size ``n``: --steps ("total"), or --steps per smallest-set's worth of images ("per_image")."""
    return args.steps if rule == "total" else round(args.steps * n / min(args.sizes))


def plan(args) -> dict:
    """{(n, subject, adapter name): (train command, folder)}; an adapter is "<method>-s<steps>-seed<seed>", so sizes
    at which both rules give the same steps (the smallest) train once."""
    out = Path(args.output_dir)
    sets = make_concepts.write_oq_sets(out / "data", [make_concepts.OQ_BY_NAME[s] for s in args.subjects], args.sizes,
                                       args.data_seed)
    jobs = {}
    rules = args.rules if args.question == 2 else ["total"]
    for n in args.sizes:
        concepts = {c["instance_data_dir"]: c for c in json.loads(sets[n].read_text())}
        for subject in args.subjects:
            for steps in dict.fromkeys(steps_for(args, n, rule) for rule in rules):
                for seed in args.seeds:
                    for method in args.methods:
                        name = f"{method}-s{steps}-seed{seed}"
                        folder = out / "adapters" / f"n{n}" / subject / name
                        train_args = SimpleNamespace(**{**vars(args), "max_train_steps": steps,
                                                        "train_text_encoder": False, "catversion_steps": 0})
                        command = table1.train_command(train_args, concepts[subject], sets[n].parent, folder, seed,
                                                       METHODS[method])
                        jobs[n, subject, name] = (command, folder)
    return jobs


def units_in_order(args, jobs: dict) -> list[tuple[int, str]]:
    """The (size, subject) units, each trained then evaluated before the next, so that a run stopped early has whole
    units: subject by subject (question 3 alternates the groups), the sizes of a subject in turn."""
    subjects = list(args.subjects)
    if args.question == 3:
        groups = [[s for s in subjects if make_concepts.OQ_BY_NAME[s].group == g] for g in GROUPS[3]]
        subjects = [s for pair in zip(*groups) for s in pair] + [s for g in groups for s in g[min(map(len, groups)):]]
    return [(n, s) for s in subjects for n in args.sizes if any(k[:2] == (n, s) for k in jobs)]


def train_unit(args, workers, jobs: dict, progress) -> None:
    """The unit's trainings not yet done, --jobs at a time. DreamBooth's class images are generated by the first
    DreamBooth training of a class word while nothing else trains (the others then share them)."""
    todo = [job for job in jobs.values() if not (job[1] / "README.md").is_file()]
    first = [job for (n, subject, name), job in jobs.items() if name.startswith("dreambooth") and job in todo][:1]
    with ThreadPoolExecutor(args.jobs) as pool:
        for batch in (first, [job for job in todo if job not in first]):
            for _ in pool.map(lambda job: table1.train(workers, *job), batch):
                progress.update(1)


def unrelated_file(args, subject, out: Path) -> Path:
    """The unrelated prompts less those naming the subject's class word (as reproduce_bank.py)."""
    lines = [line for line in Path(args.unrelated_prompts).read_text().splitlines()
             if line.strip() and not line.startswith("#") and subject.class_word not in line.split()]
    path = out / "unrelated" / f"{subject.name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def read_images(paths) -> list:
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def evaluation_diversity(evaluation: Path, subject_trigger: str) -> dict:
    """Per adapter of an evaluation folder (pairs.jsonl), per caption: judge.diversity of its images with the
    trigger. Cached in diversity.json beside pairs.jsonl (rebuilt when pairs.jsonl is newer)."""
    import judge

    cache = evaluation / "diversity.json"
    pairs_file = evaluation / "pairs.jsonl"
    if cache.is_file() and cache.stat().st_mtime >= pairs_file.stat().st_mtime:
        return json.loads(cache.read_text())
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines() if line.strip()]
    result = {}
    for adapter in dict.fromkeys(p["adapter"] for p in pairs):
        result[adapter] = {}
        for caption in dict.fromkeys(p["caption"] for p in pairs if p["adapter"] == adapter):
            paths = [evaluation / p["with_trigger"] for p in pairs if p["adapter"] == adapter and p["caption"] == caption]
            result[adapter][caption] = judge.diversity(read_images(paths), judge.SUBJECTS[subject_trigger])
    cache.write_text(json.dumps(result, indent=1) + "\n")
    return result


def training_diversity(folder: Path, subject_trigger: str) -> dict:
    import judge

    return judge.diversity(read_images(sorted(folder.glob("*.png"))), judge.SUBJECTS[subject_trigger])


def evaluate_unit(args, jobs: dict, unit: tuple[int, str]) -> dict:
    """{adapter: metrics} of one (size, subject) unit, with each adapter's diversity per prompt (diversity) and its
    mean over the prompts (div_judge, div_pixels), and the training set's own (entry "training_set")."""
    out = Path(args.output_dir)
    n, subject_name = unit
    subject = make_concepts.OQ_BY_NAME[subject_name]
    data = out / "data" / f"n{n}"
    concept = next(c for c in json.loads((data / "concepts.json").read_text()) if c["instance_data_dir"] == subject_name)
    adapters = {name: folder for (m, s, name), (_, folder) in jobs.items() if (m, s) == unit}
    extra = ["--subject_judge", "toyworld"]
    if args.question == 3:
        extra += ["--unrelated_prompts", str(unrelated_file(args, subject, out))]
    evaluation = out / "eval" / f"n{n}" / subject_name
    metrics = table1.evaluate(args, concept, data, adapters, evaluation, extra=extra)
    per_prompt = evaluation_diversity(evaluation, subject.trigger)
    for name, scores in metrics.items():
        scores["diversity"] = per_prompt[name]
        scores["div_judge"] = statistics.mean(d["judge"] for d in per_prompt[name].values())
        scores["div_pixels"] = statistics.mean(d["pixels"] for d in per_prompt[name].values())
    metrics["training_set"] = {f"div_{k}": v for k, v in training_diversity(data / subject_name, subject.trigger).items()}
    return metrics


def run_units(args, jobs: dict) -> dict:
    """Train and evaluate unit by unit (units_in_order), with a progress bar; {(n, subject): metrics}."""
    from tqdm.auto import tqdm

    units = units_in_order(args, jobs)
    todo = sum(not (folder / "README.md").is_file() for _, folder in jobs.values())
    results = {}
    workers = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=table1.start_worker)
    with workers, tqdm(total=todo + len(units), desc="trainings and evaluations") as progress:
        for unit in units:
            train_unit(args, workers, {k: v for k, v in jobs.items() if k[:2] == unit}, progress)
            results[unit] = evaluate_unit(args, jobs, unit)
            progress.update(1)
    return results


# ---------------------------------------------------------------------------------------------------------
# Statistics and tables
# ---------------------------------------------------------------------------------------------------------


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (nan for one value)."""
    mean = statistics.mean(values)
    return mean, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else math.nan)


def fmt(mean: float, error: float, k: int | None = None, n: int | None = None) -> str:
    text = f"{mean:+.3f} ± {error:.3f}" if not math.isnan(error) else f"{mean:+.3f}"
    return text + (f" ({k}/{n})" if k is not None else "")


def paired(values_a: dict, values_b: dict) -> tuple[float, float, int, int]:
    """a − b over the keys both have: (mean, standard error, a higher in k, n)."""
    keys = [k for k in values_a if k in values_b]
    diffs = [values_a[k] - values_b[k] for k in keys]
    if not diffs:
        return math.nan, math.nan, 0, 0
    mean, error = mean_se(diffs)
    return mean, error, sum(d > 0 for d in diffs), len(diffs)


def collect(results: dict, key: str, method: str, steps_of, subjects, n: int, seeds) -> dict:
    """{(subject, seed): value} of ``key`` for ``method`` at size ``n`` and steps ``steps_of(n)``."""
    return {(s, seed): results[n, s][f"{method}-s{steps_of(n)}-seed{seed}"][key] for s in subjects for seed in seeds
            if f"{method}-s{steps_of(n)}-seed{seed}" in results.get((n, s), {})}


def mean_std_text(values) -> str:
    values = list(values)
    if not values:
        return "n/a"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"


def question2_tables(args, results: dict) -> tuple[list[str], dict]:
    subjects_by_group = {g: [s for s in args.subjects if make_concepts.OQ_BY_NAME[s].group == g] for g in GROUPS[2]}
    rows, summary = [], {"cells": {}, "differences": {}, "stability": {}}
    rules = list(args.rules)
    header = "| group | n | rule (steps) | method | " + " | ".join(TITLES[k] for k in Q2_KEYS) + " | training set div (judge / px) | runs |"
    rows += ["### Mean ± std over subjects and seeds", "", header, "|---" * (len(Q2_KEYS) + 6) + "|"]
    for group, subjects in subjects_by_group.items():
        if not subjects:
            continue
        for n in args.sizes:
            train = [results[n, s]["training_set"] for s in subjects]
            train_text = (f"{statistics.mean(t['div_judge'] for t in train):.3f} / "
                          f"{statistics.mean(t['div_pixels'] for t in train):.3f}")
            base = [results[n, s]["base"] for s in subjects]
            rows.append(f"| {group} | {n} | — | base | " + " | ".join(
                mean_std_text(b[k] for b in base if b.get(k) is not None) for k in Q2_KEYS) + f" | {train_text} | "
                f"{len(base)} |")
            for rule in rules:
                steps = steps_for(args, n, rule)
                if rule != rules[0] and steps == steps_for(args, n, rules[0]):
                    continue  # the same trainings as the first rule's
                for method in args.methods:
                    cell = {k: list(collect(results, k, method, lambda m: steps, subjects, n, args.seeds).values())
                            for k in Q2_KEYS}
                    summary["cells"][f"{group}|n{n}|{rule}|{method}"] = {k: v for k, v in cell.items()}
                    label = rule if steps != steps_for(args, n, "per_image" if rule == "total" else "total") else "both"
                    rows.append(f"| {group} | {n} | {label} ({steps}) | {method} | " + " | ".join(
                        mean_std_text(cell[k]) for k in Q2_KEYS) + f" | {train_text} | {len(cell['ID_rate'])} |")
    rows += ["", "### Paired differences (by subject and seed): mean ± standard error (first higher in k of n)", "",
             "| group | comparison | " + " | ".join(TITLES[k] for k in Q2_KEYS) + " |", "|---" * (len(Q2_KEYS) + 2) + "|"]

    def add(group, label, a, b):
        cells = [paired(a[k], b[k]) for k in Q2_KEYS]
        summary["differences"][f"{group}|{label}"] = {k: c for k, c in zip(Q2_KEYS, cells)}
        rows.append(f"| {group} | {label} | " + " | ".join(fmt(*c) if c[3] else "n/a" for c in cells) + " |")

    def values(method, n, steps, subjects):
        return {k: collect(results, k, method, lambda m: steps, subjects, n, args.seeds) for k in Q2_KEYS}

    groups_present = [(g, subjects) for g, subjects in subjects_by_group.items() if subjects]
    for group, subjects in groups_present + ([("all", args.subjects)] if len(groups_present) > 1 else []):
        for n in args.sizes:
            for rule in rules:
                steps = steps_for(args, n, rule)
                if rule != rules[0] and steps == steps_for(args, n, rules[0]):
                    continue
                for baseline in [m for m in args.methods if m != "cat"]:
                    add(group, f"n{n} {rule}: cat − {baseline}", values("cat", n, steps, subjects),
                        values(baseline, n, steps, subjects))
        small = min(args.sizes)
        for n in [n for n in args.sizes if n != small]:
            for rule in rules:
                for method in args.methods:
                    add(group, f"{method}: n{n} − n{small} ({rule})", values(method, n, steps_for(args, n, rule),
                                                                             subjects),
                        values(method, small, steps_for(args, small, rule), subjects))
            if set(RULES) <= set(rules):
                for method in args.methods:
                    add(group, f"{method} at n{n}: per_image − total", values(method, n, steps_for(args, n, "per_image"),
                                                                             subjects),
                        values(method, n, steps_for(args, n, "total"), subjects))
    # Stability of the diversity across training seeds: per (subject, n, steps, method), the seeds' spread against
    # the spread between prompts and the method differences.
    rows += ["", "### How stable is the diversity measure?", "",
             "Per subject, size, steps and method: the diversity (mean over prompts) of each training seed. "
             "`seed sd` is the standard deviation over seeds, averaged over the cells; `prompt sd` the standard "
             "deviation over the prompts within one adapter, averaged; `cv` the seed sd over the mean; "
             "`|cat − lora|` the mean absolute per-seed difference between the two methods (a measure is "
             "useful where that exceeds the seed sd).", "",
             "| feature | mean | seed sd | prompt sd | cv (seed) | \\|cat − lora\\| | cells |", "|---|---|---|---|---|---|---|"]
    for feature in ("judge", "pixels"):
        seed_sds, prompt_sds, means, gaps = [], [], [], []
        for (n, s), per in results.items():
            for name in {name.rsplit("-seed", 1)[0] for name in per if "-seed" in name}:
                per_seed = [per[f"{name}-seed{seed}"][f"div_{feature}"] for seed in args.seeds
                            if f"{name}-seed{seed}" in per]
                if len(per_seed) > 1:
                    seed_sds.append(statistics.stdev(per_seed))
                    means.append(statistics.mean(per_seed))
                for seed in args.seeds:
                    if f"{name}-seed{seed}" in per:
                        prompt_sds.append(statistics.stdev(d[feature] for d in per[f"{name}-seed{seed}"]["diversity"].values()))
                if name.startswith("cat-"):
                    other = name.replace("cat-", "lora-", 1)
                    gaps += [abs(per[f"{name}-seed{seed}"][f"div_{feature}"] - per[f"{other}-seed{seed}"][f"div_{feature}"])
                             for seed in args.seeds if f"{other}-seed{seed}" in per and f"{name}-seed{seed}" in per]
        if not means:
            continue
        stability = {"mean": statistics.mean(means), "seed_sd": statistics.mean(seed_sds),
                     "prompt_sd": statistics.mean(prompt_sds), "cv": statistics.mean(seed_sds) / statistics.mean(means),
                     "cat_lora_gap": statistics.mean(gaps) if gaps else math.nan, "cells": len(means)}
        summary["stability"][feature] = stability
        rows.append(f"| {feature} | {stability['mean']:.3f} | {stability['seed_sd']:.3f} | {stability['prompt_sd']:.3f} | "
                    f"{stability['cv']:.2f} | {stability['cat_lora_gap']:.3f} | {stability['cells']} |")
    return rows, summary


def question3_tables(args, results: dict) -> tuple[list[str], dict]:
    n = args.sizes[0]
    steps = args.steps
    groups = {g: [s for s in args.subjects if make_concepts.OQ_BY_NAME[s].group == g] for g in GROUPS[3]}
    summary = {"cells": {}, "differences": {}, "contrast": {}}
    rows = ["### Mean ± std over subjects and seeds", "",
            "| group | method | " + " | ".join(TITLES[k] for k in Q3_KEYS) + " | runs |", "|---" * (len(Q3_KEYS) + 3) + "|"]
    for group, subjects in groups.items():
        base = [results[n, s]["base"] for s in subjects]
        rows.append(f"| {group} | base | " + " | ".join(mean_std_text(b[k] for b in base if b.get(k) is not None)
                                                      for k in Q3_KEYS) + f" | {len(base)} |")
        for method in args.methods:
            cell = {k: list(collect(results, k, method, lambda m: steps, subjects, n, args.seeds).values())
                    for k in Q3_KEYS}
            summary["cells"][f"{group}|{method}"] = cell
            rows.append(f"| {group} | {method} | " + " | ".join(mean_std_text(cell[k]) for k in Q3_KEYS)
                        + f" | {len(cell['ID_rate'])} |")
    rows += ["", "### Per subject (mean over seeds)", "",
             "| subject | group | method | " + " | ".join(TITLES[k] for k in Q3_KEYS) + " |", "|---" * (len(Q3_KEYS) + 3) + "|"]
    for s in args.subjects:
        for method in args.methods:
            cell = {k: list(collect(results, k, method, lambda m: steps, [s], n, args.seeds).values()) for k in Q3_KEYS}
            rows.append(f"| {s} | {make_concepts.OQ_BY_NAME[s].group} | {method} | " + " | ".join(
                f"{statistics.mean(v):.3f}" if v else "n/a" for v in cell.values()) + " |")
    rows += ["", "### Paired differences (by subject and seed): mean ± standard error (first higher in k of n)", "",
             "| group | comparison | " + " | ".join(TITLES[k] for k in Q3_KEYS) + " |", "|---" * (len(Q3_KEYS) + 2) + "|"]
    diffs = {}
    for group, subjects in groups.items():
        for baseline in [m for m in args.methods if m != "cat"]:
            cells = [paired(collect(results, k, "cat", lambda m: steps, subjects, n, args.seeds),
                            collect(results, k, baseline, lambda m: steps, subjects, n, args.seeds)) for k in Q3_KEYS]
            diffs[group, baseline] = dict(zip(Q3_KEYS, cells))
            summary["differences"][f"{group}|cat − {baseline}"] = dict(zip(Q3_KEYS, cells))
            rows.append(f"| {group} | cat − {baseline} | " + " | ".join(fmt(*c) if c[3] else "n/a" for c in cells) + " |")
    rows += ["", "Out-of-domain minus in-domain of those paired differences (different subjects, so unpaired: the "
             "standard errors add in quadrature); and of each method's own level:", "",
             "| comparison | " + " | ".join(TITLES[k] for k in Q3_KEYS) + " |", "|---" * (len(Q3_KEYS) + 1) + "|"]
    for baseline in [m for m in args.methods if m != "cat"]:
        cells = []
        for k in Q3_KEYS:
            (a, ea, *_), (b, eb, *_) = diffs["out-of-domain", baseline][k], diffs["in-domain", baseline][k]
            cells.append((a - b, math.hypot(ea, eb)))
        summary["contrast"][f"cat − {baseline}"] = dict(zip(Q3_KEYS, cells))
        rows.append(f"| (cat − {baseline}): OOD − in-domain | " + " | ".join(fmt(*c) for c in cells) + " |")
    for method in args.methods:
        cells = []
        for k in Q3_KEYS:
            a = mean_se(list(collect(results, k, method, lambda m: steps, groups["out-of-domain"], n, args.seeds).values()))
            b = mean_se(list(collect(results, k, method, lambda m: steps, groups["in-domain"], n, args.seeds).values()))
            cells.append((a[0] - b[0], math.hypot(a[1], b[1])))
        summary["contrast"][method] = dict(zip(Q3_KEYS, cells))
        rows.append(f"| {method}: OOD − in-domain | " + " | ".join(fmt(*c) for c in cells) + " |")
    return rows, summary


# ---------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------


def cell_images(evaluation: Path, adapter: str, key: str = "with_trigger") -> list[Path]:
    """The first image of each evaluation caption of ``adapter``."""
    pairs = [json.loads(line) for line in (evaluation / "pairs.jsonl").read_text().splitlines() if line.strip()]
    firsts = {}
    for p in pairs:
        if p["adapter"] == adapter:
            firsts.setdefault(p["caption"], evaluation / p[key])
    return list(firsts.values())


def draw_grid(columns: list[str], rows: list[tuple[str, list[list[Path]]]], path: Path, tile: int = 64) -> None:
    """A labelled grid: one row per entry, one column per label; each cell 2 x 2 tiles (its first 4 images)."""
    from PIL import Image, ImageDraw

    cell, left, top = 2 * tile + 6, 150, 30
    grid = Image.new("RGB", (left + cell * len(columns), top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(columns):
        draw.text((left + c * cell + 2, 4 + (c % 2) * 12), label, fill="black")
    for r, (label, cells) in enumerate(rows):
        draw.text((4, top + r * cell + cell // 2 - 6), label, fill="black")
        for c, images in enumerate(cells):
            for i, image_path in enumerate(images[:4]):
                with Image.open(image_path) as image:
                    tile_image = image.convert("RGB").resize((tile, tile), Image.NEAREST)
                grid.paste(tile_image, (left + c * cell + (i % 2) * tile, top + r * cell + (i // 2) * tile))
    grid.save(path)


def picture(args, path: Path, key: str = "with_trigger") -> None:
    """Question 2: columns subject x size, rows training images, base, each method x rule (first seed). Question 3:
    columns subjects, rows training images, base, each method (first seed). Each cell: the first image of each of
    the 4 evaluation captions, with the trigger (``key`` "without_trigger": the same captions and seeds without it;
    training images: the first 4)."""
    out, seed = Path(args.output_dir), args.seeds[0]
    rules = args.rules if args.question == 2 else ["total"]
    units = [(n, s) for s in args.subjects for n in args.sizes]
    columns = [f"{s.split('_')[0]} n{n}" if args.question == 2 else s for n, s in units]
    rows = [("training images", [sorted((out / "data" / f"n{n}" / s).glob("*.png"))[:4] for n, s in units]),
            ("base", [cell_images(out / "eval" / f"n{n}" / s, "base", key) for n, s in units])]
    for method in args.methods:
        for rule in rules:
            label = method if args.question == 3 else f"{method} {rule}"
            rows.append((label, [cell_images(out / "eval" / f"n{n}" / s, f"{method}-s{steps_for(args, n, rule)}-seed{seed}",
                                             key) for n, s in units]))
    draw_grid(columns, rows, path)


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def write_results(args, argv, results: dict, rows: list[str], summary: dict, minutes: float, picture_path: Path,
                  invocations: int = 1):
    results_dir = Path(args.results_dir)
    q = args.question
    command = "python examples/toyworld/open_questions.py " + shlex.join(argv)
    subjects = ", ".join(f"{s} ({make_concepts.OQ_BY_NAME[s].group})" for s in args.subjects)
    settings = (f"Subjects: {subjects}. Sizes {args.sizes}, seeds {args.seeds}, methods {args.methods}"
                + (f", step rules {args.rules}" if q == 2 else "") + f"; {args.steps} steps at the smallest size, lr "
                f"{args.learning_rate}, rank {args.rank}; evaluation: 4 unseen prompts per subject x "
                f"{args.num_images_per_prompt} images, references rendered apart from the training images, subject "
                f"judge and toy CLIP" + ("; unrelated prompts: unrelated_prompts.txt less the class word's lines"
                                          if q == 3 else "") + ".")
    title = {2: "Open question 2: many training images, and diversity",
             3: "Open question 3: subjects outside the base model's domain"}[q] + (f" ({args.tag.strip('_')})"
                                                                                 if args.tag else "")
    section = [f"## {title}", "", *([f"**{args.label}**", ""] if args.label else []),
               f"Command: `{command}`; {minutes:.0f} min wall clock in all ({invocations} invocation"
               f"{'s' if invocations > 1 else ''} of the resumable command, on 2 cores shared with other jobs, "
               f"--jobs {args.jobs}).", "", settings, "", f"Picture: [{picture_path.name}]({picture_path.name})"
               + (f" (with the trigger) and [open_questions_q3{args.tag}_without_trigger.png]"
                  f"(open_questions_q3{args.tag}_without_trigger.png) (the same captions and seeds without it)"
                  if q == 3 else "") + ".", "",
               *rows]
    (results_dir / f"open_questions_q{q}{args.tag}.md").write_text("\n".join(section) + "\n")
    document_path = results_dir / "open_questions.json"
    document = json.loads(document_path.read_text()) if document_path.is_file() else {}
    document[f"q{q}{args.tag}"] = {"command": command, "label": args.label, "minutes": minutes, "invocations": invocations,
                         "settings": {
        k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list))},
        "summary": summary, "metrics": {f"n{n}/{s}": {a: {k: v for k, v in m.items() if k != "clamped"}
                                                      for a, m in per.items()} for (n, s), per in results.items()}}
    document_path.write_text(json.dumps(document, indent=1, default=str) + "\n")
    parts = sorted(results_dir.glob("open_questions_q*.md"))
    (results_dir / "open_questions.md").write_text(
        "# The paper's open questions 2 and 3 in the toy world\n\n"
        "Written by `examples/toyworld/open_questions.py` (one command per question, below); every figure in "
        "[open_questions.json](open_questions.json). What the numbers and pictures say: "
        "[docs/results.md](../docs/results.md#open-questions-2-and-3).\n\n"
        + "\n".join(p.read_text() for p in parts if p.is_file()))
    return results_dir / "open_questions.md"


def write_sample(args, results: dict, folder: Path) -> Path:
    """A sample of generated images for the diversity test: the with-trigger images of the first seed's lora and
    cat adapters of the last unit (largest size, first subject), with their pairs.jsonl lines and diversity.json
    entries, and sample.json naming the unit."""
    import shutil

    n, subject = max(results, key=lambda unit: (unit[0], -args.subjects.index(unit[1])))
    evaluation = Path(args.output_dir) / "eval" / f"n{n}" / subject
    seed = args.seeds[0]
    wanted = [name for name in results[n, subject] if name.endswith(f"-seed{seed}") and
              name.split("-s")[0] in ("lora", "cat") and name.split("-s")[1].split("-")[0] == str(args.steps)]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    pairs = [json.loads(line) for line in (evaluation / "pairs.jsonl").read_text().splitlines() if line.strip()]
    kept = []
    for p in pairs:
        if p["adapter"] in wanted:
            (folder / p["with_trigger"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(evaluation / p["with_trigger"], folder / p["with_trigger"])
            kept.append({"adapter": p["adapter"], "caption": p["caption"], "with_trigger": p["with_trigger"]})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in kept))
    diversity = json.loads((evaluation / "diversity.json").read_text())
    (folder / "diversity.json").write_text(json.dumps({a: diversity[a] for a in wanted}, indent=1) + "\n")
    (folder / "sample.json").write_text(json.dumps({"question": f"q{args.question}", "unit": f"n{n}/{subject}",
                                                    "trigger": make_concepts.OQ_BY_NAME[subject].trigger,
                                                    "adapters": wanted}, indent=1) + "\n")
    return folder


def record_run(args, argv, minutes: float) -> tuple[float, int]:
    """Append this invocation's wall-clock minutes to <output_dir>/runs.jsonl; return the total over the
    invocations of the same question (a resumed protocol's time is the sum of its runs) and their number."""
    path = Path(args.output_dir) / "runs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps({"argv": argv, "minutes": minutes, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
                     + "\n")
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(r["minutes"] for r in runs), len(runs)


def main(argv=None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = plan(args)
    results = run_units(args, jobs)
    rows, summary = (question2_tables if args.question == 2 else question3_tables)(args, results)
    picture_path = Path(args.results_dir) / f"open_questions_q{args.question}{args.tag}.png"
    picture(args, picture_path)
    if args.question == 3:  # the trigger-less prompts too: how far each method moved them from the base model's
        picture(args, picture_path.with_name(f"open_questions_q3{args.tag}_without_trigger.png"), "without_trigger")
    if args.question == 2 and not args.tag:
        write_sample(args, results, Path(args.results_dir) / "open_questions_sample")
    minutes, invocations = record_run(args, argv, (time.perf_counter() - start) / 60)
    path = write_results(args, argv, results, rows, summary, minutes, picture_path, invocations)
    print("\n".join(rows))
    print(f"wrote {path}, {picture_path}")
    return path


if __name__ == "__main__":
    main()
