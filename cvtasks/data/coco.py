"""COCO-format annotations: reading, validation, mask decoding and label/category id mapping.

The layout this module reads is the one of the COCO detection challenge (Lin et al., Microsoft COCO:
Common Objects in Context, ECCV 2014; https://cocodataset.org/#format-data): one JSON file with
``images`` (id, file_name, height, width), ``annotations`` (id, image_id, category_id, bbox as
[x, y, w, h], optional segmentation as polygons or RLE, iscrowd, area) and ``categories`` (id, name).

Category ids are arbitrary integers (COCO's run 1..90 with gaps); models need contiguous 0-based
labels, so labels follow the categories sorted by id and ``category_ids[label]`` maps back.
Everything a user can get wrong in the file is checked once, at load time, so that no bad
annotation reaches a loss: errors name the file and the annotation id; boxes that COCO tools would
discard (zero or negative size, nothing left inside the image) are dropped with a warning.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

__all__ = [
    "CocoImage",
    "CocoIndex",
    "CocoObject",
    "check_image_files",
    "decode_segmentation",
    "load_coco",
    "predictions_to_coco",
]

# How many annotation ids one warning lists before it only counts the rest.
_MAX_IDS_IN_WARNING = 20


@dataclass(frozen=True)
class CocoImage:
    """One entry of the ``images`` list."""

    id: int
    file_name: str
    height: int
    width: int


@dataclass(frozen=True)
class CocoObject:
    """One validated annotation: a clipped xyxy box, a contiguous label and its raw segmentation."""

    ann_id: int
    label: int
    box: tuple[float, float, float, float]
    area: float
    iscrowd: bool
    segmentation: Any = None


@dataclass
class CocoIndex:
    """A validated COCO file: images, their objects, and the label <-> category id mapping."""

    path: Path
    images: list[CocoImage]
    objects: list[list[CocoObject]]
    category_ids: list[int]
    class_names: list[str]
    dropped: dict[str, list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        """Number of images (annotated or not)."""
        return len(self.images)

    def label_to_category_id(self, label: int) -> int:
        """The file's category id for a contiguous 0-based label."""
        return self.category_ids[int(label)]

    def category_id_to_label(self, category_id: int) -> int:
        """The contiguous 0-based label of one of the file's category ids."""
        try:
            return self.category_ids.index(int(category_id))
        except ValueError:
            raise KeyError(f"category id {category_id} is not in {self.path} (ids: {self.category_ids})") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO annotations file {path} does not exist: pass --data.annotations <file> or put "
            "annotations.json in --data.root"
        )
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a UTF-8 text (JSON) file: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a COCO JSON object with 'images', 'annotations' and "
                         f"'categories', got a {type(data).__name__}")
    return data


def _require(entry: Any, keys: Sequence[str], what: str, path: Path) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got {entry!r:.80}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"{path}: {what} lacks the field(s) {missing}: {entry!r:.120}")


def _read_categories(data: dict, path: Path) -> tuple[list[int], list[str]]:
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise ValueError(f"{path}: 'categories' must be a non-empty list of {{'id', 'name'}} objects")
    by_id: dict[int, str] = {}
    for i, cat in enumerate(cats):
        _require(cat, ("id", "name"), f"category #{i}", path)
        cid = int(cat["id"])
        if cid in by_id:
            raise ValueError(f"{path}: category id {cid} appears twice ({by_id[cid]!r} and {cat['name']!r})")
        by_id[cid] = str(cat["name"])
    ids = sorted(by_id)
    return ids, [by_id[i] for i in ids]


def _read_images(data: dict, path: Path) -> list[CocoImage]:
    imgs = data.get("images")
    if not isinstance(imgs, list):
        raise ValueError(f"{path}: 'images' must be a list of {{'id', 'file_name', 'height', 'width'}} objects")
    if not imgs:
        raise ValueError(f"{path}: the 'images' list is empty; a COCO file needs at least one image")
    images: list[CocoImage] = []
    seen: set[int] = set()
    for i, img in enumerate(imgs):
        _require(img, ("id", "file_name", "height", "width"), f"image #{i}", path)
        iid = int(img["id"])
        if iid in seen:
            raise ValueError(f"{path}: image id {iid} appears twice")
        seen.add(iid)
        h, w = int(img["height"]), int(img["width"])
        if h <= 0 or w <= 0:
            raise ValueError(f"{path}: image {iid} ({img['file_name']}) has a non-positive size {h}x{w}")
        images.append(CocoImage(iid, str(img["file_name"]), h, w))
    return images


def _check_segmentation(seg: Any, ann_id: int, img: CocoImage, path: Path) -> Any:
    """Validate one segmentation; returns it with degenerate polygon parts removed (or None)."""
    if isinstance(seg, list):
        polys = []
        for poly in seg:
            if not isinstance(poly, list) or len(poly) % 2:
                raise ValueError(f"{path}: annotation {ann_id} has a polygon that is not a flat list of an "
                                 "even number of coordinates [x1, y1, x2, y2, ...]")
            # pycocotools fails on polygons of fewer than 3 points; they hold no area anyway.
            if len(poly) >= 6:
                polys.append([float(v) for v in poly])
        return polys or None
    if isinstance(seg, dict):
        if "size" not in seg or "counts" not in seg:
            raise ValueError(f"{path}: annotation {ann_id} has an RLE segmentation without 'size' and 'counts'")
        if [int(v) for v in seg["size"]] != [img.height, img.width]:
            raise ValueError(f"{path}: annotation {ann_id} has an RLE of size {seg['size']} but its image "
                             f"{img.file_name} is {img.height}x{img.width}")
        return seg
    raise ValueError(f"{path}: annotation {ann_id} has a segmentation of type {type(seg).__name__}; "
                     "expected a list of polygons or an RLE dict")


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation (polygons, compressed or uncompressed RLE) to an (H, W) bool mask."""
    if segmentation is None:
        return np.zeros((height, width), dtype=bool)
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        rle = {"size": list(segmentation["size"]),
               "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


def _segmentation_box(seg: Any, height: int, width: int) -> tuple[float, float, float, float]:
    """xywh box around a segmentation (COCO's toBbox), for annotations that lack 'bbox'."""
    rle = mask_utils.encode(np.asfortranarray(decode_segmentation(seg, height, width).astype(np.uint8)))
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    return x, y, w, h


def _warn_dropped(path: Path, dropped: dict[str, list[int]]) -> None:
    for reason, ids in dropped.items():
        if not ids:
            continue
        shown = ", ".join(str(i) for i in ids[:_MAX_IDS_IN_WARNING])
        more = f" and {len(ids) - _MAX_IDS_IN_WARNING} more" if len(ids) > _MAX_IDS_IN_WARNING else ""
        warnings.warn(f"{path}: dropped {len(ids)} annotation(s) with {reason}: id {shown}{more}",
                      UserWarning, stacklevel=3)


def load_coco(path: str | Path, *, require_masks: bool = False) -> CocoIndex:
    """Read and validate a COCO annotations file (see the module docstring for what is checked).

    require_masks: every non-crowd annotation must carry a segmentation (instance segmentation).
    """
    path = Path(path)
    data = _read_json(path)
    category_ids, class_names = _read_categories(data, path)
    label_of = {cid: i for i, cid in enumerate(category_ids)}
    images = _read_images(data, path)
    row_of = {img.id: i for i, img in enumerate(images)}

    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise ValueError(f"{path}: 'annotations' must be a list (it may be empty: all images are then negatives)")
    objects: list[list[CocoObject]] = [[] for _ in images]
    dropped: dict[str, list[int]] = {"a zero or negative size box": [], "a box outside its image": []}
    seen: set[int] = set()
    for i, ann in enumerate(anns):
        _require(ann, ("id", "image_id", "category_id"), f"annotation #{i}", path)
        ann_id = int(ann["id"])
        if ann_id in seen:
            raise ValueError(f"{path}: annotation id {ann_id} appears twice")
        seen.add(ann_id)
        if int(ann["image_id"]) not in row_of:
            raise ValueError(f"{path}: annotation {ann_id} refers to image id {ann['image_id']}, "
                             "which is not in the 'images' list")
        if int(ann["category_id"]) not in label_of:
            raise ValueError(f"{path}: annotation {ann_id} has category id {ann['category_id']}, which is not "
                             f"in 'categories' (known ids: {category_ids}); add the category or fix the annotation")
        img = images[row_of[int(ann["image_id"])]]
        iscrowd = bool(ann.get("iscrowd", 0))
        seg = ann.get("segmentation")
        if seg is not None and not (isinstance(seg, list) and not seg):
            seg = _check_segmentation(seg, ann_id, img, path)
        else:
            seg = None
        if require_masks and seg is None and not iscrowd:
            raise ValueError(f"{path}: annotation {ann_id} has no usable segmentation, but instance segmentation "
                             "needs a mask for every object; fix the file or train a detection model instead")
        if "bbox" in ann:
            bbox = ann["bbox"]
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise ValueError(f"{path}: annotation {ann_id} has bbox {bbox!r}; expected [x, y, width, height]")
            x, y, w, h = (float(v) for v in bbox)
        elif seg is not None:
            x, y, w, h = _segmentation_box(seg, img.height, img.width)
        else:
            raise ValueError(f"{path}: annotation {ann_id} has neither a 'bbox' nor a 'segmentation'")
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            dropped["a zero or negative size box"].append(ann_id)
            continue
        x1, y1 = min(max(x, 0.0), img.width), min(max(y, 0.0), img.height)
        x2, y2 = min(max(x + w, 0.0), img.width), min(max(y + h, 0.0), img.height)
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            dropped["a box outside its image"].append(ann_id)
            continue
        area = float(ann.get("area") or 0.0)
        if area <= 0:
            area = (x2 - x1) * (y2 - y1)
        label = label_of[int(ann["category_id"])]
        objects[row_of[img.id]].append(CocoObject(ann_id, label, (x1, y1, x2, y2), area, iscrowd, seg))
    _warn_dropped(path, dropped)
    return CocoIndex(path, images, objects, category_ids, class_names, dropped)


def check_image_files(index: CocoIndex, images_dir: str | Path) -> list[Path]:
    """Paths of every image of `index` under `images_dir`; raises naming the first missing files."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder {images_dir} does not exist (the COCO layout is <root>/images/ "
                                f"beside <root>/annotations.json; annotations: {index.path})")
    paths = [images_dir / img.file_name for img in index.images]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{len(missing)} image file(s) listed in {index.path} are missing: {shown}{more}")
    return paths


def predictions_to_coco(image_id: int, boxes: Any, scores: Any, labels: Any, category_ids: Sequence[int], *,
                        masks: Any = None, file_name: str | None = None) -> list[dict]:
    """COCO result records (xywh boxes, the file's category ids) for one image's xyxy predictions.

    ``masks``: the detections' (N, H, W) binary masks, written as compressed RLE ``segmentation``
    (instance segmentation results); ``file_name``: recorded with each result, for predictions on
    images that have no COCO image id of their own.
    """
    mask_array = None if masks is None else np.asarray(masks).astype(np.uint8)
    out = []
    for j, (box, score, label) in enumerate(zip(np.asarray(boxes, dtype=float).reshape(-1, 4),
                                                np.asarray(scores, dtype=float).reshape(-1),
                                                np.asarray(labels).reshape(-1), strict=True)):
        x1, y1, x2, y2 = box.tolist()
        item: dict[str, Any] = {"image_id": int(image_id)}
        if file_name is not None:
            item["file_name"] = file_name
        item.update({"category_id": int(category_ids[int(label)]), "bbox": [x1, y1, x2 - x1, y2 - y1],
                     "score": float(score)})
        if mask_array is not None:
            rle = mask_utils.encode(np.asfortranarray(mask_array[j]))
            item["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
        out.append(item)
    return out
