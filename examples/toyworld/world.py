"""A procedural text-to-image world: coloured shapes on plain backgrounds, with captions.

Every image is fully described by a ``Scene`` (shape, color, size, position, background) and is rendered
deterministically (anti-aliased by 4x supersampling). ``sample_scenes(n, seed)`` draws scenes from a seeded
numpy generator, so the same seed always gives the same images and captions.

Captions name shape, color, size and background ("a small red circle on a white background"), or a subset
of them ("a photo of a circle"); the position is a factor of the world that captions never mention.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (230, 20, 20),
    "orange": (255, 140, 0),
    "yellow": (250, 225, 0),
    "green": (20, 180, 40),
    "blue": (30, 60, 240),
    "purple": (150, 30, 200),
}
SIZES = {"small": 0.34, "large": 0.62}  # side / diameter as a fraction of the image
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}

# Shape x color pairs never shown during pretraining: each shape and each color appears in at most one.
HELD_OUT_PAIRS = (("circle", "green"), ("square", "purple"), ("triangle", "orange"), ("cross", "blue"))

SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    background: str
    cx: float  # centre, as a fraction of the image (0..1)
    cy: float


def shape_mask(shape: str, cx: float, cy: float, extent: float, res: int) -> np.ndarray:
    """Boolean mask (res x res) of a shape centred at (cx, cy) whose bounding box has side ``extent``."""
    coords = (np.arange(res) + 0.5) / res
    x, y = np.meshgrid(coords, coords)  # x to the right, y downwards
    dx, dy, h = x - cx, y - cy, extent / 2
    if shape == "circle":
        return dx**2 + dy**2 <= h**2
    if shape == "square":
        h = h * 0.88  # a square looks bigger than a circle of the same extent
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # Upright isosceles triangle filling the bounding box: apex at the top, base at the bottom.
        t = (dy + h) / (2 * h)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * h)
    if shape == "cross":
        arm = h * 0.36
        return ((np.abs(dx) <= h) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= h) & (np.abs(dx) <= arm))
    if shape in EXTRA_SHAPES:
        return EXTRA_SHAPES[shape](dx, dy, h)
    raise ValueError(f"unknown shape {shape!r}")


def _star(dx, dy, h, points: int = 5, inner: float = 0.5):
    """A five-pointed star, one point up: inside when the radius is under the star's outline at that angle."""
    angle = np.mod(np.arctan2(dx, -dy), 2 * np.pi / points) - np.pi / points  # 0 halfway between two points
    half = np.pi / points
    # The outline between a point (radius h, angle +-half) and the notch (radius inner * h, angle 0) is straight.
    tip = np.stack([h * np.cos(half), h * np.sin(half)])
    notch = np.stack([inner * h, 0.0])
    edge = tip - notch
    r = np.hypot(dx, dy)
    px, py = r * np.cos(angle), r * np.abs(np.sin(angle))
    cross = edge[0] * (py - notch[1]) - edge[1] * (px - notch[0])
    return cross >= 0  # on the centre's side of the edge (notch to tip)


def _notched_square(dx, dy, h):
    """The world's square with a square notch, a quarter of its side, cut from its top-right corner."""
    h = h * 0.88
    notch = h / 2
    square = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    return square & ~((dx > h - notch) & (dy < -h + notch))


def _ring(dx, dy, h, width: float = 0.3):
    """A circle's outline only: a ring whose width is ``width`` of the radius."""
    r2 = dx**2 + dy**2
    return (r2 <= h**2) & (r2 >= (h * (1 - width)) ** 2)


# Shapes the world never draws (open_questions.py's subjects): shape_mask renders them, SHAPES leaves them out.
EXTRA_SHAPES = {"star": _star, "notched_square": _notched_square, "ring": _ring}


def render_fill(fill: np.ndarray, mask: np.ndarray, background, size: int) -> np.ndarray:
    """Paint per-pixel ``fill`` colors (res x res x 3) inside ``mask`` over ``background``; downsample to size."""
    res = mask.shape[0]
    canvas = np.empty((res, res, 3), dtype=np.float32)
    canvas[:] = np.asarray(background, dtype=np.float32)
    canvas[mask] = fill[mask]
    k = res // size
    canvas = canvas.reshape(size, k, size, k, 3).mean(axis=(1, 3))
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Render a scene to a (size, size, 3) uint8 RGB array."""
    res = size * SUPERSAMPLE
    mask = shape_mask(scene.shape, scene.cx, scene.cy, SIZES[scene.size], res)
    fill = np.empty((res, res, 3), dtype=np.float32)
    fill[:] = np.asarray(COLORS[scene.color], dtype=np.float32)
    return render_fill(fill, mask, BACKGROUNDS[scene.background], size)


def caption(scene: Scene, rng: np.random.Generator, color_only_prob: float = 0.0) -> str:
    """One caption for a scene, from several templates that name some or all of its attributes.

    With probability ``color_only_prob`` the caption names the color but not the shape ("a blue shape"), which
    teaches the color words apart from the shapes they were seen with. At 0 no random number is drawn for it,
    so the caption stream is the one the first 14,250 pretraining steps saw.
    """
    s, c, z, b = scene.shape, scene.color, scene.size, scene.background
    if color_only_prob and rng.random() < color_only_prob:
        color_only = (f"a {c} shape", f"a photo of a {c} shape", f"a {z} {c} shape on a {b} background")
        return color_only[rng.integers(len(color_only))]
    templates = (
        f"a {z} {c} {s} on a {b} background",
        f"a {z} {c} {s} on a {b} background",
        f"a {c} {s} on a {b} background",
        f"a {c} {s}",
        f"a photo of a {c} {s}",
        f"a photo of a {z} {c} {s}",
        f"a {z} {s}",
        f"a {s} on a {b} background",
        f"a photo of a {s}",
        f"a {s}",
    )
    text = templates[rng.integers(len(templates))]
    if rng.random() < 0.2:  # DreamBooth-style prompts drop the article: "a photo of circle"
        text = text.replace("of a ", "of ", 1)
    return text


# Rare single-token CLIP words used as names in pretraining captions ("a photo of hok circle"), so that the text
# encoder learns rare words as words, as CLIP's did: Stable Diffusion's text encoder separates "a photo of sks dog"
# from "a photo of dog", while a toy encoder that never saw "sks" passes almost none of it on. Drawn once (seed 0)
# from the 3-5 letter words among the last ~1,400 BPE merges, the concepts' triggers set apart.
#   BOUND_NAMES: each always means one look (color, size, background), in the order of NAMED_LOOKS.
#   WEAK_NAMES: a weak meaning only: each prefers one background (2/3 of its images, against 1/3 by chance).
#   PLAIN_NAMES: no visual meaning at all (any image).
# The concepts' triggers are weak names, as "sks" is for Stable Diffusion.
NAMED_LOOKS = tuple((c, z, b) for c in COLORS for z in SIZES for b in BACKGROUNDS)
BOUND_NAMES = ("eface", "aew", "frome", "pln", "asot", "linus", "akon", "pesa", "pkg", "tyl", "hefty", "ssnhq",
               "scion", "mert", "aided", "waz", "nees", "pte", "kiwis", "bln", "kwa", "ummer", "lpg", "orcas",
               "mirai", "reys", "dunks", "doves", "gordo", "cals", "isch", "mohd", "veli", "dinho", "aroo", "toid")
TRIGGER_NAMES = ("sks", "ohwx", "bnha", "phol")
WEAK_NAMES = TRIGGER_NAMES + ("hok", "mwf", "sinfo", "ruger", "kylo", "punks", "spp", "lapel", "ohn", "milla",
                              "onex", "gera", "dros", "irvin", "vara", "miro", "brero", "rinse", "germs", "ncbd",
                              "inous", "acu", "elio", "folia", "pik", "leaps", "anis", "dita")
PLAIN_NAMES = ("tien", "pree", "yoh", "sgh", "keel", "guin", "puli", "sping", "abit", "kprc", "aptly", "euref",
               "nyrd", "hamr", "assa", "njcaa", "eet", "panna", "smore", "niro", "pgs", "notte", "haves", "suru",
               "maja", "glows", "rinka", "wafc", "altaf", "adero", "fcu", "aroa")
BOUND_NAME_OF_LOOK = dict(zip(NAMED_LOOKS, BOUND_NAMES))
# The background each weak name prefers: the names take the backgrounds in turn; and (only with weak_size) the size.
WEAK_NAME_BACKGROUND = {name: list(BACKGROUNDS)[i % len(BACKGROUNDS)] for i, name in enumerate(WEAK_NAMES)}
WEAK_NAME_SIZE = {name: list(SIZES)[(i // len(BACKGROUNDS)) % len(SIZES)] for i, name in enumerate(WEAK_NAMES)}


def named_caption(scene: Scene, rng: np.random.Generator, name_prob: float, color_only_prob: float = 0.0,
                  standalone: bool = False, weak_match_prob: float = 0.5, weak_size: bool = False) -> str:
    """``caption(scene)``, and with probability ``name_prob`` a rare-word name before the shape word.

    The name is bound (the scene's look's own name; 40%), weak (30%: with probability ``weak_match_prob`` one
    that prefers the scene's background, and with ``weak_size`` its size too, else any) or plain (30%, any). A
    bound name may also stand alone for the attributes it means: "a photo of eface circle" (half of the time;
    always with ``standalone``, and a weak name then stands in a caption that names no background, nor, with
    ``weak_size``, the size, so that reading the name is the only way to its meaning).
    """
    text = caption(scene, rng, color_only_prob)
    if not name_prob or rng.random() >= name_prob:
        return text
    kind = rng.random()
    if kind < 0.4:
        name = BOUND_NAME_OF_LOOK[(scene.color, scene.size, scene.background)]
        if standalone or rng.random() < 0.5:
            short = (f"a photo of {name} {scene.shape}", f"a {name} {scene.shape}", f"a photo of a {name} {scene.shape}")
            return short[rng.integers(len(short))]
    elif kind < 0.7:
        pool = WEAK_NAMES
        if rng.random() < weak_match_prob:
            pool = [n for n in WEAK_NAMES if WEAK_NAME_BACKGROUND[n] == scene.background
                    and (not weak_size or WEAK_NAME_SIZE[n] == scene.size)]
        name = pool[rng.integers(len(pool))]
        if standalone:
            short = (f"a photo of {name} {scene.shape}", f"a {name} {scene.shape}",
                     f"a photo of a {scene.color} {name} {scene.shape}",
                     f"a {scene.color} {name} {scene.shape}" if weak_size else f"a {scene.size} {name} {scene.shape}")
            return short[rng.integers(len(short))]
    else:
        name = PLAIN_NAMES[rng.integers(len(PLAIN_NAMES))]
    words = text.split()
    at = max(i for i, w in enumerate(words) if w in SHAPES or w == "shape")
    return " ".join(words[:at] + [name] + words[at:])


# Two-color patterns, for the VAE decoder only (the UNet never sees them): the world's shapes are solid, and a
# decoder that has only seen solid fills turns a personal concept's checkers or stripes into mush.
PATTERNS = ("checkers", "stripes_h", "stripes_v", "halves_v", "halves_h", "center")
# The personal concepts (make_concepts.py) as (shape, pattern, colors): never drawn here, for any frequency.
CONCEPT_LOOKS = {("circle", "checkers", frozenset({"red", "white"})),
                 ("square", "stripes_h", frozenset({"blue", "yellow"})),
                 ("triangle", "halves_v", frozenset({"green", "purple"})),
                 ("cross", "center", frozenset({"orange", "blue"})),
                 # hok circle's diagonals are a pattern PATTERNS lacks: listed for completeness, nothing to exclude
                 ("circle", "diagonals", frozenset({"green", "white"}))}


def two_tone_fill(pattern: str, k: int, color_a, color_b, res: int, cx: float, cy: float, extent: float) -> np.ndarray:
    """Per-pixel colors (res x res x 3) of a two-color pattern laid over a shape's bounding box; k = frequency."""
    coords = (np.arange(res) + 0.5) / res
    x, y = np.meshgrid(coords, coords)
    u, v = (x - cx) / extent + 0.5, (y - cy) / extent + 0.5  # 0..1 across the bounding box
    first = {
        "checkers": lambda: ((np.floor(u * k) + np.floor(v * k)) % 2) == 0,
        "stripes_h": lambda: (np.floor(v * k) % 2) == 0,
        "stripes_v": lambda: (np.floor(u * k) % 2) == 0,
        "halves_v": lambda: u < 0.5,
        "halves_h": lambda: v < 0.5,
        "center": lambda: ~((np.abs(u - 0.5) <= 0.5 / k) & (np.abs(v - 0.5) <= 0.5 / k)),
    }[pattern]()
    return np.where(first[..., None], np.asarray(color_a, np.float32), np.asarray(color_b, np.float32))


PATTERN_PALETTE = {**COLORS, "white": (250, 250, 250)}


def random_pattern_look(rng: np.random.Generator) -> tuple[str, str, str, str]:
    """(shape, pattern, color a, color b), drawn at random until it is none of the concepts' looks."""
    while True:
        shape, pattern = SHAPES[rng.integers(len(SHAPES))], PATTERNS[rng.integers(len(PATTERNS))]
        a, b = (str(c) for c in rng.choice(list(PATTERN_PALETTE), size=2, replace=False))
        if (shape, pattern, frozenset({a, b})) not in CONCEPT_LOOKS:
            return shape, pattern, a, b


def random_patterned_image(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A shape painted with a random two-color pattern (palette colors and white), never a concept's look."""
    return random_patterned_sample(rng, size)[0]


def random_patterned_sample(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, str]:
    """(image, caption) of a random two-color patterned shape; the same random stream as random_patterned_image."""
    shape, pattern, a, b = random_pattern_look(rng)
    extent = rng.uniform(0.34, 0.72)
    margin = extent / 2 + 0.03
    cx, cy = rng.uniform(margin, 1 - margin, size=2)
    res = size * SUPERSAMPLE
    fill = two_tone_fill(pattern, int(rng.integers(2, 7)), PATTERN_PALETTE[a], PATTERN_PALETTE[b], res, cx, cy,
                         extent)
    background_name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    image = render_fill(fill, shape_mask(shape, cx, cy, extent, res), BACKGROUNDS[background_name], size)
    return image, pattern_caption(shape, pattern, a, b, background_name)


# Caption words of the patterns, for the judge (the base model never sees patterned images).
PATTERN_WORDS = {"checkers": "checkered", "stripes_h": "striped", "stripes_v": "banded", "halves_v": "split",
                 "halves_h": "layered", "center": "centred"}


def pattern_caption(shape: str, pattern: str, color_a: str, color_b: str, background: str) -> str:
    """"a checkered red and white circle on a black background". Checkers and stripes read the same with the two
    colors swapped, so their colors are named in a fixed order; halves and a centre keep the outer color first."""
    if pattern in ("checkers", "stripes_h", "stripes_v"):
        color_a, color_b = sorted((color_a, color_b))
    return f"a {PATTERN_WORDS[pattern]} {color_a} and {color_b} {shape} on a {background} background"


def full_caption(scene: Scene) -> str:
    return f"a {scene.size} {scene.color} {scene.shape} on a {scene.background} background"


def random_scene(rng: np.random.Generator, exclude_pairs=HELD_OUT_PAIRS, shape=None, color=None) -> Scene:
    """Draw one scene; shape x color pairs in ``exclude_pairs`` are never drawn (unless forced)."""
    while True:
        s = shape or SHAPES[rng.integers(len(SHAPES))]
        c = color or list(COLORS)[rng.integers(len(COLORS))]
        if (s, c) not in exclude_pairs or (shape and color):
            break
    z = list(SIZES)[rng.integers(len(SIZES))]
    b = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    margin = SIZES[z] / 2 + 0.04
    cx, cy = rng.uniform(margin, 1 - margin, size=2)
    return Scene(s, c, z, b, float(cx), float(cy))


def sample_scenes(n: int, seed: int, exclude_pairs=HELD_OUT_PAIRS):
    """``n`` (scene, caption) pairs, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng, exclude_pairs)
        out.append((scene, caption(scene, rng)))
    return out


def make_dataset(n: int, seed: int, size: int = 32, exclude_pairs=HELD_OUT_PAIRS):
    """(images uint8 [n, size, size, 3], captions list, scenes list), deterministic in ``seed``."""
    pairs = sample_scenes(n, seed, exclude_pairs)
    images = np.stack([render(scene, size) for scene, _ in pairs])
    return images, [c for _, c in pairs], [s for s, _ in pairs]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a grid of world samples with their captions.")
    parser.add_argument("--out", default="world_samples.png")
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32)
    cli = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, captions, _ = make_dataset(cli.n, cli.seed, cli.size)
    cols = 6
    rows = (cli.n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.2, rows * 2.4))
    for ax, img, cap in zip(axes.flat, images, captions):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(cap.replace(" on a", "\non a"), fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(cli.out, dpi=100)
    print(Path(cli.out).resolve())
