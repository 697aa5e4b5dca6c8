"""Data: the shapes generator, splits and k-fold, the image folder and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvtasks.data import ImageFolderDataModule, ShapesDataModule, render_scene, split_indices
from cvtasks.data.shapes import SHAPE_NAMES


def test_scenes_are_deterministic_per_index():
    a, b = render_scene(7, 96), render_scene(7, 96)
    assert np.array_equal(a.image, b.image) and len(a.shapes) == len(b.shapes)
    assert not np.array_equal(render_scene(8, 96).image, a.image)
    assert not np.array_equal(render_scene(7, 96, seed=1).image, a.image)


def test_scene_masks_boxes_and_occlusion():
    for i in range(30):
        scene = render_scene(i, 96, min_shapes=2, max_shapes=5)
        union = np.zeros((96, 96), bool)
        for s in scene.shapes:
            assert s.mask.any() and not (s.mask & union).any(), "visible masks must not overlap"
            union |= s.mask
            ys, xs = np.nonzero(s.mask)
            assert s.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        sem = scene.semantic_mask()
        assert set(np.unique(sem)) <= set(range(len(SHAPE_NAMES) + 1))
        assert ((sem > 0) == union).all()


def test_shape_scale_sets_the_size_of_shapes():
    def mean_area(scale):
        areas = [s.area for i in range(40) for s in render_scene(i, 64, max_shapes=1, shape_scale=scale).shapes]
        return np.mean(areas)

    small, large = mean_area((0.08, 0.12)), mean_area((0.25, 0.3))
    assert large > 4 * small  # radius ~2.7x, area ~7x
    a, b = render_scene(5, 64), render_scene(5, 64, shape_scale=(0.08, 0.2))
    assert np.array_equal(a.image, b.image)  # (0.08, 0.2) is the default


@pytest.mark.parametrize("scale", [(0.0, 0.2), (0.3, 0.2), (0.1, 0.6)])
def test_bad_shape_scale_is_named(scale):
    with pytest.raises(ValueError, match="shape_scale"):
        render_scene(0, 64, shape_scale=scale)
    from cvtasks.data import ShapesDetectionDataModule, ShapesSegmentationDataModule

    for cls in (ShapesSegmentationDataModule, ShapesDetectionDataModule):
        with pytest.raises(ValueError, match="shape_scale"):
            cls(shape_scale=scale)  # at construction, not at the first batch


def test_single_shape_view_for_classification():
    kinds = {render_scene(i, 64, single=True).shapes[0].kind for i in range(60)}
    assert kinds == set(range(len(SHAPE_NAMES)))
    for i in range(10):
        s = render_scene(i, 64, single=True)
        assert len(s.shapes) == 1 and s.shapes[0].area > 0.05 * 64 * 64


def test_ratio_split_is_seeded_disjoint_and_complete():
    tr, va, te = split_indices(100, (0.7, 0.15, 0.15), seed=3)
    assert (len(tr), len(va), len(te)) == (70, 15, 15)
    assert sorted(tr + va + te) == list(range(100))
    assert split_indices(100, (0.7, 0.15, 0.15), seed=3) == (tr, va, te)
    assert split_indices(100, (0.7, 0.15, 0.15), seed=4) != (tr, va, te)


def test_kfold_test_sets_partition_the_data():
    tests = [split_indices(50, (0.8, 0.2, 0.0), num_folds=5, fold=k, seed=0)[2] for k in range(5)]
    assert sorted(i for t in tests for i in t) == list(range(50))
    tr, va, te = split_indices(50, (0.8, 0.2, 0.0), num_folds=5, fold=2, seed=0)
    assert not set(te) & (set(tr) | set(va)) and len(tr) == 32 and len(va) == 8


@pytest.mark.parametrize("kw", [{"split": (0.5, -0.1, 0.6)}, {"num_folds": 3, "fold": 3}, {"batch_size": 0}])
def test_bad_split_arguments(kw):
    with pytest.raises(ValueError):
        ShapesDataModule(**kw)


def test_shapes_datamodule_batches():
    dm = ShapesDataModule(num_samples=30, img_size=32, batch_size=4)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert dm.num_classes == 5 and dm.class_names[0] == "circle"
    assert len(dm.train_indices) + len(dm.val_indices) + len(dm.test_indices) == 30


def _folder(root: Path, classes=("cat", "dog"), n=4) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    return root


def test_image_folder(tmp_path):
    dm = ImageFolderDataModule(root=str(_folder(tmp_path / "d")), img_size=32, batch_size=2, split=(0.5, 0.25, 0.25))
    assert dm.num_classes == 2 and dm.class_names == ["cat", "dog"]
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(root=str(tmp_path / "nope"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no images"):
        ImageFolderDataModule(root=str(tmp_path / "empty"))
    root = _folder(tmp_path / "bad")
    (root / "dog" / "broken.png").write_bytes(b"not a png at all")
    dm = ImageFolderDataModule(root=str(root))
    with pytest.raises(ValueError, match="broken.png"):
        dm.setup("fit")


def test_normalisation_follows_the_given_mean_and_std():
    """A backbone whose weights expect [-1, 1] (backbone_normalization) gets it in every split and in predict."""
    from cvtasks.backbone import backbone_normalization
    from cvtasks.data import ShapesSegmentationDataModule

    half = backbone_normalization("xception")
    assert half == ((0.5,) * 3, (0.5,) * 3) and backbone_normalization(None).mean == (0.485, 0.456, 0.406)
    image = np.full((8, 8, 3), 255, np.uint8)
    for cls in (ShapesDataModule, ShapesSegmentationDataModule):
        dm = cls(num_samples=6, img_size=32, mean=half.mean, std=half.std, augment=False)
        dm.setup("fit")
        sample = dm._datasets["fit"][0]
        x = sample[0] if isinstance(sample, tuple) else sample["image"]
        assert x.min() >= -1 and x.max() <= 1, cls.__name__
        assert torch.allclose(dm.predict_transform(image), torch.ones(3, *dm.predict_transform(image).shape[1:]))
        default = cls(num_samples=6, img_size=32)
        assert default.mean == (0.485, 0.456, 0.406) and default.std == (0.229, 0.224, 0.225)
    with pytest.raises(ValueError, match=r"std must be three positive numbers.*backbone_normalization"):
        ShapesDataModule(num_samples=6, std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="mean must be three numbers"):
        ShapesDataModule(num_samples=6, mean=(0.5, 0.5))
