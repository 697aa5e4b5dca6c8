"""The generated shapes scenes: one deterministic generator serves all four tasks.

A scene is rendered from its index alone (no files on disk): a textured background and one or
more shapes of random kind, colour, size, rotation and position. Later shapes are drawn on top,
so each shape's visible mask (and the box around it) accounts for occlusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPE_NAMES", "ShapeInstance", "Scene", "render_scene"]

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")

# vertices of the polygonal kinds on the unit circle, as (angle offset, radius) pairs
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(np.pi / 4 + k * np.pi / 2, 1.0) for k in range(4)],
    "triangle": [(-np.pi / 2 + k * 2 * np.pi / 3, 1.0) for k in range(3)],
    "star": [(-np.pi / 2 + k * np.pi / 5, 1.0 if k % 2 == 0 else 0.45) for k in range(10)],
    "hexagon": [(k * np.pi / 3, 1.0) for k in range(6)],
}


@dataclass
class ShapeInstance:
    """One shape of a scene: its kind, its visible mask and the box around that mask (xyxy, x1/y1 exclusive)."""

    kind: int
    mask: np.ndarray
    box: tuple[float, float, float, float]

    @property
    def area(self) -> int:
        """Visible pixels."""
        return int(self.mask.sum())


@dataclass
class Scene:
    """An image and the shapes in it, back to front."""

    image: np.ndarray
    shapes: list[ShapeInstance] = field(default_factory=list)

    def semantic_mask(self) -> np.ndarray:
        """Per-pixel labels: 0 background, kind + 1 where a shape is visible."""
        out = np.zeros(self.image.shape[:2], dtype=np.int64)
        for s in self.shapes:
            out[s.mask] = s.kind + 1
        return out


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background: smooth colour noise plus faint stripes, never flat."""
    base = rng.uniform(40, 215, size=3)
    coarse = rng.normal(0, 25, size=(4, 4, 3))
    noise = np.array(Image.fromarray(np.uint8(np.clip(coarse + 128, 0, 255))).resize((size, size), Image.BILINEAR),
                     dtype=np.float32) - 128
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 16)
    stripes = 10 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    grain = rng.normal(0, 6, size=(size, size, 3))
    img = base + noise + stripes[..., None] + grain
    return np.clip(img, 0, 255)


def _shape_mask(kind: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """The full (unoccluded) mask of one shape, drawn with 4x supersampling for clean edges."""
    ss = 4
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse([(cx - r) * ss, (cy - r) * ss, (cx + r) * ss, (cy + r) * ss], fill=255)
    else:
        pts = [((cx + rad * r * np.cos(a + angle)) * ss, (cy + rad * r * np.sin(a + angle)) * ss)
               for a, rad in _POLYGONS[kind]]
        draw.polygon(pts, fill=255)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small) >= 128


def _distinct_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A colour far enough from the background's mean that the shape is visible."""
    mean = background.reshape(-1, 3).mean(0)
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - mean).sum() > 150:
            return colour
    return 255 - mean


def render_scene(
    index: int,
    size: int = 128,
    *,
    seed: int = 0,
    min_shapes: int = 1,
    max_shapes: int = 4,
    single: bool = False,
    shape_scale: tuple[float, float] = (0.08, 0.2),
) -> Scene:
    """Render scene ``index`` (deterministic per index, size and seed).

    ``single=True`` gives one shape filling a good part of the image (the classification view);
    otherwise each shape's circumradius is drawn from ``shape_scale`` (fractions of ``size``).
    """
    if size < 16:
        raise ValueError(f"shapes scenes need a size of at least 16 pixels, got {size}")
    if not 0 < shape_scale[0] <= shape_scale[1] <= 0.5:
        raise ValueError(f"shape_scale must satisfy 0 < low <= high <= 0.5 (fractions of the image size), got {shape_scale}")
    if min_shapes < 1 or max_shapes < min_shapes:
        raise ValueError(f"need 1 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}")
    rng = np.random.default_rng([seed, index, 1 if single else 0])
    img = _background(rng, size)
    n = 1 if single else int(rng.integers(min_shapes, max_shapes + 1))
    full_masks: list[np.ndarray] = []
    kinds: list[int] = []
    for _ in range(n):
        kind = int(rng.integers(len(SHAPE_NAMES)))
        if single:
            r = rng.uniform(0.22, 0.4) * size
        else:
            r = rng.uniform(*shape_scale) * size
        cx = rng.uniform(r, size - r)
        cy = rng.uniform(r, size - r)
        mask = _shape_mask(SHAPE_NAMES[kind], size, cx, cy, r, rng.uniform(0, 2 * np.pi))
        colour = _distinct_colour(rng, img)
        shade = rng.normal(0, 8, size=(size, size, 1))  # a little texture on the shape too
        img = np.where(mask[..., None], np.clip(colour + shade, 0, 255), img)
        full_masks.append(mask)
        kinds.append(kind)
    shapes: list[ShapeInstance] = []
    covered = np.zeros((size, size), dtype=bool)
    for kind, mask in reversed(list(zip(kinds, full_masks))):  # front to back: occluders first
        visible = mask & ~covered
        covered |= mask
        if not visible.any():
            continue
        ys, xs = np.nonzero(visible)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        shapes.append(ShapeInstance(kind, visible, box))
    shapes.reverse()
    return Scene(np.uint8(np.round(img)), shapes)
