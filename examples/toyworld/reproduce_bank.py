#!/usr/bin/env python
"""Preservation beyond the training captions (issue 29): CAT's prompt bank (--cat_prompts) in the toy world.

For every concept of ``concepts/concepts.json`` and every seed, trains under reproduce_table1.py's settings (400 steps
at lr 1.5e-3, rank 4, batch 1, cached latents and text embeddings, batched CAT passes):

    lora        plain LoRA                                                   --cat_alpha 0
    dreambooth  LoRA with DreamBooth's prior preservation                     --cat_alpha 0 --with_prior_preservation
    cat         CAT                                                          --cat_alpha 1
    bank_small  CAT + the 4-prompt bank cat_prompts_small.txt                 --cat_prompts ... (--cat_prompts_alpha 1)
    bank_large  CAT + the 45-prompt bank cat_prompts_large.txt
    empty       ai-toolkit's blank-prompt preservation: CAT's y is ""         --cat_alpha 1 --cat_prompt empty

then scores each concept's adapters and the base model with evaluate_kps.py on its unseen prompts (PS, IS, KPS,
the subject rates of reproduce_table1.py) and on ``unrelated_prompts.txt`` less the lines that name the concept's class
word (--unrelated_prompts: the image cosine to the base model's same-seed images in the toy CLIP, and the mean pixel
change), and writes ``bank.md``: mean ± std per method, paired differences against cat and lora with standard errors,
the training loop's seconds per step (from each run's finished progress bar; trainings share the cores, so read them
as ratios), and ``bank_unrelated.png``: a row per method (first seed, first concept), a column per unrelated prompt.
The banks use the colors red, orange and yellow only; the unrelated prompts use green, blue and purple.

    python examples/toyworld/reproduce_bank.py --output_dir outputs/toyworld-bank

A reduced run: --concept_names sks_circle ohwx_square --seeds 0 --methods lora cat bank_small bank_large empty.
Finished trainings and evaluations are reused when the command is run again.
"""

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import reproduce_table1 as table1  # noqa: E402
from multiconcept import seconds_per_step  # noqa: E402

METHODS = {
    "lora": table1.METHODS["lora"],
    "dreambooth": table1.METHODS["dreambooth"],
    "cat": table1.METHODS["cat"],
    "bank_small": ["--cat_alpha", "1", "--cat_prompts", str(HERE / "cat_prompts_small.txt"), "--cat_class_word",
                   "{class_word}"],
    "bank_large": ["--cat_alpha", "1", "--cat_prompts", str(HERE / "cat_prompts_large.txt"), "--cat_class_word",
                   "{class_word}"],
    "empty": ["--cat_alpha", "1", "--cat_prompt", "empty"],
    # the large bank on pure noise at the last timestep instead of the sample's z_t (--cat_prompts_latents noise)
    "bank_large_noise": ["--cat_alpha", "1", "--cat_prompts", str(HERE / "cat_prompts_large.txt"), "--cat_class_word",
                         "{class_word}", "--cat_prompts_latents", "noise"],
    # the large bank on the base model's own images of each prompt, noised at their own t' (--cat_prompts_latents base)
    "bank_large_base": ["--cat_alpha", "1", "--cat_prompts", str(HERE / "cat_prompts_large.txt"), "--cat_class_word",
                        "{class_word}", "--cat_prompts_latents", "base"],
    # the large bank at other weights (--cat_prompts_alpha; the default is 1)
    **{f"bank_large_alpha{alpha}": ["--cat_alpha", "1", "--cat_prompts", str(HERE / "cat_prompts_large.txt"),
                                    "--cat_class_word", "{class_word}", "--cat_prompts_alpha", alpha]
       for alpha in ("0.25", "4")},
}
KEYS = ("unrelated_cosine", "unrelated_pixel_change", "KPS_mean", "IS_mean", "PS_mean", "subject_without_trigger",
        "ID_rate", "base_pixel_change")
TITLES = ("unrelated cos ↑", "unrelated Δpx ↓", "KPS mean", "IS mean", "PS mean", "leak (subject without trigger)",
          "ID rate (judge)", "Δpx base ↓ (judge)")
BASELINES = ("cat", "lora")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=str(table1.ROOT / "outputs" / "toyworld-bank"))
    parser.add_argument("--concepts", default=str(HERE / "concepts" / "concepts.json"))
    parser.add_argument("--concept_names", nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--unrelated_prompts", default=str(HERE / "unrelated_prompts.txt"))
    parser.add_argument("--jobs", type=int, default=2)
    # reproduce_table1.py's training and evaluation settings (its defaults)
    defaults = table1.parse_args([])
    for name in ("pretrained_model_name_or_path", "clip_dir", "max_train_steps", "learning_rate", "rank",
                 "num_images_per_prompt", "num_inference_steps", "guidance_scale"):
        parser.add_argument(f"--{name}", type=type(getattr(defaults, name)), default=getattr(defaults, name))
    args = parser.parse_args(argv)
    args.train_text_encoder, args.catversion_steps = False, defaults.catversion_steps  # train_command reads them
    return args


def unrelated_file(args, concept: dict, out: Path) -> Path:
    """The unrelated prompts less those naming the concept's class word (they would share it with the captions)."""
    lines = [line for line in Path(args.unrelated_prompts).read_text().splitlines()
             if line.strip() and not line.startswith("#") and concept["class_word"] not in line.split()]
    path = out / "unrelated" / f"{concept['instance_data_dir']}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def paired(results: dict, method: str, baseline: str, key: str, seeds: list[int]) -> str:
    diffs = [per[f"{method}-seed{s}"][key] - per[f"{baseline}-seed{s}"][key] for per in results.values() for s in seeds]
    error = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return f"{statistics.mean(diffs):+.4f} ± {error:.4f} ({sum(d > 0 for d in diffs)}/{len(diffs)})"


def picture(evaluation: Path, methods: list[str], seed: int, path: Path, tile: int = 64) -> None:
    """Rows base and each method (seed ``seed``), columns the unrelated prompts (first image each, same seeds)."""
    from PIL import Image, ImageDraw

    lines = [json.loads(line) for line in (evaluation / "unrelated.jsonl").read_text().splitlines()]
    prompts = list(dict.fromkeys(line["prompt"] for line in lines))
    rows = ["base", *[f"{m}-seed{seed}" for m in methods]]
    grid = Image.new("RGB", (120 + tile * len(prompts), 18 + tile * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c in range(len(prompts)):
        draw.text((120 + c * tile + 2, 3), str(c + 1), fill="black")
    firsts = {}
    for line in lines:
        firsts.setdefault((line["adapter"], line["prompt"]), line["image"])
    for r, name in enumerate(rows):
        draw.text((4, 18 + r * tile + tile // 2 - 6), name.split("-seed")[0], fill="black")
        for c, prompt in enumerate(prompts):
            with Image.open(evaluation / firsts[name, prompt]) as image:
                grid.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (120 + c * tile, 18 + r * tile))
    grid.save(path)


def main(argv=None) -> Path:
    args = parse_args(argv)
    start = time.perf_counter()
    concepts_file = Path(args.concepts)
    concepts, _ = table1.select_concepts(concepts_file, args.concept_names, None)
    out = Path(args.output_dir)
    jobs = {}
    for concept in concepts:
        for seed in args.seeds:
            for method in args.methods:
                folder = out / "adapters" / concept["instance_data_dir"] / f"{method}-seed{seed}"
                jobs[concept["instance_data_dir"], f"{method}-seed{seed}"] = (table1.train_command(
                    args, concept, concepts_file.parent, folder, seed, METHODS[method]), folder)
    todo = [job for job in jobs.values() if not (job[1] / "README.md").is_file()]
    # DreamBooth's class images are generated by the first training of each class, before the others share them.
    first = list({c["class_word"]: jobs[c["instance_data_dir"], f"dreambooth-seed{args.seeds[0]}"]
                  for c in concepts if "dreambooth" in args.methods}.values())
    workers = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=table1.start_worker)
    with workers, ThreadPoolExecutor(args.jobs) as pool:
        for batch in ([job for job in first if job in todo], [job for job in todo if job not in first]):
            list(pool.map(lambda job: table1.train(workers, *job), batch))

    def evaluate(concept):
        adapters = {name: folder for (concept_dir, name), (_, folder) in jobs.items()
                    if concept_dir == concept["instance_data_dir"]}
        evaluation = out / "eval" / concept["instance_data_dir"]
        extra = ["--unrelated_prompts", str(unrelated_file(args, concept, out))]
        return table1.evaluate(args, concept, concepts_file.parent, adapters, evaluation, extra=extra)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip((c["instance_data_dir"] for c in concepts), pool.map(evaluate, concepts)))
    cost = {key: seconds_per_step((folder / "train.log").read_text()) for key, (_, folder) in jobs.items()}

    n = len(concepts) * len(args.seeds)
    rows = [f"# The prompt bank in the toy world ({len(concepts)} concepts × {len(args.seeds)} seeds = {n} pairs)", "",
            f"Command: `python examples/toyworld/reproduce_bank.py {' '.join(argv or sys.argv[1:])}`; "
            f"{(time.perf_counter() - start) / 60:.0f} min for what was not already done.", "",
            f"Concepts {[c['instance_data_dir'] for c in concepts]}, seeds {args.seeds}; {args.max_train_steps} steps, "
            f"lr {args.learning_rate}, rank {args.rank}; evaluation: each concept's unseen prompts and the unrelated "
            f"prompts of {Path(args.unrelated_prompts).name} without its class word, {args.num_images_per_prompt} "
            f"images per prompt, toy CLIP.", "",
            "| method | " + " | ".join(TITLES) + " | s/step | n |", "|---" * (len(TITLES) + 3) + "|"]
    for method in ["base", *args.methods]:
        scores = [m for per in results.values() for name, m in per.items()
                  if name == method or name.startswith(f"{method}-seed")]
        seconds = [t for (_, name), t in cost.items() if name.startswith(f"{method}-seed")]
        rows.append(f"| {method} | " + " | ".join(table1.mean_std([m.get(k) for m in scores]) for k in KEYS)
                    + f" | {statistics.median(seconds) if seconds else float('nan'):.4f} | {len(scores)} |")
    rows += ["", "Mean ± std over concepts and seeds; s/step is the median of the training loops' seconds per step "
             "(two trainings at a time on 2 shared cores).", "",
             "Paired by concept and seed, method minus baseline: mean ± standard error (method higher in k of n):", "",
             "| difference | " + " | ".join(TITLES) + " | s/step ratio |", "|---" * (len(TITLES) + 2) + "|"]
    for baseline in (b for b in BASELINES if b in args.methods):
        for method in (m for m in args.methods if m != baseline):
            ratios = [cost[c, f"{method}-seed{s}"] / cost[c, f"{baseline}-seed{s}"] if cost[c, f"{baseline}-seed{s}"]
                      else float("nan") for c in results for s in args.seeds]  # (nan: too few steps to time)
            rows.append(f"| {method} − {baseline} | " + " | ".join(paired(results, method, baseline, k, args.seeds)
                                                                   for k in KEYS)
                        + f" | {statistics.mean(ratios):.2f} |")
    (out / "bank.md").write_text("\n".join(rows) + "\n")
    (out / "bank.json").write_text(json.dumps({"results": results, "seconds_per_step": {
        f"{c}/{name}": t for (c, name), t in cost.items()}}, indent=1) + "\n")
    picture(out / "eval" / concepts[0]["instance_data_dir"], args.methods, args.seeds[0], out / "bank_unrelated.png")
    print("\n".join(rows))
    return out / "bank.md"


if __name__ == "__main__":
    main()
