#!/usr/bin/env python
"""The Chosen One (Avrahami et al., arXiv 2311.10093): find a consistent character from a text prompt alone.

Each iteration draws ``--num_images`` images of the prompt (one seed each) with the current model, embeds them with
a frozen feature extractor, clusters them with K-means++ into ``--num_clusters`` groups, drops groups smaller than
``--min_cluster_size``, keeps the most cohesive one (smallest mean distance to its centroid), and trains on it a LoRA
plus one new textual-inversion token with ``train_cat_lora.py``'s pivotal tuning (``--train_text_encoder_ti``),
each time from the base model. The next iteration draws with that LoRA and WITH the new token in the prompt (the
unofficial code, cabinz/consistent-character-the-chosen-one, drops the token after the first iteration). The loop
stops when the mean pairwise feature distance of a new batch falls below ``--convergence_fraction`` of the first
batch's, or after ``--max_iterations`` trainings.

The new token: the prompt's ``{token}`` marks its place, or it goes before the prompt's last word ("a photo of a
circle" -> "a photo of a <s0> circle"). With ``--cat_alpha`` > 0 each training is TCO + CAT: the trigger is the new
token, and y, the prompt of CAT's anchor term, is the prompt without it (the user's prompt as given).

    python examples/the_chosen_one.py --pretrained_model_name_or_path examples/toyworld/models/toy-sd \\
        --prompt "a photo of a circle" --features clip \\
        --feature_model local-dir:examples/toyworld/models/toy-clip --resolution 32 --output_dir outputs/tco

Outputs in ``--output_dir``: ``iteration_N/`` with ``batch.png`` (the batch drawn), ``chosen_cluster.png`` and
``cluster/`` (the training images), ``adapter/`` (train_cat_lora.py's output) and ``state.json``, written last; a
rerun of the same command skips every iteration with a ``state.json``. ``result.json`` sums the run up.
Arguments after ``--`` go to train_cat_lora.py unchanged (e.g. ``-- --cache_latents --center_crop``).
"""

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import train_cat_lora
from evaluate_kps import (
    LORA_WEIGHT_NAME, AdapterFiles, dino_embeddings, load_adapter, load_dino, load_pipeline, unload_adapter,
)
from train_cat_lora import (
    InputError, OneLineErrorParser, check_output_dir, clip_image_embeddings, contains_trigger, load_clip, make_grid,
    model_family, replace_trigger, resolve_clip_choice, strip_trigger,
)

PROGRAM = Path(__file__).name
STATE_FILE = "state.json"
SETTINGS_FILE = "tco_settings.json"
DEFAULT_FEATURE_MODELS = {"dino": "facebook/dino-vits16", "clip": "ViT-L-14-quickgelu"}


@dataclass(frozen=True)
class TCOOptions:
    """Everything a run depends on; saved in --output_dir so that a rerun with other settings is refused."""

    pretrained_model_name_or_path: str
    prompt: str
    output_dir: str
    num_images: int = 128
    num_clusters: int | None = None  # None: max(2, num_images // 20)
    min_cluster_size: int = 10
    convergence_fraction: float = 0.8
    max_iterations: int = 5
    features: str = "dino"
    feature_model: str | None = None  # None: DEFAULT_FEATURE_MODELS[features]
    feature_pretrained: str = "openai"
    token_abstraction: str = "TOK"
    cat_alpha: float = 0.0
    seed: int = 0
    resolution: int = 512
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    batch_size: int = 8
    mixed_precision: str = "no"
    max_train_steps: int = 500
    learning_rate: float = 1e-4
    rank: int = 4
    train_args: tuple = ()

    @property
    def clusters(self) -> int:
        return self.num_clusters if self.num_clusters is not None else max(2, self.num_images // 20)

    @property
    def extractor(self) -> str:
        return self.feature_model or DEFAULT_FEATURE_MODELS[self.features]

    @property
    def caption(self) -> str:
        """The training caption: the prompt with the token abstraction in its place."""
        if "{token}" in self.prompt:
            return " ".join(self.prompt.replace("{token}", f" {self.token_abstraction} ").split())
        *head, last = self.prompt.split()
        return " ".join([*head, self.token_abstraction, last])

    @property
    def plain_prompt(self) -> str:
        """y: the prompt without the token (iteration 0 draws it; CAT anchors the model on it)."""
        return strip_trigger(self.caption, self.token_abstraction)


def parse_args(argv=None) -> TCOOptions:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = OneLineErrorParser(prog=PROGRAM, description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = TCOOptions("", "", "")
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument("--prompt", required=True, help="what to draw; '{token}' marks the new token's place "
                        "(default: before the last word)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_images", type=int, default=defaults.num_images, help="images per iteration (N)")
    parser.add_argument("--num_clusters", type=int, default=None, help="K of K-means++ (default: max(2, N // 20))")
    parser.add_argument("--min_cluster_size", type=int, default=defaults.min_cluster_size,
                        help="clusters with fewer images are never chosen")
    parser.add_argument("--convergence_fraction", type=float, default=defaults.convergence_fraction,
                        help="stop when a batch's mean pairwise distance falls below this fraction of the first's")
    parser.add_argument("--max_iterations", type=int, default=defaults.max_iterations, help="at most this many trainings")
    parser.add_argument("--features", choices=sorted(DEFAULT_FEATURE_MODELS), default=defaults.features,
                        help="dino: a transformers DINO/DINOv2 model; clip: an open_clip image encoder")
    parser.add_argument("--feature_model", default=None,
                        help=f"default per --features: {DEFAULT_FEATURE_MODELS}; e.g. facebook/dinov2-large, or "
                             "local-dir:examples/toyworld/models/toy-clip (the toy world's judge)")
    parser.add_argument("--feature_pretrained", default=defaults.feature_pretrained,
                        help="open_clip weights tag for --features clip (ignored for local-dir: models)")
    parser.add_argument("--token_abstraction", default=defaults.token_abstraction,
                        help="the word that stands for the new token in the training caption")
    parser.add_argument("--cat_alpha", type=float, default=defaults.cat_alpha,
                        help="CAT's alpha for every training (0: TCO alone)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--resolution", type=int, default=defaults.resolution)
    parser.add_argument("--num_inference_steps", type=int, default=defaults.num_inference_steps)
    parser.add_argument("--guidance_scale", type=float, default=defaults.guidance_scale)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size, help="images per pipeline call")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=defaults.mixed_precision)
    parser.add_argument("--max_train_steps", type=int, default=defaults.max_train_steps)
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--rank", type=int, default=defaults.rank)
    return TCOOptions(**vars(parser.parse_args(argv)), train_args=tuple(train_args))


# ---------------------------------------------------------------------------------------------------------------
# Checks: every one runs before a model is loaded
# ---------------------------------------------------------------------------------------------------------------


def check_options(options: TCOOptions) -> None:
    positive = {"--num_images": options.num_images, "--num_clusters": options.clusters,
                "--min_cluster_size": options.min_cluster_size, "--max_iterations": options.max_iterations,
                "--batch_size": options.batch_size, "--max_train_steps": options.max_train_steps}
    for flag, value in positive.items():
        if value < 1:
            raise InputError(f"{flag} {value}: must be at least 1")
    if options.num_images < 2:
        raise InputError(f"--num_images {options.num_images}: a distance between images needs at least 2")
    if options.clusters > options.num_images:
        raise InputError(f"--num_clusters {options.clusters}: more clusters than --num_images {options.num_images}")
    if options.min_cluster_size > options.num_images:
        raise InputError(f"--min_cluster_size {options.min_cluster_size}: larger than --num_images {options.num_images}")
    if not 0 < options.convergence_fraction <= 1:
        raise InputError(f"--convergence_fraction {options.convergence_fraction}: must lie in (0, 1]")
    if not options.prompt.split():
        raise InputError("--prompt: empty")
    if options.prompt.count("{token}") > 1:
        raise InputError(f"--prompt {options.prompt!r}: '{{token}}' may appear once")
    if contains_trigger(options.prompt, options.token_abstraction):
        raise InputError(f"--token_abstraction {options.token_abstraction}: already a word of --prompt; choose another")
    local = options.extractor.removeprefix("local-dir:")
    if local != options.extractor and not Path(local).is_dir():
        raise InputError(f"--feature_model {options.extractor}: no such folder")
    if options.features == "clip":
        resolve_clip_choice(options.extractor, options.feature_pretrained, ("--feature_model", "--feature_pretrained"))
    elif options.feature_model and Path(options.feature_model).expanduser().is_absolute() \
            and not Path(options.feature_model).is_dir():
        raise InputError(f"--feature_model {options.feature_model}: no such folder")
    check_output_dir(Path(options.output_dir))
    # train_cat_lora.py's own parser checks the flags every training will get (the data folder comes later).
    train_cat_lora.parse_args(train_argv(options, Path(options.output_dir) / "cluster", Path(options.output_dir)))


def check_settings(options: TCOOptions) -> None:
    """A rerun must continue the same run: refuse an --output_dir whose finished iterations had other settings."""
    saved_file = Path(options.output_dir) / SETTINGS_FILE
    if not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text())
    now = json.loads(json.dumps(asdict(options)))
    changed = sorted(key for key in now if key != "output_dir" and saved.get(key) != now[key])
    if changed:
        raise InputError(f"--output_dir {options.output_dir}: holds a run with other settings ({', '.join(changed)}); "
                         "use another folder")


# ---------------------------------------------------------------------------------------------------------------
# Clustering, the cluster choice and the stopping rule: small pure functions on feature tensors
# ---------------------------------------------------------------------------------------------------------------


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over all pairs of rows: the batch's inconsistency."""
    return torch.pdist(features.double()).mean().item()


def kmeans_plus_plus(features: torch.Tensor, num_clusters: int, seed: int = 0, restarts: int = 10,
                     max_steps: int = 100) -> torch.Tensor:
    """Cluster labels (n,) of Euclidean K-means with k-means++ seeding (Arthur & Vassilvitskii 2007), the best of
    ``restarts`` runs by inertia; a seeded generator makes it deterministic."""
    points = features.double()
    generator = torch.Generator().manual_seed(seed)
    best_labels, best_inertia = None, float("inf")
    for _ in range(restarts):
        centers = points[torch.randint(len(points), (1,), generator=generator)]
        while len(centers) < num_clusters:
            nearest = torch.cdist(points, centers).min(dim=1).values ** 2
            weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)  # all points already centers
            centers = torch.cat([centers, points[torch.multinomial(weights, 1, generator=generator)]])
        labels = None
        for _ in range(max_steps):
            new_labels = torch.cdist(points, centers).argmin(dim=1)
            if labels is not None and torch.equal(new_labels, labels):
                break
            labels = new_labels
            for k in range(num_clusters):
                if (labels == k).any():  # an emptied cluster keeps its center
                    centers[k] = points[labels == k].mean(dim=0)
        inertia = ((points - centers[labels]) ** 2).sum().item()
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


@dataclass(frozen=True)
class ClusterChoice:
    index: int
    sizes: list  # images per cluster
    cohesion: list  # mean distance to the centroid per cluster; None for the clusters too small to choose


def choose_cluster(features: torch.Tensor, labels: torch.Tensor, min_size: int) -> ClusterChoice:
    """The most cohesive cluster among those with at least ``min_size`` members."""
    points = features.double()
    sizes = [int((labels == k).sum()) for k in range(int(labels.max()) + 1)]
    cohesion = [None if size < min_size else
                (points[labels == k] - points[labels == k].mean(dim=0)).norm(dim=1).mean().item()
                for k, size in enumerate(sizes)]
    kept = [k for k, value in enumerate(cohesion) if value is not None]
    if not kept:
        raise InputError(f"--min_cluster_size {min_size}: no cluster is that large (sizes {sizes}); lower it")
    return ClusterChoice(min(kept, key=lambda k: cohesion[k]), sizes, cohesion)


def stop_reason(distances: list, fraction: float, max_iterations: int) -> str | None:
    """Why the loop stops after measuring the batches ``distances`` (one per iteration so far), or None.

    Batch i was drawn after i trainings: "converged" when it is below ``fraction`` of the first batch's
    distance, "max_iterations" when i trainings are all that were allowed."""
    if len(distances) > 1 and distances[-1] < fraction * distances[0]:
        return "converged"
    if len(distances) - 1 >= max_iterations:
        return "max_iterations"
    return None


# ---------------------------------------------------------------------------------------------------------------
# One iteration: draw, embed, cluster, train
# ---------------------------------------------------------------------------------------------------------------


def load_features(options: TCOOptions, device):
    """A function from PIL images to L2-normalized feature rows (distances between them are chords on the sphere;
    the unofficial code uses raw DINOv2 features)."""
    if options.features == "dino":
        dino = load_dino(options.extractor, device)
        return lambda images: dino_embeddings(dino, images, options.batch_size)
    clip = load_clip(options.extractor, options.feature_pretrained, device, ("--feature_model", "--feature_pretrained"))
    return lambda images: clip_image_embeddings(clip, images, options.batch_size)


def draw_batch(options: TCOOptions, family, adapter: Path | None, seeds: list, device) -> tuple[list, str]:
    """The images of one iteration and the prompt that drew them: the base model on y, or the base model plus the
    previous LoRA and its token on the prompt with that token. The pipeline is freed afterwards (training loads
    its own models)."""
    pipe = load_pipeline(family, options.mixed_precision, device)
    prompt, files, tokens = options.plain_prompt, None, []
    if adapter is not None:
        files = AdapterFiles(adapter / LORA_WEIGHT_NAME, adapter / f"{adapter.name}_emb.safetensors")
        tokens = load_adapter(pipe, family, "tco", files)
        prompt = replace_trigger(options.caption, options.token_abstraction, "".join(tokens))
    images = []
    for start in tqdm(range(0, len(seeds), options.batch_size), desc="drawing", leave=False):
        batch = seeds[start:start + options.batch_size]
        images += pipe(prompt=[prompt] * len(batch), generator=[torch.Generator("cpu").manual_seed(s) for s in batch],
                       num_inference_steps=options.num_inference_steps, guidance_scale=options.guidance_scale,
                       height=options.resolution, width=options.resolution).images
    if files is not None:
        unload_adapter(pipe, family, files, tokens)
    del pipe
    return images, prompt


def train_argv(options: TCOOptions, cluster_dir: Path, adapter_dir: Path) -> list:
    """train_cat_lora.py's command line for one iteration: pivotal tuning with one new token (the trigger), from
    the base model; the user's own training flags (after ``--``) come last and win."""
    return ["--pretrained_model_name_or_path", options.pretrained_model_name_or_path,
            "--instance_data_dir", str(cluster_dir), "--instance_prompt", options.caption,
            "--train_text_encoder_ti", "--token_abstraction", options.token_abstraction,
            "--num_new_tokens_per_abstraction", "1", "--cat_alpha", f"{options.cat_alpha:g}",
            "--resolution", str(options.resolution), "--max_train_steps", str(options.max_train_steps),
            "--learning_rate", str(options.learning_rate), "--rank", str(options.rank), "--seed", str(options.seed),
            "--mixed_precision", options.mixed_precision, "--report_to", "none", "--output_dir", str(adapter_dir),
            *options.train_args]


def train_on_cluster(options: TCOOptions, cluster_dir: Path, adapter_dir: Path) -> None:
    """train_cat_lora.main in this process, with a fresh accelerate state as a new process would have."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    train_cat_lora.main(train_argv(options, cluster_dir, adapter_dir))


def write_json(path: Path, data: dict) -> None:
    """Written whole or not at all (a half-written state file would read as a finished iteration)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def run_iteration(options: TCOOptions, family, features, iteration: int, first_distance: float | None,
                  device) -> dict:
    """Draw and measure batch ``iteration``; unless the loop stops there, cluster it and train on the chosen
    cluster. Returns the iteration's state (also written to iteration_N/state.json, last)."""
    folder = Path(options.output_dir) / f"iteration_{iteration}"
    folder.mkdir(parents=True, exist_ok=True)
    previous = Path(options.output_dir) / f"iteration_{iteration - 1}" / "adapter" if iteration else None
    seeds = [options.seed + iteration * options.num_images + j for j in range(options.num_images)]
    images, prompt = draw_batch(options, family, previous, seeds, device)
    make_grid(rows_of(images)).save(folder / "batch.png")
    embeddings = features(images)
    distances = ([] if first_distance is None else [first_distance]) + [mean_pairwise_distance(embeddings)]
    state = {"iteration": iteration, "prompt": prompt, "seeds": [seeds[0], seeds[-1]],
             "mean_pairwise_distance": distances[-1], "relative_to_first": distances[-1] / distances[0],
             "stopped": stop_reason(distances, options.convergence_fraction, options.max_iterations)}
    if state["stopped"] is None:
        labels = kmeans_plus_plus(embeddings, options.clusters, options.seed + iteration)
        choice = choose_cluster(embeddings, labels, options.min_cluster_size)
        chosen = [image for image, label in zip(images, labels.tolist()) if label == choice.index]
        cluster_dir = folder / "cluster"
        cluster_dir.mkdir(exist_ok=True)
        for n, image in enumerate(chosen):
            image.save(cluster_dir / f"{n:03d}.png")
        make_grid(rows_of(chosen)).save(folder / "chosen_cluster.png")
        train_on_cluster(options, cluster_dir, folder / "adapter")
        state.update(cluster_sizes=choice.sizes, cluster_cohesion=choice.cohesion, chosen_cluster=choice.index,
                     chosen_size=len(chosen), adapter=str(folder / "adapter"))
    write_json(folder / STATE_FILE, state)
    return state


def rows_of(images: list, per_row: int = 10) -> list:
    return [images[start:start + per_row] for start in range(0, len(images), per_row)]


def main(argv=None) -> dict:
    """Run (or continue) the loop; returns the summary written to result.json."""
    options = parse_args(argv)
    check_options(options)
    family = model_family(argparse.Namespace(pretrained_model_name_or_path=options.pretrained_model_name_or_path,
                                             resolution=options.resolution))
    check_settings(options)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    features = load_features(options, device)  # a feature model that cannot load fails before anything is written
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SETTINGS_FILE, asdict(options))

    states = []
    progress = tqdm(range(options.max_iterations + 1), desc="The Chosen One iterations")
    for iteration in progress:
        state_file = out / f"iteration_{iteration}" / STATE_FILE
        if state_file.is_file():
            state = json.loads(state_file.read_text())
        else:
            first = states[0]["mean_pairwise_distance"] if states else None
            state = run_iteration(options, family, features, iteration, first, device)
        states.append(state)
        progress.set_postfix(distance=f"{state['mean_pairwise_distance']:.4f}", stopped=state["stopped"])
        if state["stopped"]:
            break
    progress.close()
    last = states[-1]
    result = {"caption": options.caption, "y": options.plain_prompt, "cat_alpha": options.cat_alpha,
              "distances": [s["mean_pairwise_distance"] for s in states], "stopped": last["stopped"],
              "trainings": len(states) - 1, "final_prompt": last["prompt"],
              "final_adapter": states[-2]["adapter"] if len(states) > 1 else None,
              "final_cluster": str(out / f"iteration_{len(states) - 2}" / "cluster") if len(states) > 1 else None}
    write_json(out / "result.json", result)
    for state in states:
        print(f"iteration {state['iteration']}: mean pairwise distance {state['mean_pairwise_distance']:.4f} "
              f"({state['relative_to_first']:.2f} of the first)" + (f"; stopped: {state['stopped']}"
                                                                     if state["stopped"] else ""))
    print(f"final adapter: {result['final_adapter']}; prompt: {result['final_prompt']!r}")
    return result


def cli(argv=None) -> int:
    try:
        main(argv)
    except InputError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
