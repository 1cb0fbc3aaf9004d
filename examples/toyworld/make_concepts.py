"""Write the personal concepts: patterned subjects the base world never saw, 6 training images each.

Each subject is a shape the world knows (its class word) painted with a pattern the world never shows
(checkers, stripes, two tones, two colours), named by a trigger that is ONE token of CLIP's BPE vocabulary
and not a common word. Output: concepts/<trigger>_<class>/NN.png and concepts/concepts.json, whose
instance_data_dir entries are relative to the JSON file (as train_cat_lora.py --concepts_list expects).

  python make_concepts.py              # the 5 concepts of Table 1 -> concepts/ (deterministic: same seed, same images)
  python make_concepts.py --set 20     # 20 concepts, 5 per class, the five above among them -> concepts20/
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import world

HERE = Path(__file__).resolve().parent


def pattern_fill(pattern: str, res: int, cx: float, cy: float, extent: float) -> np.ndarray:
    """Per-pixel RGB colors (res x res x 3) of a pattern, laid out relative to the shape's bounding box."""
    coords = (np.arange(res) + 0.5) / res
    x, y = np.meshgrid(coords, coords)
    u, v = (x - cx) / extent + 0.5, (y - cy) / extent + 0.5  # 0..1 across the bounding box
    c = {k: np.asarray(rgb, dtype=np.float32) for k, rgb in world.COLORS.items()}
    white = np.asarray((250, 250, 250), dtype=np.float32)
    if pattern == "red_white_checkers":  # 4 x 4 checkerboard
        first = ((np.floor(u * 4) + np.floor(v * 4)) % 2) == 0
        a, b = c["red"], white
    elif pattern == "blue_yellow_stripes":  # 5 horizontal stripes
        first = (np.floor(v * 5) % 2) == 0
        a, b = c["blue"], c["yellow"]
    elif pattern == "green_purple_halves":  # left half green, right half purple
        first = u < 0.5
        a, b = c["green"], c["purple"]
    elif pattern == "orange_arms_blue_center":  # cross with orange arms and a blue central square
        first = ~((np.abs(u - 0.5) <= 0.18) & (np.abs(v - 0.5) <= 0.18))
        a, b = c["orange"], c["blue"]
    elif pattern == "green_white_diagonals":  # 3 diagonal stripes each way: a direction the world's patterns lack
        first = (np.floor((u + v) * 3) % 2) == 0
        a, b = c["green"], white
    else:
        raise ValueError(pattern)
    return np.where(first[..., None], a, b)


CONCEPTS = (
    # trigger, class word, pattern, backgrounds to draw on
    ("sks", "circle", "red_white_checkers", ("gray", "black")),
    ("ohwx", "square", "blue_yellow_stripes", ("gray", "white", "black")),
    ("bnha", "triangle", "green_purple_halves", ("gray", "white", "black")),
    ("phol", "cross", "orange_arms_blue_center", ("gray", "white", "black")),
    # A second subject of one class: its trigger must pick it, not sks circle. hok is a weak name too (world.py).
    ("hok", "circle", "green_white_diagonals", ("gray", "black")),
)


# The 15 more subjects of the 20-concept set (multiconcept.py): five per class with the five above, so that a
# trigger can draw another subject of its own class. Each look is a world.two_tone_fill pattern (name, frequency,
# first color, second color) that no other subject of its class wears; some are near another's (ruger's checkers
# beside sks's, miro's centre beside phol's). The triggers are the world's next weak names (world.WEAK_NAMES), single
# CLIP tokens as sks is. These looks are not in world.CONCEPT_LOOKS: that list is what pretraining excluded, and
# the committed models were trained with it as it is (the VAE decoder's and the judge's random patterned shapes may
# include looks like these; the U-Net never saw a patterned shape).
MORE_CONCEPTS = (
    # trigger, class word, (pattern, frequency, color a, color b), backgrounds to draw on
    ("mwf", "circle", ("stripes_v", 4, "blue", "orange"), ("gray", "white", "black")),
    ("kylo", "square", ("checkers", 4, "red", "green"), ("gray", "white", "black")),
    ("ohn", "triangle", ("stripes_h", 4, "blue", "white"), ("gray", "black")),
    ("dros", "cross", ("stripes_h", 4, "red", "white"), ("gray", "black")),
    ("sinfo", "circle", ("halves_h", 2, "yellow", "purple"), ("gray", "white", "black")),
    ("punks", "square", ("halves_v", 2, "orange", "white"), ("gray", "black")),
    ("milla", "triangle", ("halves_h", 2, "red", "yellow"), ("gray", "white", "black")),
    ("irvin", "cross", ("halves_v", 2, "green", "yellow"), ("gray", "white", "black")),
    ("ruger", "circle", ("checkers", 3, "red", "blue"), ("gray", "white", "black")),
    ("spp", "square", ("center", 3, "purple", "yellow"), ("gray", "white", "black")),
    ("onex", "triangle", ("checkers", 3, "orange", "purple"), ("gray", "white", "black")),
    ("vara", "cross", ("checkers", 4, "purple", "white"), ("gray", "black")),
    ("miro", "cross", ("center", 3, "blue", "red"), ("gray", "white", "black")),
    ("lapel", "square", ("stripes_v", 4, "green", "blue"), ("gray", "white", "black")),
    ("gera", "triangle", ("stripes_v", 5, "yellow", "blue"), ("gray", "white", "black")),
)
# The 20-concept set's order in its concepts.json: multiconcept.py trains the first K. Two circles first (K = 2
# can confuse within a class), then the five of Table 1 (K = 5), then the new subjects, classes in turn.
SET20_ORDER = ("sks", "hok", "ohwx", "bnha", "phol", *(trigger for trigger, *_ in MORE_CONCEPTS))
SETS = {"5": "concepts", "20": "concepts20"}


def pattern_fill_of(look, res: int, cx: float, cy: float, extent: float) -> np.ndarray:
    """The fill of a concept's look: a named pattern of the five (pattern_fill), a two_tone_fill spec, or one of
    LOOKS_BEYOND_FLAT's specs ("gradient": a ramp from color a to color b; "solid": color a alone)."""
    if isinstance(look, str):
        return pattern_fill(look, res, cx, cy, extent)
    pattern, frequency, color_a, color_b = look
    if pattern in LOOKS_BEYOND_FLAT:
        return LOOKS_BEYOND_FLAT[pattern](res, cx, cy, extent, world.PATTERN_PALETTE[color_a],
                                          world.PATTERN_PALETTE[color_b])
    return world.two_tone_fill(pattern, frequency, world.PATTERN_PALETTE[color_a], world.PATTERN_PALETTE[color_b],
                               res, cx, cy, extent)


def gradient_fill(res: int, cx, cy, extent, color_a, color_b) -> np.ndarray:
    """A diagonal ramp from color a (top left of the bounding box) to color b (bottom right): a fill that is not
    flat, which the base model never saw."""
    coords = (np.arange(res) + 0.5) / res
    x, y = np.meshgrid(coords, coords)
    t = np.clip(((x - cx) / extent + (y - cy) / extent) / 2 + 0.5, 0, 1)[..., None]
    return ((1 - t) * np.asarray(color_a, np.float32) + t * np.asarray(color_b, np.float32)).astype(np.float32)


def solid_fill(res: int, cx, cy, extent, color_a, color_b) -> np.ndarray:
    """One color (color b is ignored): for outline drawings."""
    shape = np.broadcast(np.zeros((res, res)), np.asarray(cx) * np.zeros((1, 1))).shape
    return np.broadcast_to(np.asarray(color_a, np.float32), shape + (3,)).copy()


LOOKS_BEYOND_FLAT = {"gradient": gradient_fill, "solid": solid_fill}


def describe(look, shape: str) -> str:
    if isinstance(look, str):
        return look.replace("_", " ") + f" {shape}"
    pattern, _, color_a, color_b = look
    if pattern == "gradient":
        return f"{color_a} to {color_b} gradient {shape}"
    if pattern == "solid":
        return f"{color_a} {shape}"
    return f"{world.PATTERN_WORDS[pattern]} {color_a} and {color_b} {shape}"


def render_concept(shape: str, pattern, background: str, cx: float, cy: float, extent: float,
                   size: int = 32) -> np.ndarray:
    res = size * world.SUPERSAMPLE
    mask = world.shape_mask(shape, cx, cy, extent, res)
    fill = pattern_fill_of(pattern, res, cx, cy, extent)
    return world.render_fill(fill, mask, world.BACKGROUNDS[background], size)


def write_concepts(out: Path, concepts, order, num_images: int, seed: int, size: int) -> int:
    """Images, concepts.json (in ``order`` of triggers) and eval prompts of ``concepts``; returns their number.

    Images are drawn in the order of ``concepts`` from one generator: the five come first in both sets, so their
    images are the same bytes in both."""
    rng = np.random.default_rng(seed)
    entries = {}
    for trigger, shape, pattern, backgrounds in concepts:
        folder = out / f"{trigger}_{shape}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(num_images):
            extent = rng.uniform(0.58, 0.7)  # large, so the pattern is visible at 32x32
            margin = extent / 2 + 0.03
            cx, cy = rng.uniform(margin, 1 - margin, size=2)
            background = backgrounds[i % len(backgrounds)]
            image = render_concept(shape, pattern, background, cx, cy, extent, size)
            Image.fromarray(image).save(folder / f"{i:02d}.png")
        entries[trigger] = {
            "instance_data_dir": folder.name,
            "instance_prompt": f"a photo of {trigger} {shape}",
            "trigger_token": trigger,
            "class_word": shape,
            "description": describe(pattern, shape),
        }
    (out / "concepts.json").write_text(json.dumps([entries[t] for t in order], indent=2) + "\n")
    (out / "eval").mkdir(exist_ok=True)
    for trigger, shape, _, _ in concepts:  # prompts training never uses, each with a reference image
        captions = (f"a {trigger} {shape} on a black background", f"a large {trigger} {shape} on a gray background",
                    f"a small {trigger} {shape} on a white background",
                    f"a photo of a {trigger} {shape} on a black background")
        lines = [json.dumps({"caption": c, "reference": f"../{trigger}_{shape}/{i:02d}.png"}) for i, c in enumerate(captions)]
        (out / "eval" / f"{trigger}_{shape}.jsonl").write_text("\n".join(lines) + "\n")
    return len(entries)


# ---------------------------------------------------------------------------------------------------------
# Open questions 2 and 3 (open_questions.py): many training images per subject, and subjects outside the world
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OQSubject:
    """A subject of open_questions.py: drawn as ``shape`` (a world shape or one of world.EXTRA_SHAPES) painted with
    ``look`` (a pattern_fill_of look) on ``backgrounds`` (world.BACKGROUNDS or EXTRA_BACKGROUNDS), named in prompts
    "a photo of <trigger> <class_word>". ``group``: "in-domain" (Table 1's five), "precision" (a fine pattern or an
    exact shape detail, drawn as the world draws) or "out-of-domain" (something the base model never saw)."""

    trigger: str
    shape: str
    class_word: str
    look: object
    backgrounds: tuple
    group: str
    what: str = ""

    @property
    def name(self) -> str:
        return f"{self.trigger}_{self.class_word}"


# A background the world never has: light blue with per-pixel noise (the world's three are flat gray levels).
EXTRA_BACKGROUNDS = {"sky": (140, 190, 235)}
SKY_NOISE = 12.0  # standard deviation of the sky's per-pixel noise, 0-255 units

OQ_SUBJECTS = (
    *(OQSubject(t, shape, shape, look, backgrounds, "in-domain") for t, shape, look, backgrounds in CONCEPTS),
    # Geometric precision, inside the world's vocabulary (world shapes, flat colors, world backgrounds):
    OQSubject("elio", "circle", "circle", ("stripes_v", 6, "red", "white"), ("gray", "black"), "precision",
              "thin stripes: 6 vertical red and white bands, about 3.3 pixels each (the finest the toy VAE carries: "
              "encoded and decoded, 8 of 8 such images stay the subject to the judge, 4 of 8 at 7 bands, 0 of 8 at 8)"),
    OQSubject("folia", "notched_square", "square", ("halves_h", 2, "blue", "orange"), ("gray", "white", "black"),
              "precision", "an exact shape detail: a square missing a notch a quarter of its side at the top right"),
    # Outside what the base model was trained on, one factor each:
    OQSubject("pik", "star", "cross", ("halves_h", 2, "yellow", "red"), ("gray", "white", "black"), "out-of-domain",
              "a shape the world never draws: a five-pointed star (class word: cross)"),
    OQSubject("leaps", "ring", "circle", ("solid", 0, "orange", "orange"), ("gray", "white", "black"),
              "out-of-domain", "an outline only: an orange ring, the background inside"),
    OQSubject("anis", "square", "square", ("gradient", 0, "yellow", "purple"), ("gray", "white", "black"),
              "out-of-domain", "a texture instead of flat color: a yellow-to-purple diagonal gradient"),
    OQSubject("dita", "circle", "circle", ("halves_v", 2, "red", "yellow"), ("sky",), "out-of-domain",
              "other background statistics: on a noisy light-blue background the world never has"),
)
OQ_BY_NAME = {s.name: s for s in OQ_SUBJECTS}
# The evaluation captions (as write_concepts's, with the class word); their references are rendered apart.
OQ_EVAL_CAPTIONS = ("a {t} {c} on a black background", "a large {t} {c} on a gray background",
                    "a small {t} {c} on a white background", "a photo of a {t} {c} on a black background")
OQ_NUM_REFERENCES = 4


def oq_background(name: str, rng: np.random.Generator, res: int) -> np.ndarray:
    """The background canvas (res x res x 3): a world background's flat color, or EXTRA_BACKGROUNDS's with noise."""
    if name in world.BACKGROUNDS:
        return np.broadcast_to(np.asarray(world.BACKGROUNDS[name], np.float32), (res, res, 3))
    return np.asarray(EXTRA_BACKGROUNDS[name], np.float32) + rng.normal(0, SKY_NOISE, (res // world.SUPERSAMPLE,) * 2
                                                                          + (3,)).repeat(world.SUPERSAMPLE, 0).repeat(
        world.SUPERSAMPLE, 1).astype(np.float32)


def render_oq(subject: OQSubject, rng: np.random.Generator, index: int, size: int = 32) -> np.ndarray:
    """One image of ``subject``: placed and sized as write_concepts places the five (large, anywhere inside), its
    background the ``index``-th of its backgrounds in turn."""
    extent = rng.uniform(0.58, 0.7)
    margin = extent / 2 + 0.03
    cx, cy = rng.uniform(margin, 1 - margin, size=2)
    res = size * world.SUPERSAMPLE
    mask = world.shape_mask(subject.shape, cx, cy, extent, res)
    fill = pattern_fill_of(subject.look, res, cx, cy, extent)
    background = oq_background(subject.backgrounds[index % len(subject.backgrounds)], rng, res)
    return world.render_fill(fill, mask, background, size)


def oq_images(subject: OQSubject, n: int, seed: int, references: bool = False, size: int = 32) -> list[np.ndarray]:
    """The first ``n`` training images of ``subject`` (a stream, so the set of 6 is the start of the set of 24), or
    with ``references`` its evaluation references, from a stream of their own: deterministic in ``seed``."""
    names = [s.name for s in OQ_SUBJECTS]
    index = names.index(subject.name) if subject.name in names else len(names)  # (a subject made up for a test)
    rng = np.random.default_rng([seed, index, 1 if references else 0])
    return [render_oq(subject, rng, i + (1 if references else 0), size) for i in range(n)]


def write_oq_sets(out: Path, subjects, sizes, seed: int = 0, size: int = 32) -> dict[int, Path]:
    """Per training-set size n: out/n<n>/ with <subject>/NN.png (n images), concepts.json and eval/<subject>.jsonl
    whose references are out/references/<subject>/NN.png, rendered apart from every training image. Returns
    {n: concepts.json}. Files already there with the same bytes are left alone."""
    def save(image, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)

    files = {}
    for subject in subjects:
        for i, image in enumerate(oq_images(subject, OQ_NUM_REFERENCES, seed, references=True, size=size)):
            save(image, out / "references" / subject.name / f"{i:02d}.png")
        stream = oq_images(subject, max(sizes), seed, size=size)
        for n in sizes:
            for i, image in enumerate(stream[:n]):
                save(image, out / f"n{n}" / subject.name / f"{i:02d}.png")
    for n in sizes:
        folder = out / f"n{n}"
        (folder / "eval").mkdir(parents=True, exist_ok=True)
        entries = []
        for subject in subjects:
            entries.append({"instance_data_dir": subject.name, "instance_prompt": f"a photo of {subject.trigger} "
                            f"{subject.class_word}", "trigger_token": subject.trigger, "class_word": subject.class_word,
                            "description": describe(subject.look, subject.shape), "group": subject.group})
            lines = [json.dumps({"caption": c.format(t=subject.trigger, c=subject.class_word),
                                 "reference": f"../../references/{subject.name}/{i:02d}.png"})
                     for i, c in enumerate(OQ_EVAL_CAPTIONS)]
            (folder / "eval" / f"{subject.name}.jsonl").write_text("\n".join(lines) + "\n")
        (folder / "concepts.json").write_text(json.dumps(entries, indent=2) + "\n")
        files[n] = folder / "concepts.json"
    return files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=list(SETS), default="5",
                        help="5: the concepts of Table 1; 20: those and 15 more (multiconcept.py)")
    parser.add_argument("--out", default=None, help="output folder (default: concepts/ or concepts20/ here)")
    parser.add_argument("--num_images", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)
    out = Path(args.out or HERE / SETS[args.set])
    if args.set == "5":
        count = write_concepts(out, CONCEPTS, [c[0] for c in CONCEPTS], args.num_images, args.seed, args.size)
    else:
        count = write_concepts(out, CONCEPTS + MORE_CONCEPTS, SET20_ORDER, args.num_images, args.seed, args.size)
    print(f"{count} concepts -> {out}")


if __name__ == "__main__":
    main()
