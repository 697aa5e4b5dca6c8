"""Data: the shapes generator, splits and k-fold, the image folder and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import Trainer
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
    with pytest.raises(ValueError, match="broken.png"):  # img_size auto reads the headers when the module is built
        ImageFolderDataModule(root=str(root))
    dm = ImageFolderDataModule(root=str(root), img_size=32)
    with pytest.raises(ValueError, match="broken.png"):  # a given size: every image is checked before training
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


def test_alexnet_augmentation_crops_flips_and_adds_lighting_noise():
    """The AlexNet preset: 256:224 rescale, random crops (shifts) and flips with PCA lighting in training, the centre crop in evaluation."""
    from cvtasks.data.classification import classification_transform

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)  # shorter side 40 -> 64/56*40 at img_size 56
    plain = dict(mean=(0, 0, 0), std=(1 / 255,) * 3)  # leaves pixel values as they are
    evaluate = classification_transform(56, False, augmentation="alexnet", **plain)
    a, b = evaluate(image), evaluate(image)
    assert a.shape == (3, 56, 56) and torch.equal(a, b)  # evaluation is deterministic
    # evaluation is the centre 56x56 of the 64x64 centre of the image rescaled to a shorter side of 64
    import cv2

    full = cv2.resize(image, (96, 64), interpolation=cv2.INTER_LINEAR)[:, 16:80]
    assert torch.allclose(a, torch.from_numpy(full[4:60, 4:60]).permute(2, 0, 1).float(), atol=1)
    train = classification_transform(56, True, augmentation="alexnet", **plain)
    torch.manual_seed(0)
    import random

    random.seed(0)
    crops = [train(image) for _ in range(8)]
    assert all(c.shape == (3, 56, 56) for c in crops)
    assert len({tuple(c.flatten()[:50].round().tolist()) for c in crops}) > 1  # the crop and flip vary
    # each crop is a 56x56 window of the 64x64 centre, maybe mirrored, its colours shifted by the lighting noise
    windows = [torch.from_numpy(full[i:i + 56, j:j + 56]).permute(2, 0, 1).float() for i in range(9) for j in range(9)]
    windows += [w.flip(-1) for w in windows]
    for c in crops:
        # the noise adds one value per colour channel over the whole crop: some window, maybe mirrored, differs
        # from the crop by a per-channel constant (pixels clipped at 0/255 aside)
        def off_by_a_colour(w: torch.Tensor) -> float:
            offsets = (c - w).flatten(1).median(dim=1).values.view(3, 1, 1)
            return ((c - w - offsets).abs() <= 1.5).float().mean().item()

        assert max(off_by_a_colour(w) for w in windows) > 0.95


def test_pca_lighting_shifts_every_pixel_by_one_colour_along_imagenets_components():
    from cvtasks.data.classification import PCALighting

    grey = np.full((4, 5, 3), 0.5, np.float32)
    light = PCALighting(alpha_std=0.1)
    light.set_random_seed(0)
    alphas = []
    for _ in range(400):
        shift = light(image=grey)["image"] - grey
        assert np.allclose(shift, shift[0, 0], atol=1e-6)  # the same colour added to every pixel
        # shift = V (alpha * lambda): solve for alpha
        alphas.append(np.linalg.solve(PCALighting.EIGENVECTORS, shift[0, 0]) / PCALighting.EIGENVALUES)
    alphas = np.array(alphas)
    assert np.allclose(alphas.mean(axis=0), 0, atol=0.03) and np.allclose(alphas.std(axis=0), 0.1, atol=0.015)


def test_affine_and_mirrors_warps_once_what_albumentations_affine_and_flips_would_draw():
    import albumentations as A

    from cvtasks.data.classification import AffineAndMirrors

    image = render_scene(3, 64, single=True).image.copy()
    image[10, 40] = 255  # no symmetry left: every mirror and turn is seen

    def warp(**params):
        return AffineAndMirrors().apply(image, **{"move": True, "shift": (0.0, 0.0), "zoom": (1.0, 1.0), "angle": 0.0,
                                                   "hflip": False, "vflip": False, **params})

    # pixel centres land on pixel centres: exact, with no interpolation blur
    assert np.array_equal(warp(), image)
    assert np.array_equal(warp(angle=90), np.rot90(image))  # counter-clockwise as shown
    assert np.array_equal(warp(hflip=True), image[:, ::-1]) and np.array_equal(warp(vflip=True), image[::-1])
    assert np.array_equal(warp(angle=90, hflip=True), np.rot90(image)[:, ::-1])  # mirrored after the turn
    shifted = warp(shift=(6 / 64, -4 / 64))
    assert np.array_equal(shifted[:-4, 6:], image[4:, :-6]) and not shifted[:, :6].any() and not shifted[-4:].any()
    assert np.array_equal(AffineAndMirrors().apply(image, move=False, shift=(0, 0), zoom=(1, 1), angle=0, hflip=True,
                                                   vflip=True), image[::-1, ::-1])
    # zoom (x, y) about the centre: an 8-pixel-wide stripe becomes 16 wide under 2x in x, and stays 8 under 2x in y
    stripe = np.zeros((64, 64, 3), np.uint8)
    stripe[:, 36:44] = 255
    for zoom, width in (((2.0, 1.0), 16), ((1.0, 2.0), 8)):
        out = AffineAndMirrors().apply(stripe, move=True, shift=(0, 0), zoom=zoom, angle=0, hflip=False, vflip=False)
        assert abs(int((out[32, :, 0] >= 128).sum()) - width) <= 1

    # the draws: Affine's ranges with its probability, each mirror with one half
    pipeline = A.Compose([AffineAndMirrors(affine_p=0.7, mirror_p=0.5)], seed=0)
    draws = [pipeline.transforms[0].get_params() for _ in range(4000)]
    assert abs(np.mean([d["move"] for d in draws]) - 0.7) < 0.03
    assert abs(np.mean([d["hflip"] for d in draws]) - 0.5) < 0.03 and abs(np.mean([d["vflip"] for d in draws]) - 0.5) < 0.03
    moved = [d for d in draws if d["move"]]
    assert all(-30 <= d["angle"] <= 30 and all(0.85 <= z <= 1.15 for z in d["zoom"])
               and all(-0.1 <= t <= 0.1 for t in d["shift"]) for d in moved)
    assert np.std([d["zoom"][0] - d["zoom"][1] for d in moved]) > 0.05  # x and y scaled apart, as Affine's keep_ratio=False
    assert all(d["angle"] == 0 and d["zoom"] == (1.0, 1.0) for d in draws if not d["move"])


def test_augmentation_is_chosen_by_name(tmp_path):
    dm = ShapesDataModule(num_samples=6, img_size=32, augmentation="alexnet")
    dm.setup("fit")
    assert dm._datasets["fit"][0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r"unknown augmentation 'alex'; choose one of \['aerial', 'alexnet', 'digits', "
                                          r"'documents', 'natural', 'none', 'safe', 'shapes'\]"):
        ShapesDataModule(num_samples=6, augmentation="alex")
    with pytest.raises(ValueError, match="unknown augmentation"):
        ImageFolderDataModule(root=str(_folder(tmp_path / "d")), augmentation="flip")


def test_num_workers_auto_leaves_training_its_cpus(monkeypatch):
    from cvtasks.data import base

    monkeypatch.setattr(base, "available_cpus", lambda: 16)
    # on a GPU a training process needs one CPU: Lightning's suggestion
    assert base.resolve_num_workers("auto") == 15
    assert base.resolve_num_workers("auto", processes_per_machine=8) == 1
    assert base.resolve_num_workers("auto", processes_per_machine=16) == 0  # no CPU left for a worker
    assert base.resolve_num_workers(3, processes_per_machine=16) == 3  # a number is taken as given
    # on a CPU the training process computes on torch's threads; workers get only the CPUs beyond them
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert base.resolve_num_workers("auto", training_on_cpu=True) == 0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 12)
    assert base.resolve_num_workers("auto", training_on_cpu=True) == 4
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)  # what Lightning leaves each of 2 CPU processes
    assert base.resolve_num_workers("auto", processes_per_machine=2, training_on_cpu=True) == 0
    assert base.resolve_num_workers(2, training_on_cpu=True) == 2

    # what a fit on this CPU gets: 2 CPUs that both train, so no worker; one thread leaves a worker its CPU
    monkeypatch.setattr(base, "available_cpus", lambda: 2)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    dm = ShapesDataModule(num_samples=12, img_size=32, batch_size=4)
    assert dm.num_workers == "auto"
    dm.trainer = trainer
    dm.setup("fit")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert dm.loader_workers(trainer) == (0, "auto: 2 CPUs, less the 2 threads that train on them")
    assert dm.train_dataloader().num_workers == 0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    loader = dm.train_dataloader()
    assert loader.num_workers == 1 and loader.persistent_workers and not loader.pin_memory
    assert loader.worker_init_fn is base.one_opencv_thread
    x, _ = next(iter(loader))
    assert x.shape == (4, 3, 32, 32)
    assert ShapesDataModule(num_samples=12, num_workers=3).loader_workers(trainer) == (3, "given")
    for bad in (-1, "many", 1.5, True):
        with pytest.raises(ValueError, match=r"num_workers must be 'auto' or a whole number"):
            ShapesDataModule(num_samples=12, num_workers=bad)


def test_loaders_run_opencv_on_one_thread_and_keep_lightnings_worker_seeding(monkeypatch):
    import cv2

    from cvtasks.data import base

    import random

    before = cv2.getNumThreads()
    # Lightning's worker seeding reseeds this process's torch, numpy and random: put them back afterwards
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        cv2.setNumThreads(2)
        dm = ShapesDataModule(num_samples=12, img_size=32, batch_size=4, num_workers=0)
        dm.setup("fit")
        dm.train_dataloader()  # the training process draws the batches: its OpenCV computes on one thread
        assert cv2.getNumThreads() == 1
        # as a spawned worker's worker_init_fn: one thread, and Lightning's seeding where seed_everything(workers=True) asked
        cv2.setNumThreads(2)
        torch.manual_seed(7)
        monkeypatch.delenv("PL_SEED_WORKERS", raising=False)
        base.one_opencv_thread(0)
        assert cv2.getNumThreads() == 1 and torch.initial_seed() == 7
        monkeypatch.setenv("PL_SEED_WORKERS", "1")
        base.one_opencv_thread(0)
        assert torch.initial_seed() != 7
    finally:
        cv2.setNumThreads(before)
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def _three_shapes_datasets():
    from cvtasks.data import ShapesSegmentationDataModule
    from cvtasks.data.detection import ShapesDetectionDataModule

    for dm in (ShapesDataModule(num_samples=12, img_size=32, num_workers=0),
               ShapesSegmentationDataModule(num_samples=12, img_size=32, num_workers=0),
               ShapesDetectionDataModule(num_samples=12, img_size=64, num_workers=0, with_masks=True)):
        dm.setup("fit")
        yield dm._datasets["fit"]


def _image(item):
    return item[0] if isinstance(item, tuple) else item["image"]


def test_every_shapes_task_draws_each_scene_once_and_augments_it_every_epoch(monkeypatch):
    import importlib

    calls = []
    for module in ("classification", "segmentation", "detection"):
        mod = importlib.import_module(f"cvtasks.data.{module}")
        real = mod.render_scene
        monkeypatch.setattr(mod, "render_scene", lambda *a, _real=real, **k: calls.append(a[0]) or _real(*a, **k))
    for ds in _three_shapes_datasets():
        calls.clear()
        epochs = [[_image(ds[i]) for i in range(len(ds))] for _ in range(3)]
        assert sorted(calls) == sorted(ds.indices), type(ds).__name__  # drawn in the first epoch only
        # augmentation still varies per epoch: some item differs between epochs
        assert any(not torch.equal(a, b) for a, b in zip(epochs[0], epochs[1]) if a.shape == b.shape), type(ds).__name__


def test_kept_scenes_are_not_changed_by_what_uses_them():
    for ds in _three_shapes_datasets():
        first = _image(ds[0]).clone()
        _image(ds[0]).mul_(0)  # a consumer writing into the tensor it got
        kept = ds.scene(0)[0] if hasattr(ds, "scene") else ds.sample(0).image
        assert kept.any(), type(ds).__name__
        assert first.shape == _image(ds[0]).shape
