"""Write the personal concepts: patterned subjects the base world never saw, 6 training images each.

Each subject is a shape the world knows (its class word) painted with a pattern the world never shows
(checkers, stripes, two tones, two colours), named by a trigger that is ONE token of CLIP's BPE vocabulary
and not a common word. Output: concepts/<trigger>_<class>/NN.png and concepts/concepts.json, whose
instance_data_dir entries are relative to the JSON file (as train_cat_lora.py --concepts_list expects).

  python make_concepts.py            # deterministic: same seed, same images
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


def render_concept(shape: str, pattern: str, background: str, cx: float, cy: float, extent: float,
                   size: int = 32) -> np.ndarray:
    res = size * world.SUPERSAMPLE
    mask = world.shape_mask(shape, cx, cy, extent, res)
    fill = pattern_fill(pattern, res, cx, cy, extent)
    return world.render_fill(fill, mask, world.BACKGROUNDS[background], size)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "concepts"))
    parser.add_argument("--num_images", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    out = Path(args.out)
    rng = np.random.default_rng(args.seed)
    entries = []
    for trigger, shape, pattern, backgrounds in CONCEPTS:
        folder = out / f"{trigger}_{shape}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.num_images):
            extent = rng.uniform(0.58, 0.7)  # large, so the pattern is visible at 32x32
            margin = extent / 2 + 0.03
            cx, cy = rng.uniform(margin, 1 - margin, size=2)
            background = backgrounds[i % len(backgrounds)]
            image = render_concept(shape, pattern, background, cx, cy, extent, args.size)
            Image.fromarray(image).save(folder / f"{i:02d}.png")
        entries.append({
            "instance_data_dir": folder.name,
            "instance_prompt": f"a photo of {trigger} {shape}",
            "trigger_token": trigger,
            "class_word": shape,
            "description": pattern.replace("_", " ") + f" {shape}",
        })
    (out / "concepts.json").write_text(json.dumps(entries, indent=2) + "\n")
    (out / "eval").mkdir(exist_ok=True)
    for trigger, shape, _, _ in CONCEPTS:  # prompts training never uses, each with a reference image
        captions = (f"a {trigger} {shape} on a black background", f"a large {trigger} {shape} on a gray background",
                    f"a small {trigger} {shape} on a white background",
                    f"a photo of a {trigger} {shape} on a black background")
        lines = [json.dumps({"caption": c, "reference": f"../{trigger}_{shape}/{i:02d}.png"}) for i, c in enumerate(captions)]
        (out / "eval" / f"{trigger}_{shape}.jsonl").write_text("\n".join(lines) + "\n")
    print(f"{len(entries)} concepts -> {out}")


if __name__ == "__main__":
    main()
