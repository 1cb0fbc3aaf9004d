"""A judge that sees the subject: does a toy-world image show a personal subject, only its class, or neither?

The toy world knows each personal subject exactly (make_concepts.py: a shape the world knows, painted with a
two-color pattern). The judge uses that knowledge and nothing learned:

1. Background: the median color of the image's outermost ring of pixels. Foreground: the pixels whose color is
   off it, without specks (regions of fewer than 4 pixels).
2. The subject is re-rendered over that background, and two fits are measured. Shape fit: the IoU of the
   foreground with the rendering's off-background pixels, at the size and position where it is largest (a blob,
   a missing part, another shape lower it). Pattern fit: for each of the look's two colors, the share of the
   rendering's pixels of that color that the image has there (within a tolerance), the lesser of the two (one
   color where there should be two, or the right colors in another layout, lower it), at the placement within a
   pixel or two of the shape's where it is largest (a model draws patterns a little off its outlines).
3. Verdict: "subject" when both fits reach their thresholds and the look fits better (shape fit x pattern fit)
   on the subject's own shape than on any other world shape; else "class-only" when the hole-filled foreground's
   best-fitting world shape (IoU) is the subject's class (a plain red circle for sks circle); else "other". The
   score, in [0, 1], is
   shape fit x pattern fit. Images are square uint8 RGB arrays.

    python examples/toyworld/judge.py calibrate --out examples/toyworld/results/judge_calibration
    python examples/toyworld/judge.py score --trigger sks image.png [...]

``calibrate`` renders the subjects right and hard negatives (a blob in the subject's colors and pattern, the
pattern on another shape, the class in one color, the class in the subject's two colors with another pattern,
other shapes) and writes the confusion matrix as .md and .json. ``base_closeness`` compares an adapter's
trigger-less images with the base model's at the same seeds: pixel change, and whether the world's attributes that
``read_scene`` reads (shape, color, size, background) stay the same. evaluate_kps.py --subject_judge toyworld
reports both.
"""

import argparse
import functools
import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

import make_concepts
import world

VERDICTS = ("subject", "class-only", "other")


@dataclass(frozen=True)
class Subject:
    """A personal subject of make_concepts.py: trigger, class shape and look (a make_concepts look: the name of
    one of pattern_fill's patterns, or a (pattern, frequency, color a, color b) spec of world.two_tone_fill)."""

    trigger: str
    shape: str
    look: object

    def fill(self, placements: "Placements", res: int) -> np.ndarray:
        """Per-pixel colors (n, res, res, 3) of the look laid over each placement's bounding box."""
        return make_concepts.pattern_fill_of(self.look, res, *placements.columns())

    def colors(self) -> np.ndarray:
        """The look's two colors (2, 3): read from a large rendering of it, so nothing is written down twice."""
        return look_colors(self.look)


@functools.lru_cache(maxsize=None)
def look_colors(look) -> np.ndarray:
    """(k, 3), k = 1 or 2: the look's colors; for a look of many colors (a gradient), the two ends of its range
    (along the colors' principal axis), so that the pattern fit asks for each end where the rendering has it."""
    fill = make_concepts.pattern_fill_of(look, 64, *Placements.one(0.5, 0.5, 1.0).columns())
    colors = np.unique(fill.reshape(-1, 3), axis=0)
    if len(colors) <= 2:
        return colors
    centred = colors - colors.mean(axis=0)
    along = centred @ np.linalg.svd(centred, full_matrices=False)[2][0]
    return colors[[int(np.argmin(along)), int(np.argmax(along))]]


SUBJECTS = {trigger: Subject(trigger, shape, look)
            for trigger, shape, look, _ in make_concepts.CONCEPTS + make_concepts.MORE_CONCEPTS}
# open_questions.py's subjects (make_concepts.OQ_SUBJECTS): fine patterns, shape details, shapes and fills the world
# never draws.
SUBJECTS.update({s.trigger: Subject(s.trigger, s.shape, s.look) for s in make_concepts.OQ_SUBJECTS
                 if s.trigger not in SUBJECTS})


@dataclass(frozen=True)
class Placements:
    """n candidate placements of a shape: centres and bounding-box sides as fractions of the image, each (n,)."""

    cx: np.ndarray
    cy: np.ndarray
    extent: np.ndarray

    @staticmethod
    def one(cx: float, cy: float, extent: float) -> "Placements":
        return Placements(np.array([cx]), np.array([cy]), np.array([extent]))

    def columns(self):
        """(cx, cy, extent) shaped (n, 1, 1), so world's per-pixel formulas broadcast over the candidates."""
        return tuple(a[:, None, None] for a in (self.cx, self.cy, self.extent))

    def at(self, i: int) -> tuple[float, float, float]:
        return float(self.cx[i]), float(self.cy[i]), float(self.extent[i])


@dataclass(frozen=True)
class JudgeSettings:
    """The judge's tolerances (0-255 pixel units, pixels) and thresholds: chosen on calibration seed 0 and a
    person's labels of the toy U-Net's pictures (results/judge_people: chosen on sks and ohwx, the other three's
    labels seen too, so not a clean hold-out); checked on calibration seed 1."""

    background_tolerance: int = 48  # as evaluate_kps.py's border segmenter: above noise, below any color's contrast
    speck: int = 4  # off-background regions smaller than this are noise, not the subject
    pixel_tolerance: int = 100  # a pixel has the rendering's color when no channel is further off than this
    shape_fit: float = 0.75  # the IoU of the foreground with the subject's visible rendering that makes its shape
    pattern_fit: float = 0.7  # the share of each look color's pixels in that color (the lesser) that makes its pattern
    class_iou: float = 0.7  # the foreground's IoU with the class shape that makes "class-only"


@dataclass(frozen=True)
class Judgement:
    """What the judge sees in one image."""

    verdict: str  # one of VERDICTS
    score: float  # shape_fit x pattern_fit, in [0, 1]
    shape_fit: float  # IoU of the foreground with the off-background part of the subject rendered where it fits best
    pattern_fit: float  # share of that rendering's pixels of each of the look's colors that the image has (the lesser)
    shape: str | None  # the world shape that fits the (hole-filled) foreground best (None: no foreground)
    shape_iou: float  # its IoU
    placement: tuple[float, float, float]  # (cx, cy, extent) where the subject fits best


# ---------------------------------------------------------------------------------------------------------
# Background and foreground
# ---------------------------------------------------------------------------------------------------------


def border_ring(size: int) -> np.ndarray:
    ring = np.zeros((size, size), dtype=bool)
    ring[[0, -1], :] = ring[:, [0, -1]] = True
    return ring


def background_color(image: np.ndarray) -> np.ndarray:
    """The median color (3,) of the outermost ring of pixels."""
    return np.median(image[border_ring(image.shape[0])].astype(np.float32), axis=0)


def color_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The largest channel difference between colors, broadcast over leading axes."""
    difference = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    return np.maximum(np.maximum(difference[..., 0], difference[..., 1]), difference[..., 2])  # faster than max(-1)


def neighbors(y: int, x: int, diagonal: bool):
    yield from ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1))
    if diagonal:
        yield from ((y - 1, x - 1), (y - 1, x + 1), (y + 1, x - 1), (y + 1, x + 1))


def connected_regions(mask: np.ndarray, diagonal: bool = False) -> list[np.ndarray]:
    """The connected regions of a boolean mask (4-connected, or 8 with ``diagonal``) as boolean masks."""
    seen = np.zeros_like(mask)
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        region = np.zeros_like(mask)
        queue = deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            region[y, x] = True
            for ny, nx in neighbors(y, x, diagonal):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        regions.append(region)
    return regions


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` and every pixel not connected to the image's border through pixels outside it."""
    outside = [r for r in connected_regions(~mask) if (r & border_ring(mask.shape[0])).any()]
    return ~np.logical_or.reduce(outside) if outside else np.ones_like(mask)


def off_background(pixels: np.ndarray, background: np.ndarray, tolerance: int) -> np.ndarray:
    """Pixels whose color differs from the background's by more than ``tolerance`` in some channel."""
    return color_distance(pixels, background) > tolerance


def foreground_mask(image: np.ndarray, background: np.ndarray, settings: "JudgeSettings") -> np.ndarray:
    """The pixels off the background color, without specks: regions (8-connected, so that checkers whose white
    cells vanish on a white background stay one object) smaller than ``settings.speck`` pixels are noise."""
    regions = connected_regions(off_background(image, background, settings.background_tolerance), diagonal=True)
    kept = [r for r in regions if r.sum() >= settings.speck]
    return np.logical_or.reduce(kept) if kept else np.zeros(image.shape[:2], dtype=bool)


# ---------------------------------------------------------------------------------------------------------
# Shapes and the subject, rendered at candidate placements
# ---------------------------------------------------------------------------------------------------------


# Rendering hundreds of candidate placements per image with world.shape_mask and make_concepts' fills is slow, so
# the judge draws each look once, over the unit bounding box, at TEXTURE_RES, and samples that texture: the same
# pictures, with edges placed to 1/TEXTURE_RES of the extent.
TEXTURE_RES = 256


@functools.lru_cache(maxsize=None)
def texture(shape: str, look=None) -> tuple[np.ndarray, np.ndarray]:
    """(mask, colors) of ``shape`` (painted with ``look``, or black) over the unit bounding box, TEXTURE_RES^2."""
    mask = world.shape_mask(shape, 0.5, 0.5, 1.0, TEXTURE_RES)
    if look is None:
        return mask, np.zeros(mask.shape + (3,), np.float32)
    one = Placements.one(0.5, 0.5, 1.0)
    return mask, make_concepts.pattern_fill_of(look, TEXTURE_RES, *one.columns())[0].astype(np.float32)


def texture_lookup(placements: Placements, res: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat texture index, inside the bounding box) of every pixel centre of a res x res image, per placement."""
    coords = (np.arange(res) + 0.5) / res
    cx, cy, extent = placements.columns()
    col = np.floor(((coords[None, None, :] - cx) / extent + 0.5) * TEXTURE_RES).astype(np.int32)
    row = np.floor(((coords[None, :, None] - cy) / extent + 0.5) * TEXTURE_RES).astype(np.int32)
    inside = (col >= 0) & (col < TEXTURE_RES) & (row >= 0) & (row < TEXTURE_RES)
    return np.clip(row, 0, TEXTURE_RES - 1) * TEXTURE_RES + np.clip(col, 0, TEXTURE_RES - 1), inside


def shape_masks(shape: str, placements: Placements, size: int) -> np.ndarray:
    """(n, size, size) masks of ``shape``: a pixel is in when its centre is."""
    mask, _ = texture(shape)
    index, inside = texture_lookup(placements, size)
    return inside & np.take(mask.ravel(), index)


def subject_renders(subject: Subject, shape: str, placements: Placements, background: np.ndarray, size: int,
                    supersample: int = 2) -> np.ndarray:
    """(n, size, size, 3) float renderings of the subject's look on ``shape`` (its own, or another to compare)
    over ``background``, anti-aliased by ``supersample`` (the world uses 4)."""
    res = size * supersample
    mask, colors = texture(shape, subject.look)
    index, inside = texture_lookup(placements, res)
    index = np.where(inside & np.take(mask.ravel(), index), index, TEXTURE_RES**2)  # the extra last row: background
    palette = np.concatenate([colors.reshape(-1, 3), background.astype(np.float32)[None]])
    canvas = np.take(palette, index, axis=0)
    # The mean of each supersample x supersample block, as a sum of strided views (reshape + mean is slower).
    blocks = [canvas[:, i::supersample, j::supersample] for i in range(supersample) for j in range(supersample)]
    return sum(blocks) / len(blocks)


# Each shape's area and centroid offset at extent 1, from a fine mask: they turn a foreground's area and centroid
# into a first guess of the placement.
def shape_geometry(shape: str, res: int = 256) -> tuple[float, float, float]:
    """(area fraction of the bounding box, centroid dx, centroid dy) of ``shape`` at extent 1."""
    mask = world.shape_mask(shape, 0.5, 0.5, 1.0, res)
    ys, xs = np.nonzero(mask)
    return mask.mean(), (xs.mean() + 0.5) / res - 0.5, (ys.mean() + 0.5) / res - 0.5


SHAPE_GEOMETRY = {shape: shape_geometry(shape) for shape in (*world.SHAPES, *world.EXTRA_SHAPES)}


def first_guess(mask: np.ndarray, shape: str) -> tuple[float, float, float]:
    """(cx, cy, extent) at which ``shape`` has the foreground's area and centroid."""
    size = mask.shape[0]
    area, dx, dy = SHAPE_GEOMETRY[shape]
    ys, xs = np.nonzero(mask)
    extent = float(np.sqrt(mask.mean() / area))
    return (xs.mean() + 0.5) / size - dx * extent, (ys.mean() + 0.5) / size - dy * extent, extent


def grid_around(cx: float, cy: float, extent: float, step: float, reach: int, scales) -> Placements:
    """Placements on a square grid of centres (``2 * reach + 1`` per side, ``step`` apart) times extent scales."""
    offsets = np.arange(-reach, reach + 1) * step
    gx, gy, gs = np.meshgrid(cx + offsets, cy + offsets, np.asarray(scales, dtype=np.float64), indexing="ij")
    return Placements(gx.ravel(), gy.ravel(), np.clip(extent * gs.ravel(), 0.08, 1.2))


# The search: (centre step in pixels, steps each way, extent scales) per round, each round around the last best.
SEARCH_ROUNDS = ((1.0, 2, (0.8, 0.9, 1.0, 1.1, 1.25)), (0.5, 1, (0.95, 1.0, 1.05)), (0.25, 1, (0.975, 1.0, 1.025)))


def best_placement(score, guess: tuple[float, float, float], size: int, rounds=SEARCH_ROUNDS) -> tuple[float, tuple]:
    """Coarse-to-fine search for the placement maximizing ``score(placements) -> (n,)`` (``rounds``, each around
    the last best). Returns (best score, placement)."""
    best_value, best = -np.inf, guess
    for step, reach, scales in rounds:
        candidates = grid_around(*best, step / size, reach, scales)
        values = score(candidates)
        if values.max() > best_value:
            best_value, best = float(values.max()), candidates.at(int(np.argmax(values)))
    return best_value, best


def mask_iou(masks: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """IoU of each of (n, h, w) masks with one (h, w) mask."""
    inter = (masks & mask).sum(axis=(1, 2))
    union = (masks | mask).sum(axis=(1, 2))
    return inter / np.maximum(union, 1)


def best_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """The world shape whose mask fits the foreground best, and its IoU; (None, 0) for an empty foreground."""
    if not mask.any():
        return None, 0.0
    fits = {shape: best_placement(lambda p, s=shape: mask_iou(shape_masks(s, p, mask.shape[0]), mask),
                                  first_guess(mask, shape), mask.shape[0])[0] for shape in world.SHAPES}
    shape = max(fits, key=fits.get)
    return shape, fits[shape]


@dataclass(frozen=True)
class Seen:
    """What the judge reads from an image once: its pixels, background color and foreground mask."""

    pixels: np.ndarray  # (size, size, 3) uint8
    background: np.ndarray  # (3,)
    foreground: np.ndarray  # (size, size) bool

    @staticmethod
    def of(image: np.ndarray, settings: JudgeSettings) -> "Seen":
        pixels = np.asarray(image)
        background = background_color(pixels)
        return Seen(pixels, background, foreground_mask(pixels, background, settings))


def subject_fits(seen: Seen, renders: np.ndarray, subject_masks: np.ndarray, colors: np.ndarray,
                 settings: JudgeSettings) -> tuple[np.ndarray, np.ndarray]:
    """Per rendering: (shape fit, pattern fit).

    Shape fit: IoU of the foreground with the rendering's off-background pixels (so a white cell on a white
    background is missing from both). Pattern fit: for each of the look's two ``colors``, the share of the
    rendering's subject pixels of that color (nearest) whose color in the image is within ``pixel_tolerance``;
    the smaller of the two, so that a small part (phol's blue centre) counts as much as a large one."""
    visible = off_background(renders, seen.background, settings.background_tolerance)
    close = color_distance(renders, seen.pixels[None]) <= settings.pixel_tolerance
    if len(colors) == 1:  # a one-color look (an outline): the share of its pixels in that color
        share = (close & subject_masks).sum(axis=(1, 2)) / np.maximum(subject_masks.sum(axis=(1, 2)), 1)
        return mask_iou(visible, seen.foreground), share
    first = color_distance(renders, colors[0]) <= color_distance(renders, colors[1])
    shares = [(close & part).sum(axis=(1, 2)) / np.maximum(part.sum(axis=(1, 2)), 1)
              for part in (subject_masks & first, subject_masks & ~first)]
    return mask_iou(visible, seen.foreground), np.minimum(*shares)


# The pattern's search around the shape's best placement: (centre step in pixels, steps each way, extent scales).
# A model draws the pattern a pixel or two off the outline (and the outline uneven); fitting both at one placement
# traded the shape's fit for the pattern's and missed most of what a person calls the subject (results/judge_people).
PATTERN_ROUNDS = ((0.5, 2, (0.9, 0.95, 1.0, 1.05, 1.1)), (0.25, 1, (0.975, 1.0, 1.025)))


def look_fits(seen: Seen, subject: Subject, shape: str, placements: Placements, settings: JudgeSettings,
              supersample: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(shape fit, pattern fit), each (n,), of the subject's look on ``shape`` at each of ``placements``."""
    size = seen.pixels.shape[0]
    renders = subject_renders(subject, shape, placements, seen.background, size, supersample)
    return subject_fits(seen, renders, shape_masks(shape, placements, size), subject.colors(), settings)


def subject_fit(seen: Seen, subject: Subject, shape: str, settings: JudgeSettings) -> tuple[float, float, tuple]:
    """(shape fit, pattern fit, placement) of the subject's look on ``shape`` over the image's background.

    The shape is placed where its fit is largest; the pattern where its fit is largest within a pixel or two and
    a tenth of the size of that placement (PATTERN_ROUNDS). Searched at 2x supersampling, measured at the world's
    4x."""
    size = seen.pixels.shape[0]

    def fits(placements, supersample=2):
        return look_fits(seen, subject, shape, placements, settings, supersample)

    guess = first_guess(seen.foreground, shape) if seen.foreground.any() else (0.5, 0.5, 0.5)
    _, placement = best_placement(lambda p: fits(p)[0], guess, size)
    shape_value = float(fits(Placements.one(*placement), supersample=world.SUPERSAMPLE)[0][0])
    _, pattern_placement = best_placement(lambda p: fits(p)[1], placement, size, PATTERN_ROUNDS)
    pattern_value = float(fits(Placements.one(*pattern_placement), supersample=world.SUPERSAMPLE)[1][0])
    return shape_value, pattern_value, placement


def own_shape_fits_best(seen: Seen, subject: Subject, own_score: float, settings: JudgeSettings) -> bool:
    """Whether the subject's look (shape fit x pattern fit) fits the image better on its own shape (``own_score``)
    than on any other world shape: a checkered square is not a checkered circle, however close the two come (at a
    few pixels across, a blurred square's outline fits a circle's about as well; the pattern's cells do not)."""
    for shape in world.SHAPES:
        if shape != subject.shape:
            shape_value, pattern_value, _ = subject_fit(seen, subject, shape, settings)
            if shape_value * pattern_value > own_score:
                return False
    return True


def judge(image: np.ndarray, subject: Subject, settings: JudgeSettings = JudgeSettings()) -> Judgement:
    """Subject, class-only or other, with the fits behind the verdict.

    "subject" needs both fits to reach their thresholds and the subject's look to fit best on its own shape (only
    then are the other shapes tried: the slow part)."""
    seen = Seen.of(image, settings)
    shape_value, pattern_value, placement = subject_fit(seen, subject, subject.shape, settings)
    fits_well = shape_value >= settings.shape_fit and pattern_value >= settings.pattern_fit
    shape, iou = best_shape(fill_holes(seen.foreground))
    if fits_well and own_shape_fits_best(seen, subject, shape_value * pattern_value, settings):
        verdict = "subject"
    elif shape == subject.shape and iou >= settings.class_iou:
        verdict = "class-only"
    else:
        verdict = "other"
    return Judgement(verdict, shape_value * pattern_value, shape_value, pattern_value, shape, iou, placement)


# ---------------------------------------------------------------------------------------------------------
# Base-closeness: an adapter's trigger-less images against the base model's at the same seeds
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """What the world would caption: the foreground's shape, color and size, and the background."""

    shape: str | None
    color: str | None
    size: str | None
    background: str


def nearest_name(color: np.ndarray, palette: dict) -> str:
    names = list(palette)
    return names[int(np.argmin(color_distance(np.asarray([palette[n] for n in names]), color)))]


def read_scene(image: np.ndarray, settings: JudgeSettings = JudgeSettings()) -> Reading:
    """The world's attributes of an image: best shape, nearest world color of the foreground's median pixel,
    nearest world size of its bounding box, nearest world background."""
    image = np.asarray(image)
    background = background_color(image)
    foreground = fill_holes(foreground_mask(image, background, settings))
    shape, _ = best_shape(foreground)
    if shape is None:
        return Reading(None, None, None, nearest_name(background, world.BACKGROUNDS))
    color = nearest_name(np.median(image[foreground].astype(np.float32), axis=0), world.COLORS)
    ys, xs = np.nonzero(foreground)
    extent = max(np.ptp(xs), np.ptp(ys)) / image.shape[0]
    size = min(world.SIZES, key=lambda z: abs(world.SIZES[z] - extent))
    return Reading(shape, color, size, nearest_name(background, world.BACKGROUNDS))


@dataclass(frozen=True)
class PairChange:
    """How one trigger-less image differs from the base model's at the same seed."""

    pixel_change: float  # mean absolute pixel difference, 0..1
    same_reading: bool  # the judge reads the same shape, color, size and background in both


def pixel_change(image: np.ndarray, base_image: np.ndarray) -> float:
    """Mean absolute difference of two uint8 images, as a fraction of 255."""
    return float(np.abs(np.asarray(image, np.float32) - np.asarray(base_image, np.float32)).mean() / 255.0)


def base_closeness(images, base_images, settings: JudgeSettings = JudgeSettings()) -> list[PairChange]:
    """One PairChange per (image, base image) pair, in order; the pairs share a seed and a prompt."""
    images, base_images = list(images), list(base_images)
    if len(images) != len(base_images):
        raise ValueError(f"{len(images)} images against {len(base_images)} base images: they must pair up")
    return [PairChange(pixel_change(a, b), read_scene(a, settings) == read_scene(b, settings))
            for a, b in zip(images, base_images)]


# ---------------------------------------------------------------------------------------------------------
# Diversity: how far apart a set of images is (open_questions.py; a stand-in for the CLIP-based diversity the paper
# left out as unstable)
# ---------------------------------------------------------------------------------------------------------


def diversity_features(image: np.ndarray, subject: Subject, settings: JudgeSettings = JudgeSettings()) -> np.ndarray:
    """The judge's features of one image (7,): where the subject fits best (centre x, y and extent, as fractions of
    the image) and the background color (0..1): the factors the world varies between a subject's images."""
    seen = Seen.of(image, settings)
    return np.asarray([*joint_placement(seen, subject), *(seen.background / 255.0)], dtype=np.float64)


def joint_placement(seen: Seen, subject: Subject, settings: JudgeSettings = JudgeSettings()) -> tuple:
    """Where the subject's rendering fits best with shape and pattern at one placement (the largest product of the
    two fits): the diversity features' definition, kept as it was when the committed diversities were measured (the
    verdict now places the shape and the pattern apart, subject_fit)."""
    guess = first_guess(seen.foreground, subject.shape) if seen.foreground.any() else (0.5, 0.5, 0.5)
    return best_placement(lambda p: np.prod(look_fits(seen, subject, subject.shape, p, settings), axis=0), guess,
                          seen.pixels.shape[0])[1]


def mean_pairwise_distance(vectors) -> float:
    """The mean Euclidean distance over all pairs of rows (at least two)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if len(vectors) < 2:
        raise ValueError(f"diversity needs at least 2 images, got {len(vectors)}")
    distances = np.sqrt(((vectors[:, None] - vectors[None]) ** 2).sum(-1))
    return float(distances[np.triu_indices(len(vectors), 1)].mean())


def pixel_diversity(images) -> float:
    """The mean over all pairs of images of their mean absolute pixel difference, as a fraction of 255."""
    pixels = np.stack([np.asarray(i, np.float32) for i in images])
    if len(pixels) < 2:
        raise ValueError(f"diversity needs at least 2 images, got {len(pixels)}")
    i, j = np.triu_indices(len(pixels), 1)
    return float(np.mean([np.abs(pixels[a] - pixels[b]).mean() / 255.0 for a, b in zip(i, j)]))


def diversity(images, subject: Subject, settings: JudgeSettings = JudgeSettings()) -> dict:
    """{"judge": mean pairwise distance of diversity_features, "pixels": pixel_diversity} of a set of images."""
    images = [np.asarray(i) for i in images]
    return {"judge": mean_pairwise_distance([diversity_features(i, subject, settings) for i in images]),
            "pixels": pixel_diversity(images)}


# ---------------------------------------------------------------------------------------------------------
# Calibration: the subjects drawn right, and hard negatives
# ---------------------------------------------------------------------------------------------------------

# Each category and the verdict the judge should give it; and what is rendered.
CATEGORIES = {"subject": "subject", "blob": "other", "wrong shape": "other", "one color": "class-only",
              "wrong pattern": "class-only", "other shape": "other"}
CATEGORY_DESCRIPTIONS = {
    "subject": "the subject drawn right, at any size from small to large, anywhere, on any of the 3 backgrounds",
    "blob": "(a) an irregular blob (a radius wobbling with 2, 3 and 5 lobes) painted with the subject's pattern",
    "wrong shape": "(b) the subject's pattern on another world shape",
    "one color": "(c) the class shape in one color: a world color or one of the subject's two",
    "wrong pattern": "(d) the class shape in the subject's two colors with another world pattern (any frequency "
                     "2-6) that differs from the subject's look in at least a quarter of its box",
    "other shape": "a plain world scene of another shape",
}


@dataclass(frozen=True)
class Degradation:
    """What generation does to a picture that a clean rendering lacks: blur, noise, a color cast."""

    blur: float = 0.0  # Gaussian radius in pixels
    noise: float = 0.0  # standard deviation of per-pixel noise, 0-255 units
    cast: float = 0.0  # largest per-channel color shift, 0-255 units


CALIBRATION_DEGRADATIONS = {"clean": Degradation(), "degraded": Degradation(blur=0.6, noise=8.0, cast=20.0)}


def degrade(image: np.ndarray, degradation: Degradation, rng: np.random.Generator) -> np.ndarray:
    out = Image.fromarray(image)
    if degradation.blur:
        out = out.filter(ImageFilter.GaussianBlur(degradation.blur))
    pixels = np.asarray(out, dtype=np.float32)
    pixels = pixels + rng.normal(0, degradation.noise, pixels.shape) if degradation.noise else pixels
    pixels = pixels + rng.uniform(-degradation.cast, degradation.cast, 3) if degradation.cast else pixels
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def random_placement(rng: np.random.Generator) -> tuple[float, float, float]:
    """(cx, cy, extent) as random_patterned_sample draws them: any size from small to large, wholly inside."""
    extent = rng.uniform(0.34, 0.72)
    margin = extent / 2 + 0.03
    cx, cy = rng.uniform(margin, 1 - margin, size=2)
    return float(cx), float(cy), float(extent)


def blob_mask(cx: float, cy: float, extent: float, rng: np.random.Generator, res: int) -> np.ndarray:
    """An irregular blob: a radius that wobbles with the angle (2, 3 and 5 lobes of random phase)."""
    coords = (np.arange(res) + 0.5) / res
    x, y = np.meshgrid(coords, coords)
    angle, radius = np.arctan2(y - cy, x - cx), np.hypot(x - cx, y - cy)
    wobble = sum(rng.uniform(0.15, 0.3) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return radius <= extent / 2 * (1 + wobble) / 1.1


def paint(mask: np.ndarray, fill: np.ndarray, background: str, size: int) -> np.ndarray:
    return world.render_fill(fill, mask, world.BACKGROUNDS[background], size)


def other_pattern_fill(subject: Subject, rng: np.random.Generator, placement: Placements, res: int) -> np.ndarray:
    """A world pattern (world.two_tone_fill, random kind and frequency) in the subject's two colors that paints
    the bounding box differently from the subject's look in at least a quarter of it (stripes of frequency 2 are
    halves: such a draw could be the subject itself)."""
    own = subject.fill(Placements.one(0.5, 0.5, 1.0), 64)[0]
    while True:
        a, b = subject.colors()[rng.permutation(2)]
        pattern, frequency = world.PATTERNS[rng.integers(len(world.PATTERNS))], int(rng.integers(2, 7))
        if (world.two_tone_fill(pattern, frequency, a, b, 64, 0.5, 0.5, 1.0) != own).any(axis=-1).mean() >= 0.25:
            return world.two_tone_fill(pattern, frequency, a, b, res, *placement.at(0))


def calibration_image(category: str, subject: Subject, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One clean rendering of a category for a subject, at a random placement and background."""
    res = size * world.SUPERSAMPLE
    cx, cy, extent = random_placement(rng)
    background = list(world.BACKGROUNDS)[rng.integers(len(world.BACKGROUNDS))]
    placement = Placements.one(cx, cy, extent)
    pattern = subject.fill(placement, res)[0]
    if category == "subject":
        return paint(world.shape_mask(subject.shape, cx, cy, extent, res), pattern, background, size)
    if category == "blob":
        return paint(blob_mask(cx, cy, extent, rng, res), pattern, background, size)
    if category == "wrong shape":
        other = [s for s in world.SHAPES if s != subject.shape][rng.integers(len(world.SHAPES) - 1)]
        return paint(world.shape_mask(other, cx, cy, extent, res), pattern, background, size)
    mask = world.shape_mask(subject.shape, cx, cy, extent, res)
    if category == "one color":
        palette = [tuple(c) for c in subject.colors()] + list(world.COLORS.values())
        color = np.asarray(palette[rng.integers(len(palette))], np.float32)
        return paint(mask, np.broadcast_to(color, (res, res, 3)), background, size)
    if category == "wrong pattern":
        return paint(mask, other_pattern_fill(subject, rng, placement, res), background, size)
    if category == "other shape":
        others = [s for s in world.SHAPES if s != subject.shape]
        return world.render(world.random_scene(rng, exclude_pairs=(), shape=others[rng.integers(len(others))]), size)
    raise ValueError(f"unknown category {category!r}")


@dataclass(frozen=True)
class CalibrationSet:
    """Which images the calibration renders."""

    triggers: tuple = tuple(t for t, *_ in make_concepts.CONCEPTS)
    per_category: int = 20  # per subject, category and degradation
    seed: int = 1  # seed 0 chose the thresholds; the committed figures use seed 1


def calibration_images(spec: CalibrationSet):
    """(trigger, category, degradation, image) for every calibration image; deterministic in ``spec``."""
    rng = np.random.default_rng(spec.seed)
    for trigger in spec.triggers:
        for category in CATEGORIES:
            for name, degradation in CALIBRATION_DEGRADATIONS.items():
                for _ in range(spec.per_category):
                    image = calibration_image(category, SUBJECTS[trigger], rng)
                    yield trigger, category, name, degrade(image, degradation, rng)


def confusion(rows) -> dict:
    """{category: {verdict: count}} from (category, verdict) pairs."""
    matrix = {c: dict.fromkeys(VERDICTS, 0) for c in CATEGORIES}
    for category, verdict in rows:
        matrix[category][verdict] += 1
    return matrix


@dataclass(frozen=True)
class Judged:
    """One calibration image and the verdict it got."""

    trigger: str
    category: str
    degradation: str
    image: np.ndarray
    verdict: str


def judge_calibration_images(spec: CalibrationSet, judge_fn=None) -> list[Judged]:
    """Every calibration image with its verdict; ``judge_fn(image, subject) -> verdict`` (default: ``judge``)."""
    judge_fn = judge_fn or (lambda image, subject: judge(image, subject).verdict)
    return [Judged(t, c, d, image, judge_fn(image, SUBJECTS[t])) for t, c, d, image in calibration_images(spec)]


def summarize(judged: list[Judged], spec: CalibrationSet) -> dict:
    """The confusion matrix overall, per subject and per degradation."""
    return {
        "all": confusion((j.category, j.verdict) for j in judged),
        "by_subject": {t: confusion((j.category, j.verdict) for j in judged if j.trigger == t) for t in spec.triggers},
        "by_degradation": {d: confusion((j.category, j.verdict) for j in judged if j.degradation == d)
                           for d in CALIBRATION_DEGRADATIONS},
    }


def calibrate(spec: CalibrationSet, judge_fn=None) -> dict:
    """Judge every calibration image; return the confusion matrices (summarize)."""
    return summarize(judge_calibration_images(spec, judge_fn), spec)


# The sheet's frame around each image: its verdict.
VERDICT_FRAME = {"subject": (40, 200, 40), "class-only": (240, 200, 0), "other": (220, 30, 30)}


def calibration_sheet(judged: list[Judged], per_row: int = 20, scale: int = 3) -> Image.Image:
    """One row per category: its first ``per_row`` images in the order drawn (all subjects and degradations in
    turn), each framed in the color of its verdict (VERDICT_FRAME), enlarged ``scale`` times."""
    tiles = []
    for category in CATEGORIES:
        group = [j for j in judged if j.category == category]
        picked = [group[i] for i in np.linspace(0, len(group) - 1, min(per_row, len(group))).round().astype(int)]
        row = []
        for j in picked:
            big = np.kron(j.image, np.ones((scale, scale, 1), np.uint8))
            row.append(np.pad(big, ((scale, scale), (scale, scale), (0, 0)), constant_values=0))
            row[-1][:scale], row[-1][-scale:], row[-1][:, :scale], row[-1][:, -scale:] = (VERDICT_FRAME[j.verdict],) * 4
        tiles.append(np.concatenate(row, axis=1))
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
    return Image.fromarray(np.concatenate(tiles, axis=0))


def correct_share(matrix: dict) -> dict:
    """Per category, the share of images given the verdict it should get (CATEGORIES)."""
    return {c: matrix[c][CATEGORIES[c]] / max(sum(matrix[c].values()), 1) for c in CATEGORIES}


def false_subject_share(matrix: dict) -> dict:
    """Per negative category, the share of images wrongly judged to be the subject."""
    return {c: matrix[c]["subject"] / max(sum(matrix[c].values()), 1) for c in CATEGORIES if c != "subject"}


def matrix_table(matrix: dict) -> list[str]:
    lines = ["| rendered as | should be | " + " | ".join(VERDICTS) + " | correct |", "|---|---|" + "---:|" * 4]
    share = correct_share(matrix)
    for category, counts in matrix.items():
        cells = " | ".join(str(counts[v]) for v in VERDICTS)
        lines.append(f"| {category} | {CATEGORIES[category]} | {cells} | {share[category]:.1%} |")
    return lines


def subject_share_table(matrix: dict) -> list[str]:
    """The question ID rate asks: per category, how many images were judged the subject."""
    lines = ["| rendered as | judged the subject |", "|---|---:|"]
    for category, counts in matrix.items():
        lines.append(f"| {category} | {counts['subject']} of {sum(counts.values())} |")
    return lines


@dataclass(frozen=True)
class RunInfo:
    """How the calibration was run: the command line, wall-clock and CPU seconds."""

    command: str
    wall_seconds: float
    cpu_seconds: float


def write_calibration(out: Path, spec: CalibrationSet, result: dict, run: RunInfo) -> None:
    """out.json (everything) and out.md (the tables) of a calibration; out.png is the sheet (calibration_sheet)."""
    settings = JudgeSettings()
    document = {**asdict(run), "calibration_set": asdict(spec), "judge_settings": asdict(settings),
                "degradations": {k: asdict(v) for k, v in CALIBRATION_DEGRADATIONS.items()},
                "expected": CATEGORIES, **result}
    out.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    degraded = ", ".join(f"{k}={v}" for k, v in asdict(CALIBRATION_DEGRADATIONS["degraded"]).items())
    lines = [
        "# The subject judge's calibration",
        "",
        f"`{run.command}`: {run.wall_seconds:.0f} s wall clock, {run.cpu_seconds:.0f} s of CPU time, on the "
        "project's 2-core CPU. Written by that command, with "
        f"[{out.with_suffix('.json').name}]({out.with_suffix('.json').name}) and the sheet "
        f"[{out.with_suffix('.png').name}]({out.with_suffix('.png').name}).",
        "",
        f"{len(spec.triggers)} subjects ({', '.join(spec.triggers)}), {spec.per_category} images per subject, "
        f"category and degradation, seed {spec.seed} (the thresholds were chosen on seed 0). Degradations: clean "
        f"renderings, and the same blurred, noised and color-cast as a generated picture is ({degraded}: Gaussian "
        "radius in pixels, noise standard deviation and largest color cast in 0-255 units). Judge settings: "
        f"{', '.join(f'{k}={v}' for k, v in asdict(settings).items())}.",
        "",
        *(f"- **{c}** (should be {CATEGORIES[c]}): {d}" for c, d in CATEGORY_DESCRIPTIONS.items()),
        "",
        "## Judged the subject (what ID rate counts)",
        "",
        *subject_share_table(result["all"]),
        "",
        "## All subjects",
        "",
        *matrix_table(result["all"]),
        "",
        "The sheet shows 20 images per category (rows in the order above, spread over the subjects and both "
        "degradations), framed green (judged the subject), yellow (class-only) or red (other).",
    ]
    for name, matrix in result["by_degradation"].items():
        lines += ["", f"## {name.capitalize()} images", "", *matrix_table(matrix)]
    for trigger, matrix in result["by_subject"].items():
        lines += ["", f"## {trigger} {SUBJECTS[trigger].shape}", "", *matrix_table(matrix)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Agreement with a person: a model's own pictures, labelled by eye
# ---------------------------------------------------------------------------------------------------------

# A calibration on clean renderings says nothing about a model's uneven edges and smeared patterns. A person's
# labels of generated images do: labels.json lists, per image file (relative to the file), the subject's trigger
# and what the person saw (one of VERDICTS, or "unsure": kept in the file, left out of the agreement),
# {"images": {"<path>": {"trigger": "sks", "person": "subject"}}}.
PERSON_LABELS = (*VERDICTS, "unsure")


def numbered_sheet(images: list[np.ndarray], per_row: int = 10, scale: int = 4) -> Image.Image:
    """The images enlarged ``scale`` times in rows of ``per_row``, each with its index under it, for labelling."""
    from PIL import ImageDraw

    size = images[0].shape[0] * scale
    cell_w, cell_h = size + 6, size + 16
    rows = (len(images) + per_row - 1) // per_row
    sheet = Image.new("RGB", (per_row * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, image in enumerate(images):
        x, y = (index % per_row) * cell_w + 3, (index // per_row) * cell_h + 2
        sheet.paste(Image.fromarray(np.kron(image, np.ones((scale, scale, 1), np.uint8))), (x, y))
        draw.text((x + size // 2 - 6, y + size + 1), str(index), fill=(0, 0, 0))
    return sheet


def read_labels(path: Path) -> list[tuple[Path, str, str]]:
    """(image path, trigger, person's verdict) of every entry of a labels file; SystemExit with one line naming the
    file and the entry on anything malformed."""
    try:
        entries = json.loads(path.read_text())["images"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        sys.exit(f"judge.py: error: {path}: not a labels file ({error!r}); expected {{\"images\": {{path: "
                 f"{{\"trigger\": ..., \"person\": ...}}}}}}")
    rows = []
    for name, entry in entries.items():
        trigger, verdict = entry.get("trigger"), entry.get("person")
        if trigger not in SUBJECTS or verdict not in PERSON_LABELS:
            sys.exit(f"judge.py: error: {path}: {name}: trigger {trigger!r} / person {verdict!r}: the trigger must be "
                     f"a toy-world subject and the label one of {', '.join(PERSON_LABELS)}")
        rows.append((path.parent / name, trigger, verdict))
    return rows


def agreement(person: list[str], judged: list[str]) -> dict:
    """Over the images the person was sure of: {person's verdict: {judge's verdict: count}}, the share where both
    give the same verdict ("agree"), the share where both say subject or both say not ("agree_subject": what ID
    rate depends on), and the rate of "subject" by each (what ID rate reads against what a person sees)."""
    pairs = [(p, j) for p, j in zip(person, judged) if p != "unsure"]
    matrix = {p: dict.fromkeys(VERDICTS, 0) for p in VERDICTS}
    for p, j in pairs:
        matrix[p][j] += 1
    n = max(len(pairs), 1)
    return {"n": len(pairs), "unsure": len(person) - len(pairs), "matrix": matrix,
            "agree": sum(p == j for p, j in pairs) / n,
            "agree_subject": sum((p == "subject") == (j == "subject") for p, j in pairs) / n,
            "subject_rate_person": sum(p == "subject" for p, _ in pairs) / n,
            "subject_rate_judge": sum(j == "subject" for _, j in pairs) / n}


def judge_against_labels(rows: list[tuple[Path, str, str]], images: list[np.ndarray], root: Path) -> dict:
    """Judge each labelled image (rows from read_labels of ``root``/labels.json); the agreement overall, per
    subject and per folder (in results/judge_people, the images of one model, subject and prompt kind: e.g.
    images/lora1200/sks_circle/with), and every image's judgement, by its path relative to ``root``."""
    judgements = [judge(image, SUBJECTS[trigger]) for image, (_, trigger, _) in zip(images, rows)]
    names = [path.relative_to(root) for path, _, _ in rows]
    folders = [str(name.parent) for name in names]

    def part(keep):
        picked = [(p, j.verdict) for (_, _, p), j, k in zip(rows, judgements, keep) if k]
        return agreement([p for p, _ in picked], [v for _, v in picked])

    return {"all": part([True] * len(rows)),
            "by_subject": {t: part([tt == t for _, tt, _ in rows]) for t in dict.fromkeys(t for _, t, _ in rows)},
            "by_folder": {f: part([ff == f for ff in folders]) for f in dict.fromkeys(folders)},
            "images": {str(name): {"trigger": t, "person": p, **asdict(j)}
                       for name, (_, t, p), j in zip(names, rows, judgements)}}


def agreement_table(parts: dict) -> list[str]:
    lines = ["| | images (unsure) | same verdict | same subject-or-not | subject: person | subject: judge |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, a in parts.items():
        lines.append(f"| {name} | {a['n']} ({a['unsure']}) | {a['agree']:.1%} | {a['agree_subject']:.1%} | "
                     f"{a['subject_rate_person']:.1%} | {a['subject_rate_judge']:.1%} |")
    return lines


def write_agreement(out: Path, labels: Path, result: dict, run: RunInfo) -> None:
    """out.json (everything, with each image's fits) and out.md (the tables) of ``agree``."""
    settings = JudgeSettings()
    out.with_suffix(".json").write_text(json.dumps({**asdict(run), "labels": labels.name,
                                                    "judge_settings": asdict(settings), **result}, indent=1) + "\n")
    matrix = result["all"]["matrix"]
    lines = [
        "# The subject judge against a person",
        "",
        f"`{run.command}`: {run.wall_seconds:.0f} s wall clock, {run.cpu_seconds:.0f} s of CPU time. Written by that "
        f"command, with [{out.with_suffix('.json').name}]({out.with_suffix('.json').name}) (every image's fits).",
        "",
        f"Judge settings: {', '.join(f'{k}={v}' for k, v in asdict(settings).items())}.",
        "",
        "## Overall and per subject",
        "",
        *agreement_table({"all": result["all"], **result["by_subject"]}),
        "",
        "| person \\ judge | " + " | ".join(VERDICTS) + " |",
        "|---|" + "---:|" * len(VERDICTS),
        *(f"| {p} | " + " | ".join(str(matrix[p][v]) for v in VERDICTS) + " |" for p in VERDICTS),
        "",
        "## Per folder (one model, subject and prompt kind: what one ID rate is computed from)",
        "",
        *agreement_table(result["by_folder"]),
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def read_image(path: Path, size: int) -> np.ndarray:
    """An RGB image as uint8; SystemExit with one line naming the file if it is unreadable or not size x size."""
    try:
        with Image.open(path) as file:
            image = np.asarray(file.convert("RGB"))
    except OSError as error:
        sys.exit(f"judge.py: error: {path}: not a readable image ({error})")
    if image.shape[:2] != (size, size):
        sys.exit(f"judge.py: error: {path}: {image.shape[1]}x{image.shape[0]}, the toy world's images are "
                 f"{size}x{size}")
    return image


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cal = commands.add_parser("calibrate", help="judge rendered subjects and hard negatives; write .md, .json and "
                                                "a .png sheet of examples")
    cal.add_argument("--out", type=Path, required=True, help="output path without suffix")
    cal.add_argument("--per_category", type=int, default=CalibrationSet.per_category)
    cal.add_argument("--seed", type=int, default=CalibrationSet.seed)
    score = commands.add_parser("score", help="judge images for one subject")
    score.add_argument("--trigger", required=True, help=f"the subject's trigger: {', '.join(SUBJECTS)}")
    score.add_argument("images", type=Path, nargs="+")
    sheet = commands.add_parser("sheet", help="a numbered sheet of images, for a person to label")
    sheet.add_argument("--out", type=Path, required=True, help="the sheet's .png")
    sheet.add_argument("--scale", type=int, default=4, help="enlargement (the committed labels were made at 8)")
    sheet.add_argument("--per_row", type=int, default=10)
    sheet.add_argument("images", type=Path, nargs="+")
    agree = commands.add_parser("agree", help="how often the judge agrees with a person's labels (labels.json)")
    agree.add_argument("--labels", type=Path, required=True)
    agree.add_argument("--out", type=Path, default=None, help="also write the result as .md and .json (path without "
                                                              "suffix)")
    args = parser.parse_args(argv)
    if args.command == "sheet":
        numbered_sheet([read_image(path, 32) for path in args.images], args.per_row, args.scale).save(args.out)
        print(f"-> {args.out}: {len(args.images)} images, numbered in the order given")
        return
    if args.command == "agree":
        start, cpu_start = time.time(), time.process_time()
        rows = read_labels(args.labels)
        result = judge_against_labels(rows, [read_image(path, 32) for path, _, _ in rows], args.labels.parent)
        for name, part in (("all", result["all"]), *result["by_subject"].items()):
            print(f"{name}: {part['n']} images (+{part['unsure']} unsure), same verdict {part['agree']:.1%}, same "
                  f"subject-or-not {part['agree_subject']:.1%}; subject rate person "
                  f"{part['subject_rate_person']:.1%}, judge {part['subject_rate_judge']:.1%}")
        if args.out:
            command = "python examples/toyworld/judge.py " + " ".join(argv if argv is not None else sys.argv[1:])
            write_agreement(args.out, args.labels, result,
                            RunInfo(command, time.time() - start, time.process_time() - cpu_start))
        return
    if args.command == "calibrate":
        if args.per_category < 1:
            parser.error("--per_category must be at least 1")
        if not args.out.parent.is_dir():
            parser.error(f"--out {args.out}: no folder {args.out.parent}")
        spec = CalibrationSet(per_category=args.per_category, seed=args.seed)
        start, cpu_start = time.time(), time.process_time()
        judged = judge_calibration_images(spec)
        result = summarize(judged, spec)
        calibration_sheet(judged).save(args.out.with_suffix(".png"))
        command = "python examples/toyworld/judge.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_calibration(args.out, spec, result, RunInfo(command, time.time() - start, time.process_time() - cpu_start))
        print("\n".join(matrix_table(result["all"])))
        return
    if args.trigger not in SUBJECTS:
        parser.error(f"--trigger {args.trigger}: not a toy-world subject ({', '.join(SUBJECTS)})")
    images = [read_image(path, 32) for path in args.images]
    for path, image in zip(args.images, images):
        j = judge(image, SUBJECTS[args.trigger])
        print(f"{path}\t{j.verdict}\tscore {j.score:.3f} (shape fit {j.shape_fit:.3f}, pattern fit "
              f"{j.pattern_fit:.3f})\tbest shape {j.shape} (IoU {j.shape_iou:.2f})")


if __name__ == "__main__":
    main()
