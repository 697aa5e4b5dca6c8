"""COCO JSON reading: segmentation decoding, category id mapping, and every kind of bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from cvtasks.data.coco import (
    check_image_files,
    decode_segmentation,
    load_coco,
    predictions_to_coco,
)

H, W = 30, 40


def _square_mask() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[5:15, 10:30] = 1
    return m


def _uncompressed_rle(m: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major flattening, starting with zeros."""
    flat = m.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def _coco(annotations: list[dict] | None = None, **overrides) -> dict:
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                   {"id": 2, "file_name": "b.png", "height": H, "width": W}],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 12, "name": "twelve"}],
        "annotations": annotations if annotations is not None else [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 10], "iscrowd": 0, "area": 200},
        ],
    }
    data.update(overrides)
    return data


def test_polygon_and_both_rle_forms_decode_to_the_same_mask() -> None:
    m = _square_mask()
    polygon = [[10, 5, 30, 5, 30, 15, 10, 15]]
    compressed = mask_utils.encode(np.asfortranarray(m))
    as_text = {"size": compressed["size"], "counts": compressed["counts"].decode("ascii")}  # as JSON stores it
    for seg in (polygon, compressed, as_text, _uncompressed_rle(m)):
        out = decode_segmentation(seg, H, W)
        assert out.dtype == bool and out.shape == (H, W)
        np.testing.assert_array_equal(out, m.astype(bool))


def test_category_ids_map_to_contiguous_labels_and_back(tmp_path: Path) -> None:
    anns = [{"id": i + 1, "image_id": 1, "category_id": c, "bbox": [1, 1, 5, 5]} for i, c in enumerate((12, 3, 7))]
    index = load_coco(_write(tmp_path / "a.json", _coco(anns)))
    assert index.category_ids == [3, 7, 12]
    assert index.class_names == ["three", "seven", "twelve"]
    assert [o.label for o in index.objects[0]] == [2, 0, 1]
    assert [index.label_to_category_id(o.label) for o in index.objects[0]] == [12, 3, 7]
    assert index.category_id_to_label(7) == 1
    with pytest.raises(KeyError, match="99"):
        index.category_id_to_label(99)
    recs = predictions_to_coco(1, [[1.0, 2.0, 11.0, 7.0]], [0.5], [2], index.category_ids)
    assert recs == [{"image_id": 1, "category_id": 12, "bbox": [1.0, 2.0, 10.0, 5.0], "score": 0.5}]


def test_boxes_are_xyxy_and_crowd_is_flagged(tmp_path: Path) -> None:
    anns = [{"id": 1, "image_id": 2, "category_id": 3, "bbox": [10, 5, 20, 10], "area": 150},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [0, 0, 4, 4], "iscrowd": 1,
             "segmentation": _uncompressed_rle(_square_mask())}]
    index = load_coco(_write(tmp_path / "a.json", _coco(anns)))
    assert index.objects[0] == []  # image 1: a negative
    first, crowd = index.objects[1]
    assert first.box == (10.0, 5.0, 30.0, 15.0) and first.area == 150 and not first.iscrowd
    assert crowd.iscrowd and crowd.box == (0.0, 0.0, 4.0, 4.0)


def test_degenerate_boxes_are_dropped_with_a_warning_naming_them(tmp_path: Path) -> None:
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10]},
            {"id": 41, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10]},
            {"id": 42, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, -2]}]
    with pytest.warns(UserWarning, match=r"zero or negative size box: id 41, 42"):
        index = load_coco(_write(tmp_path / "a.json", _coco(anns)))
    assert [o.ann_id for o in index.objects[0]] == [1]
    assert index.dropped["a zero or negative size box"] == [41, 42]


def test_boxes_outside_the_image_are_clipped_or_dropped(tmp_path: Path) -> None:
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [-5, 20, 15, 30]},   # sticks out left and below
            {"id": 77, "image_id": 1, "category_id": 3, "bbox": [W + 1, 2, 5, 5]}]  # entirely right of the image
    with pytest.warns(UserWarning, match=r"outside its image: id 77"):
        index = load_coco(_write(tmp_path / "a.json", _coco(anns)))
    (obj,) = index.objects[0]
    assert obj.box == (0.0, 20.0, 10.0, float(H))


def test_unknown_category_names_the_annotation_and_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.json", _coco([{"id": 55, "image_id": 1, "category_id": 4, "bbox": [1, 1, 2, 2]}]))
    with pytest.raises(ValueError, match=r"bad\.json.*annotation 55.*category id 4"):
        load_coco(path)


def test_unknown_image_id_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.json", _coco([{"id": 5, "image_id": 9, "category_id": 3, "bbox": [1, 1, 2, 2]}]))
    with pytest.raises(ValueError, match=r"annotation 5 refers to image id 9"):
        load_coco(path)


def test_empty_annotations_are_all_negatives_but_empty_images_is_an_error(tmp_path: Path) -> None:
    index = load_coco(_write(tmp_path / "a.json", _coco([])))
    assert len(index) == 2 and index.objects == [[], []]
    with pytest.raises(ValueError, match=r"b\.json.*'images' list is empty"):
        load_coco(_write(tmp_path / "b.json", _coco([], images=[])))
    with pytest.raises(ValueError, match=r"c\.json.*categories"):
        load_coco(_write(tmp_path / "c.json", _coco([], categories=[])))


def test_malformed_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"images": [ {"id": 1,,} ]')
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON.*line 1"):
        load_coco(path)
    with pytest.raises(FileNotFoundError, match=r"nothere\.json"):
        load_coco(tmp_path / "nothere.json")
    with pytest.raises(ValueError, match=r"list\.json: expected a COCO JSON object"):
        load_coco(_write(tmp_path / "list.json", []))  # type: ignore[arg-type]


def test_missing_fields_and_bad_segmentations_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"image #0 lacks the field\(s\) \['height'\]"):
        load_coco(_write(tmp_path / "a.json", _coco(images=[{"id": 1, "file_name": "a.png", "width": W}])))
    rle_wrong_size = {"size": [H + 1, W], "counts": [0, (H + 1) * W]}
    with pytest.raises(ValueError, match=r"annotation 3 has an RLE of size"):
        load_coco(_write(tmp_path / "b.json", _coco([{"id": 3, "image_id": 1, "category_id": 3,
                                                      "bbox": [1, 1, 2, 2], "segmentation": rle_wrong_size}])))
    with pytest.raises(ValueError, match=r"annotation 4 has no usable segmentation"):
        load_coco(_write(tmp_path / "c.json", _coco([{"id": 4, "image_id": 1, "category_id": 3,
                                                      "bbox": [1, 1, 2, 2]}])), require_masks=True)


def test_degenerate_polygon_parts_are_ignored_and_bbox_can_come_from_the_mask(tmp_path: Path) -> None:
    seg = [[10, 5, 30, 5, 30, 15, 10, 15], [1, 1, 2, 2]]  # the second part is a 2-point "polygon"
    index = load_coco(_write(tmp_path / "a.json", _coco([{"id": 1, "image_id": 1, "category_id": 3,
                                                          "segmentation": seg}])), require_masks=True)
    (obj,) = index.objects[0]
    assert obj.box == (10.0, 5.0, 30.0, 15.0)
    assert decode_segmentation(obj.segmentation, H, W).sum() == 200


def test_missing_image_files_are_named(tmp_path: Path) -> None:
    index = load_coco(_write(tmp_path / "a.json", _coco()))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\).*b\.png"):
        check_image_files(index, tmp_path / "images")
    with pytest.raises(FileNotFoundError, match=r"image folder .*pics does not exist"):
        check_image_files(index, tmp_path / "pics")


def test_clean_file_loads_without_warnings(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index = load_coco(_write(tmp_path / "a.json", _coco()))
    assert index.objects[0][0].box == (10.0, 5.0, 30.0, 15.0)
