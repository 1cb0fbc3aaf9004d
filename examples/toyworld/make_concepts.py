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
    """The fill of a concept's look: a named pattern of the five (pattern_fill), or a two_tone_fill spec."""
    if isinstance(look, str):
        return pattern_fill(look, res, cx, cy, extent)
    pattern, frequency, color_a, color_b = look
    return world.two_tone_fill(pattern, frequency, world.PATTERN_PALETTE[color_a], world.PATTERN_PALETTE[color_b],
                               res, cx, cy, extent)


def describe(look, shape: str) -> str:
    if isinstance(look, str):
        return look.replace("_", " ") + f" {shape}"
    pattern, _, color_a, color_b = look
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
