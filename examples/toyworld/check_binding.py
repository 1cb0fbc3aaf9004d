#!/usr/bin/env python
"""Does a DreamBooth-style LoRA bind each subject to its trigger in the toy world? Measured with the judge.

For every concept in concepts/concepts.json, trains a LoRA with DreamBooth's prior preservation and no CAT term
(train_cat_lora.py --cat_alpha 0 --with_prior_preservation, the settings of reproduce_table1.py's "dreambooth"
method), then draws, at the same seeds, each concept caption (the instance prompt and the 4 held-out eval
captions) three ways: the base model without the trigger, the LoRA with it, the LoRA without it. The toy CLIP
calls an image "the subject" when it is closer (cosine) to the mean embedding of the concept's training images
than to the mean embedding of the base model's images of the same captions without the trigger; the subject judge
(judge.py, which re-renders the subject's shape, colors and pattern) gives its own rate beside it. Bound means:
with the trigger, the LoRA draws the subject; without it, the class keeps the base model's look.

    python examples/toyworld/check_binding.py --output_dir outputs/toyworld-binding

Writes binding.json (per concept: subject rates, cosines), binding_grid.png, and prints a table.
"""

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import judge as subject_judge
from measure_quality import concept_captions, generate, load_concept_images, load_pipeline
from reproduce_table1 import METHODS, run, select_concepts, train_command
from reproduce_table1 import parse_args as table1_args
from toy_clip import DEFAULT_CLIP_DIR, load_toy_clip, shows_subject, to_clip_input

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default=str(HERE / "models" / "toy-sd"))
    parser.add_argument("--clip_dir", default=str(DEFAULT_CLIP_DIR))
    parser.add_argument("--concepts", default=str(HERE / "concepts" / "concepts.json"))
    parser.add_argument("--concept_names", nargs="+", default=None,
                        help="instance_data_dir names of the concepts to run (default: all in --concepts)")
    parser.add_argument("--output_dir", default=str(HERE.parents[1] / "outputs" / "toyworld-binding"))
    parser.add_argument("--seed", type=int, default=0)
    table1 = table1_args([])  # the training settings of reproduce_table1.py, so both measure the same adapters
    parser.add_argument("--max_train_steps", type=int, default=table1.max_train_steps)
    parser.add_argument("--learning_rate", type=float, default=table1.learning_rate)
    parser.add_argument("--rank", type=int, default=table1.rank)
    parser.add_argument("--train_text_encoder", action="store_true")
    parser.add_argument("--num_images_per_prompt", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2, help="trainings run in parallel (one thread each)")
    parser.add_argument("--save_images", action="store_true",
                        help="also write every drawn image as a PNG: <output_dir>/images/<concept>/<base|with|"
                             "without>/<caption index>_<image index>.png (for judge.py agree's labels)")
    return parser.parse_args(argv)


def without(caption: str, trigger: str) -> str:
    return " ".join(w for w in caption.split() if w.lower() != trigger.lower())


@torch.no_grad()
def binding_scores(clip_model, references, base, with_trigger, without_trigger) -> dict:
    """Subject rates and cosines from images (float NHWC in [0, 1]; references uint8): see the module doc."""
    def subject_rate(images):
        return shows_subject(clip_model, references, base, images).float().mean().item()

    def embed(images):
        return clip_model.encode_image(to_clip_input(images), normalize=True)

    return {"subject_rate_lora_with_trigger": subject_rate(with_trigger),
            "subject_rate_lora_without_trigger": subject_rate(without_trigger),
            "subject_rate_base_without_trigger": subject_rate(base),
            # Same caption and seed, LoRA without the trigger against the base model: 1 = the base look kept.
            "cosine_lora_without_vs_base_same_seed": (embed(without_trigger) * embed(base)).sum(1).mean().item()}


def judge_rates(subject, with_trigger, without_trigger) -> dict:
    """The subject judge's share of "subject" verdicts (judge.py), with the trigger and without it (images: float
    NHWC in [0, 1])."""
    def rate(images):
        pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
        return float(np.mean([subject_judge.judge(image, subject).verdict == "subject" for image in pixels]))

    return {"judge_rate_lora_with_trigger": rate(with_trigger), "judge_rate_lora_without_trigger": rate(without_trigger)}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    concepts, _ = select_concepts(Path(args.concepts), args.concept_names, None)
    concepts_dir = Path(args.concepts).parent
    out = Path(args.output_dir)
    train_args = argparse.Namespace(**{**vars(args), "output_dir": str(out)})
    adapters = {c["instance_data_dir"]: out / "adapters" / c["instance_data_dir"] for c in concepts}

    def train(concept):
        adapter = adapters[concept["instance_data_dir"]]
        if not (adapter / "pytorch_lora_weights.safetensors").exists():
            run(train_command(train_args, concept, concepts_dir, adapter, args.seed, METHODS["dreambooth"]),
                adapter / "train.log")

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(train, concepts))

    clip_model, _ = load_toy_clip(args.clip_dir)
    references = load_concept_images(args.concepts)
    captions = concept_captions(args.concepts)
    base_pipe = load_pipeline(args.pretrained_model_name_or_path)
    results, rows = {}, []
    for concept in concepts:
        trigger = concept["trigger_token"]
        lora_pipe = load_pipeline(args.pretrained_model_name_or_path)
        lora_pipe.load_lora_weights(str(adapters[concept["instance_data_dir"]]))
        drawn = {"base": [], "with": [], "without": []}
        for k, caption in enumerate(captions[trigger]):
            seed, n = args.seed + 100 * k, args.num_images_per_prompt
            drawn["base"].append(generate(base_pipe, without(caption, trigger), n, seed))
            drawn["with"].append(generate(lora_pipe, caption, n, seed))
            drawn["without"].append(generate(lora_pipe, without(caption, trigger), n, seed))
        drawn = {key: np.concatenate(images) for key, images in drawn.items()}
        if np.allclose(drawn["without"], drawn["base"]):
            raise SystemExit(f"check_binding: the LoRA of {concept['instance_data_dir']} changed nothing "
                             "(were its layers loaded?)")
        results[concept["instance_data_dir"]] = {
            "trigger": trigger, "captions": captions[trigger],
            **binding_scores(clip_model, references[trigger][1], drawn["base"], drawn["with"], drawn["without"]),
            **(judge_rates(subject_judge.SUBJECTS[trigger], drawn["with"], drawn["without"])
               if trigger in subject_judge.SUBJECTS else {})}
        rows.append((concept, drawn))
        if args.save_images:
            save_images(drawn, out / "images" / concept["instance_data_dir"], args.num_images_per_prompt)

    out.mkdir(parents=True, exist_ok=True)
    (out / "binding.json").write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()},
                                                  "concepts": results}, indent=2) + "\n")
    print("DreamBooth-style LoRA (prior preservation, alpha 0), judged by the toy CLIP: share of images that show "
          "the subject")
    print("concept          LoRA with trigger | LoRA without | base without | cos(LoRA without, base) | subject judge: "
          "with trigger | without")
    for name, r in results.items():
        judged = (f"{r['judge_rate_lora_with_trigger']:.2f}                         | "
                  f"{r['judge_rate_lora_without_trigger']:.2f}" if "judge_rate_lora_with_trigger" in r else "-")
        print(f"{name:16s} {r['subject_rate_lora_with_trigger']:.2f}              | "
              f"{r['subject_rate_lora_without_trigger']:.2f}         | {r['subject_rate_base_without_trigger']:.2f}"
              f"         | {r['cosine_lora_without_vs_base_same_seed']:.3f}                   | {judged}")
    write_grid(rows, out / "binding_grid.png")
    print(f"-> {out / 'binding.json'}, {out / 'binding_grid.png'}")


def save_images(drawn: dict, folder: Path, per_caption: int):
    """Each image of ``drawn`` ({kind: float NHWC in [0, 1]}, caption by caption) as <folder>/<kind>/<k>_<i>.png."""
    from PIL import Image

    for kind, images in drawn.items():
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            k, i = divmod(index, per_caption)
            Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(folder / kind / f"{k}_{i}.png")


def write_grid(rows, path: Path, per_row: int = 8):
    """Per concept, three strips of the first images: base without trigger | LoRA with | LoRA without."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(3 * per_row * 0.55, len(rows) * 0.9), squeeze=False)
    titles = {"base": "base, no trigger", "with": "LoRA, with trigger", "without": "LoRA, no trigger"}
    for (concept, drawn), axes_row in zip(rows, axes):
        for ax, key in zip(axes_row, ("base", "with", "without")):
            ax.imshow(np.concatenate(list(drawn[key][:per_row]), axis=1), interpolation="nearest")
            ax.set_title(f"{concept['instance_data_dir']}: {titles[key]}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
