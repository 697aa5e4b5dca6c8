"""Selective search (Uijlings et al., Selective Search for Object Recognition, IJCV 2013): R-CNN's proposals.

Written on scikit-image's graph-based segmentation (``skimage.segmentation.felzenszwalb``,
Felzenszwalb & Huttenlocher, IJCV 2004) rather than OpenCV's contrib ``ximgproc`` module: that
module ships only in ``opencv-contrib-python``, a second OpenCV build that would share (and fight
over) the ``cv2`` folder of the ``opencv-python-headless`` albumentations brings.

One hierarchy per strategy (a colour space and a segmentation scale ``k``):

1. the initial regions: Felzenszwalb's segmentation of the image in that colour space, with
   ``scale = min_size = k`` as in the paper;
2. per region its size, box, colour histogram (25 bins per channel) and texture histogram
   (Gaussian derivatives, sigma 1, in 8 orientations, 10 bins each, per channel), both L1-normalised;
3. hierarchical grouping: the two most similar neighbours are merged until one region is left,
   with the paper's similarity ``s = s_colour + s_texture + s_size + s_fill`` (each in [0, 1]);
   the merged region's histograms are the size-weighted means of its parts, as the paper propagates them;
4. every region of every hierarchy is a proposal (its box). The paper's ranking: a region's
   position in its hierarchy (1 for the whole image, counting down towards the initial regions)
   times a random number in [0, 1], sorted ascending, so large regions come first but every
   hierarchy contributes early; duplicates are dropped, the list is capped at ``max_proposals``.

Boxes are xyxy in pixels with exclusive x2/y2 (a region of columns 3..7 is x1=3, x2=8), float32.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.color import rgb2hsv, rgb2lab
from skimage.segmentation import felzenszwalb

__all__ = [
    "COLOUR_BINS",
    "TEXTURE_BINS",
    "box_iou",
    "proposal_recall",
    "selective_search",
    "similarity",
]

COLOUR_BINS = 25  # per channel, the paper's
TEXTURE_BINS = 10  # per orientation and channel, the paper's
TEXTURE_ORIENTATIONS = 8


def _in_colour_space(image: np.ndarray, space: str) -> np.ndarray:
    """HxWx3 float in [0, 1] per channel, in ``space`` (rgb | hsv | lab)."""
    rgb = image.astype(np.float64) / 255.0
    if space == "rgb":
        return rgb
    if space == "hsv":
        return rgb2hsv(rgb)
    if space == "lab":  # L in [0, 100], a/b in about [-128, 127]
        lab = rgb2lab(rgb)
        return np.stack([lab[..., 0] / 100.0, (lab[..., 1] + 128) / 255.0, (lab[..., 2] + 128) / 255.0], -1).clip(0, 1)
    raise ValueError(f"unknown colour space {space!r}; choose rgb, hsv or lab")


def _histograms(labels: np.ndarray, n: int, values: np.ndarray, bins: int) -> np.ndarray:
    """(n, C * bins): per region, a ``bins``-bin histogram of each channel of ``values`` (HxWxC in [0, 1])."""
    idx = np.minimum((values * bins).astype(np.int64), bins - 1)  # value 1.0 goes to the last bin
    flat = labels.reshape(-1)
    out = [np.bincount(flat * bins + idx[..., c].reshape(-1), minlength=n * bins).reshape(n, bins)
           for c in range(values.shape[-1])]
    return np.concatenate(out, axis=1).astype(np.float64)


def _texture_responses(image: np.ndarray) -> np.ndarray:
    """HxWx(3*8): per channel, the Gaussian derivative (sigma 1) in 8 orientations, positive part, scaled to [0, 1]."""
    out = []
    angles = np.arange(TEXTURE_ORIENTATIONS) * 2 * np.pi / TEXTURE_ORIENTATIONS
    for c in range(image.shape[-1]):
        gy = gaussian_filter(image[..., c], 1.0, order=(1, 0))
        gx = gaussian_filter(image[..., c], 1.0, order=(0, 1))
        for a in angles:
            out.append(np.maximum(np.cos(a) * gx + np.sin(a) * gy, 0.0))
    resp = np.stack(out, axis=-1)
    peak = resp.reshape(-1, resp.shape[-1]).max(0)
    return resp / np.where(peak > 0, peak, 1.0)


def _l1(h: np.ndarray) -> np.ndarray:
    return h / np.maximum(h.sum(axis=1, keepdims=True), 1e-12)


def similarity(colour_i: np.ndarray, colour_j: np.ndarray, texture_i: np.ndarray, texture_j: np.ndarray,
               size_i: float, size_j: float, box_i: Sequence[float], box_j: Sequence[float], image_size: float) -> float:
    """The paper's s_colour + s_texture + s_size + s_fill of two regions (histograms L1-normalised, boxes xyxy)."""
    s_colour = float(np.minimum(colour_i, colour_j).sum())
    s_texture = float(np.minimum(texture_i, texture_j).sum())
    s_size = 1.0 - (size_i + size_j) / image_size
    bw = max(box_i[2], box_j[2]) - min(box_i[0], box_j[0])
    bh = max(box_i[3], box_j[3]) - min(box_i[1], box_j[1])
    s_fill = 1.0 - (bw * bh - size_i - size_j) / image_size
    return s_colour + s_texture + s_size + s_fill


def _regions(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, set[tuple[int, int]]]:
    """Per label: its pixel count and box (xyxy, exclusive end); the pairs of labels that touch."""
    n = int(labels.max()) + 1
    h, w = labels.shape
    rows, cols = np.mgrid[0:h, 0:w]
    flat = labels.reshape(-1)
    sizes = np.bincount(flat, minlength=n).astype(np.float64)
    boxes = np.stack([
        np.full(n, w, np.int64), np.full(n, h, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)], 1)
    np.minimum.at(boxes[:, 0], flat, cols.reshape(-1))
    np.minimum.at(boxes[:, 1], flat, rows.reshape(-1))
    np.maximum.at(boxes[:, 2], flat, cols.reshape(-1) + 1)
    np.maximum.at(boxes[:, 3], flat, rows.reshape(-1) + 1)
    pairs = np.concatenate([
        np.stack([labels[:, :-1].reshape(-1), labels[:, 1:].reshape(-1)], 1),
        np.stack([labels[:-1, :].reshape(-1), labels[1:, :].reshape(-1)], 1),
    ])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs = np.unique(np.sort(pairs, axis=1), axis=0)
    return sizes, boxes.astype(np.float64), {(int(a), int(b)) for a, b in pairs}


def _hierarchy(values: np.ndarray, textures: np.ndarray, k: float, sigma: float) -> np.ndarray:
    """The boxes of one hierarchy, from the initial regions to the whole image, in the order they were made.

    ``values``: the image in one colour space (HxWx3 in [0, 1]); ``textures``: its texture responses.
    """
    labels = felzenszwalb(values, scale=k, sigma=sigma, min_size=int(k), channel_axis=-1)
    sizes, boxes, pairs = _regions(labels)
    n = len(sizes)
    colour = _l1(_histograms(labels, n, values, COLOUR_BINS))
    texture = _l1(_histograms(labels, n, textures, TEXTURE_BINS))
    image_size = float(labels.size)
    # room for the n - 1 merged regions after the n initial ones
    sizes = np.concatenate([sizes, np.zeros(n - 1)])
    boxes = np.concatenate([boxes, np.zeros((n - 1, 4))])
    colour = np.concatenate([colour, np.zeros((n - 1, colour.shape[1]))])
    texture = np.concatenate([texture, np.zeros((n - 1, texture.shape[1]))])
    neighbours: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in pairs:
        neighbours[a].add(b)
        neighbours[b].add(a)

    def sim(a: int, b: int) -> float:
        return similarity(colour[a], colour[b], texture[a], texture[b], sizes[a], sizes[b], boxes[a], boxes[b], image_size)

    sims = {(a, b): sim(a, b) for a, b in pairs}
    new = n
    while sims:
        i, j = max(sims, key=sims.__getitem__)
        si, sj = sizes[i], sizes[j]
        sizes[new] = si + sj
        boxes[new] = (min(boxes[i, 0], boxes[j, 0]), min(boxes[i, 1], boxes[j, 1]),
                      max(boxes[i, 2], boxes[j, 2]), max(boxes[i, 3], boxes[j, 3]))
        colour[new] = (si * colour[i] + sj * colour[j]) / (si + sj)
        texture[new] = (si * texture[i] + sj * texture[j]) / (si + sj)
        around = (neighbours.pop(i) | neighbours.pop(j)) - {i, j}
        for m in around:
            sims.pop((min(i, m), max(i, m)), None)
            sims.pop((min(j, m), max(j, m)), None)
            neighbours[m] -= {i, j}
            neighbours[m].add(new)
            sims[(m, new)] = sim(m, new)  # m < new always: new regions get the highest index
        sims.pop((min(i, j), max(i, j)), None)
        neighbours[new] = around
        new += 1
    # a segmentation into several unconnected parts cannot merge to one region: keep what was made
    return boxes[:new]


def selective_search(
    image: np.ndarray,
    *,
    colour_spaces: Sequence[str] = ("hsv", "lab"),
    scales: Sequence[float] = (50, 100),
    sigma: float = 0.8,
    max_proposals: int = 2000,
    min_side: float = 2.0,
    seed: int = 0,
) -> np.ndarray:
    """Region proposals of an RGB uint8 image (HxWx3): float32 (P, 4) xyxy boxes, best ranked first.

    One hierarchy per colour space and Felzenszwalb scale (the defaults are the paper's "fast"
    mode's diversification, HSV and Lab at k = 50 and 100, with all four similarities). Boxes
    with a side under ``min_side`` pixels are dropped, duplicates too; at most ``max_proposals``
    are kept. The ranking's random factor comes from ``seed``, so a given image always gets the same list.
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"selective_search needs an RGB image (H, W, 3), got shape {image.shape}")
    if max_proposals < 1:
        raise ValueError(f"max_proposals must be at least 1, got {max_proposals}")
    rng = np.random.default_rng(seed)
    boxes, keys = [], []
    for space in colour_spaces:
        values = _in_colour_space(image, space)
        textures = _texture_responses(values)  # shared by the scales: they only change the initial regions
        for k in scales:
            made = _hierarchy(values, textures, float(k), sigma)
            position = np.arange(len(made), 0, -1, dtype=np.float64)  # 1 = the last merged, the top
            boxes.append(made)
            keys.append(position * rng.random(len(made)))
    all_boxes = np.concatenate(boxes)
    order = np.argsort(np.concatenate(keys), kind="stable")
    ranked = all_boxes[order]
    ranked = ranked[((ranked[:, 2] - ranked[:, 0]) >= min_side) & ((ranked[:, 3] - ranked[:, 1]) >= min_side)]
    _, first = np.unique(ranked, axis=0, return_index=True)
    return ranked[np.sort(first)][:max_proposals].astype(np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of xyxy boxes."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def proposal_recall(proposals: Sequence[np.ndarray], boxes: Sequence[np.ndarray], iou: float = 0.5) -> float:
    """The share of the true ``boxes`` (over all images) that some proposal of the same image covers at IoU >= ``iou``.

    A detector that only rescores and refines proposals can find at most this share of the objects
    (its box regression moves a box a little, rarely from below 0.5 to above).
    """
    if len(proposals) != len(boxes):
        raise ValueError(f"proposal_recall needs one proposal list per image: got {len(proposals)} and {len(boxes)}")
    found = total = 0
    for p, b in zip(proposals, boxes):
        b = np.asarray(b).reshape(-1, 4)
        total += len(b)
        if len(b) and len(p):
            found += int((box_iou(b, p).max(axis=1) >= iou).sum())
    return found / total if total else 1.0
