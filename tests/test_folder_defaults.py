"""The defaults of a user's own folder: training sized by steps, early stopping, img_size from the images,
augmentation presets by kind of data, and the classical baseline a CNN must beat."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from jsonargparse import Namespace
from PIL import Image

from benchmarks import baseline
from conftest import REPO
from cvtasks.cli import CvtasksCLI, epochs_for_steps, steps_per_epoch
from cvtasks.data import COCODetectionDataModule, ImageFolderDataModule, ShapesDataModule, VOCSegmentationDataModule
from cvtasks.data.base import auto_image_size
from cvtasks.data.classification import AUGMENTATIONS, classification_transform
from cvtasks.data.detection import DetectionSample, detection_transform, transform_sample
from cvtasks.data.segmentation import save_index_png, segmentation_transforms


def _class_folder(root: Path, sizes: list[tuple[int, int]], classes: tuple[str, ...] = ("a", "b")) -> Path:
    """One image of each (height, width) in every class folder; class k is bright in its k-th half."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            image[:, k * w // 2:(k + 1) * w // 2] += 150
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


# -- training sized by steps -------------------------------------------------------------------------

def test_steps_per_epoch_counts_each_process_share_in_batches():
    assert steps_per_epoch(1258, 32) == 40  # the digits' training split
    assert steps_per_epoch(1258, 32, world_size=2) == 20  # 629 per process
    assert steps_per_epoch(1258, 32, accumulate=4) == 10
    assert steps_per_epoch(1258, 32, limit_batches=5) == 5 and steps_per_epoch(1258, 32, limit_batches=0.5) == 20
    assert steps_per_epoch(3, 32) == 1


def test_a_small_folder_gets_its_steps_a_large_one_is_not_multiplied():
    assert epochs_for_steps(2400, 40, 100) == 60  # small: 60 epochs, 2400 steps
    assert epochs_for_steps(2400, 70, 100) * 70 >= 2400  # whole epochs: at least the steps asked for
    assert epochs_for_steps(2400, 2, 100) == 100  # tiny: capped by max_epochs
    assert epochs_for_steps(2400, 5000, 100) == 1  # large: one epoch, not max_epochs of them
    assert epochs_for_steps(2400, 40, None) == 60 and epochs_for_steps(2400, 40, -1) == 60  # no cap
    with pytest.raises(ValueError, match="train_steps must be a positive"):
        epochs_for_steps(0, 40, 100)


def test_warm_up_is_at_most_a_third_of_a_step_sized_run():
    from cvtasks.tasks.classification import ClassificationTask

    task = ClassificationTask(num_classes=2, backbone="resnet18", lr=0.1, warmup_epochs=1, scheduler="cosine")
    task.trainer = SimpleNamespace(estimated_stepping_batches=300, max_epochs=1)  # a large folder: one epoch
    configured = task.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(300):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    peak = int(np.argmax(lrs))
    assert 90 <= peak <= 100 and lrs[-1] < 0.01  # warm-up over the first third, then the cosine's decay


def test_auto_workers_on_a_cpu_are_printed_and_lightnings_advice_against_them_is_silenced(tmp_path, monkeypatch, capsys):
    import warnings

    from lightning.pytorch.trainer.connectors import data_connector

    from conftest import TINY_CLASSIFICATION_FIT
    from cvtasks.data import base

    # a CPU host with 8 CPUs, all taken by torch's threads: auto keeps no worker, where Lightning would advise 7
    monkeypatch.setattr(base, "available_cpus", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda devices: 7)
    tiny = [str(REPO / a) if a.startswith("configs/") else a for a in TINY_CLASSIFICATION_FIT]

    def fit(workers: str) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            CvtasksCLI(["fit", *tiny, "--data.num_workers", workers, "--runs_dir", str(tmp_path / "runs"), "--run_name", workers])
        return [str(w.message) for w in caught if "does not have many workers" in str(w.message)]

    assert fit("0")  # a number given: Lightning's advice stands
    assert "cvtasks: loader workers 0 (given; --data.num_workers sets it)" in capsys.readouterr().out
    assert not fit("auto")
    assert "cvtasks: loader workers 0 (auto: 8 CPUs, less the 8 threads that train on them; --data.num_workers sets it)" \
        in capsys.readouterr().out


def test_folder_fit_prints_its_settings_sizes_by_steps_and_stops_early(tmp_path: Path, capsys):
    root = _class_folder(tmp_path / "folder", [(20, 30)] * 8)
    CvtasksCLI(["fit", "--config", str(REPO / "configs/classification.yaml"),
                "--config", str(REPO / "configs/data/classification_folder.yaml"), "--data.root", str(root),
                "--config", str(REPO / "configs/logger/csv.yaml"), "--data.batch_size", "4", "--data.num_workers", "0",
                "--model.backbone", "lenet5",  # small checkpoints: this run saves two per epoch
                "--data.split", "[0.5, 0.25, 0.25]", "--train_steps", "60", "--early_stopping_patience", "1",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--runs_dir", str(tmp_path / "runs"), "--run_name", "mine"])
    out = capsys.readouterr().out
    assert "cvtasks: data: 8 train / 4 val / 4 test items, 2 classes" in out
    assert "cvtasks: img_size 32 (auto: median longer side 30 px over 16 images" in out  # 30 -> the stride's 32
    assert "cvtasks: augmentation safe: " in out and "no flip" in out
    assert "cvtasks: loader workers 0 (given; --data.num_workers sets it)" in out
    assert ("cvtasks: fit: 30 epochs x 2 steps = 60 steps (batch 4; train_steps 60, at most 100 epochs); "
            "stops when val/acc has not improved for 1 epoch") in out
    run = tmp_path / "runs" / "mine"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["init_args"]["img_size"] == 32  # the number, so that resume and predict use it
    assert config["train_steps"] == 60 and config["trainer"]["max_epochs"] == 100
    # 4 validation images allow at most 5 strictly better val/acc values: patience 1 ends the run long before epoch 30
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] <= 6 and last["global_step"] <= 14
    assert any(k.startswith("EarlyStopping{'monitor': 'val/acc', 'mode': 'max'}") for k in last["callbacks"])
    assert "test/acc" in json.loads((run / "metrics.json").read_text())


@pytest.mark.parametrize("name", ["train_steps", "early_stopping_patience"])
def test_step_and_patience_counts_must_be_positive(tmp_path: Path, name: str):
    root = _class_folder(tmp_path / "folder", [(20, 30)] * 4)
    args = ["fit", "--config", str(REPO / "configs/classification.yaml"),
            "--config", str(REPO / "configs/data/classification_folder.yaml"), "--data.root", str(root), f"--{name}", "0"]
    with pytest.raises(ValueError, match=f"{name} must be at least 1 \\(or null for none\\), got 0"):
        CvtasksCLI(args)


# -- image size from the data --------------------------------------------------------------------------

def test_auto_image_size_is_the_median_longer_side_on_the_stride():
    assert auto_image_size([8] * 5, step=32, minimum=32, maximum=224) == 32  # the digits: the backbone's smallest input
    assert auto_image_size([192, 190, 200], step=32, minimum=32, maximum=512) == 192
    assert auto_image_size([100, 90, 200], step=32, minimum=32, maximum=512) == 96
    assert auto_image_size([4000, 3000, 3500], step=32, minimum=32, maximum=224) == 224  # capped
    assert auto_image_size([100], step=32, minimum=75, maximum=512) == 96  # the minimum moves up onto the stride
    assert auto_image_size([100], step=32, minimum=299, maximum=224) == 320  # the net's smallest input beats the cap
    assert auto_image_size([300], step=16, minimum=16, maximum=512) == 304  # ViT's patch


def test_image_folder_size_follows_the_images_unless_given(tmp_path: Path):
    root = _class_folder(tmp_path / "f", [(40, 100), (60, 90), (200, 150)])
    dm = ImageFolderDataModule(root=str(root))
    assert dm.img_size == 96 and "median longer side 100 px over 6 images" in dm.img_size_note
    assert ImageFolderDataModule(root=str(root), img_size_max=64).img_size == 64
    given = ImageFolderDataModule(root=str(root), img_size=48)
    assert given.img_size == 48 and given.img_size_note == "given"
    given.setup("fit")
    assert given._datasets["fit"][0][0].shape == (3, 48, 48)


def test_coco_folder_size_comes_from_its_json_and_the_detector_follows(tmp_path: Path):
    root = tmp_path / "coco"
    root.mkdir()
    images = [{"id": i, "file_name": f"{i}.png", "height": h, "width": w}
              for i, (h, w) in enumerate([(192, 150), (180, 192), (100, 200)])]
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": [],
                                                       "categories": [{"id": 1, "name": "thing"}]}))
    assert COCODetectionDataModule(root=str(root)).img_size == 192  # letterboxed to 192, not the old fixed 512
    cfg = Namespace(
        data=Namespace(class_path="cvtasks.data.detection.COCODetectionDataModule",
                       init_args=Namespace(root=str(root), img_size="auto", img_size_step=32, img_size_min=32)),
        model=Namespace(init_args=Namespace(min_size=None, max_size=None)),
    )
    cli = SimpleNamespace()
    CvtasksCLI._resolve_auto_image_size(cli, cfg)
    CvtasksCLI._follow_image_size(cfg)
    assert cfg.data.init_args.img_size == 192 and "auto: median longer side 192 px" in cli._img_size_note
    assert (cfg.model.init_args.min_size, cfg.model.init_args.max_size) == (192, 192)


def test_voc_folder_size_follows_its_images(tmp_path: Path):
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    for i, (h, w) in enumerate([(120, 160), (130, 150), (90, 60)]):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        save_index_png(np.zeros((h, w), np.uint8), root / "SegmentationClass" / f"{i}.png")
    assert VOCSegmentationDataModule(root=str(root), num_classes=2).img_size == 160


@pytest.mark.parametrize("value", ["big", 8, 16.5, True])
def test_bad_img_size_is_named(tmp_path: Path, value):
    with pytest.raises(ValueError, match=f"img_size must be a whole number of pixels >= 16, or 'auto'.*got {value!r}"):
        ImageFolderDataModule(root=str(_class_folder(tmp_path / "f", [(20, 20)])), img_size=value)


def test_generated_data_has_no_images_to_measure():
    with pytest.raises(ValueError, match="img_size auto measures image files, and ShapesDataModule reads none; give img_size"):
        ShapesDataModule(num_samples=6, img_size="auto")


# -- augmentation presets ------------------------------------------------------------------------------

def _left_bright(h: int = 32, w: int = 32) -> np.ndarray:
    """A left-right asymmetric image: a bright bar in the left third (mirrored, it is on the right)."""
    image = np.zeros((h, w, 3), np.uint8)
    image[4:-4, 3:10] = 250
    return image


def _mirrored(out: torch.Tensor) -> bool:
    grey = out.mean(0)
    return bool(grey[:, 16:].mean() > grey[:, :16].mean())


@pytest.mark.parametrize("name", ["safe", "documents", "digits", "none"])
def test_presets_for_documents_never_mirror(name: str):
    transform = classification_transform(32, True, augmentation=name)
    assert not any(_mirrored(transform(_left_bright())) for _ in range(150))


@pytest.mark.parametrize("name", ["natural", "aerial", "shapes", "alexnet"])
def test_presets_for_photos_and_overhead_views_mirror(name: str):
    transform = classification_transform(32, True, augmentation=name)
    mirrored = sum(_mirrored(transform(_left_bright())) for _ in range(150))
    assert 20 < mirrored < 130


def test_aerial_turns_the_image_every_way():
    image = np.zeros((32, 32, 3), np.uint8)
    image[2:12, 2:12] = 250  # a bright top-left corner
    transform = classification_transform(32, True, augmentation="aerial")
    corners = set()
    for _ in range(100):
        grey = transform(image).mean(0)
        quarters = [grey[:16, :16], grey[:16, 16:], grey[16:, :16], grey[16:, 16:]]
        corners.add(int(np.argmax([q.mean().item() for q in quarters])))
    assert corners == {0, 1, 2, 3}
    safe = classification_transform(32, True, augmentation="safe")
    assert all(int(np.argmax([q.mean().item() for q in (g[:16, :16], g[:16, 16:], g[16:, :16], g[16:, 16:])])) == 0
               for g in (safe(image).mean(0) for _ in range(50)))


def test_every_classification_preset_says_what_it_does():
    from cvtasks.data.classification import describe_augmentation

    for name in AUGMENTATIONS:
        assert len(describe_augmentation(name)) > 30
        assert classification_transform(40, True, augmentation=name)(_left_bright(50, 70)).shape == (3, 40, 40)


def test_detection_and_segmentation_presets_mirror_only_where_asked():
    sample = DetectionSample(_left_bright(64, 64), np.array([[3.0, 4.0, 10.0, 60.0]]), np.array([0]), image_id=0)

    def box_right(name: str) -> int:
        pipeline = detection_transform(64, True, augmentation=name)
        return sum(float(transform_sample(pipeline, sample)[1]["boxes"][:, [0, 2]].mean()) > 32 for _ in range(60))

    assert box_right("safe") == 0 and box_right("none") == 0
    assert box_right("natural") > 5 and box_right("aerial") > 5
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :16] = 1

    def mask_right(name: str) -> int:
        t = segmentation_transforms(64, True, augmentation=name, normalize=False)
        outs = (t(image=_left_bright(64, 64), mask=mask)["mask"] == 1 for _ in range(60))  # 255: a turn's corners
        return sum(int(m[:, 32:].sum() > m[:, :32].sum()) for m in outs)

    assert mask_right("safe") == 0 and mask_right("natural") > 5


def test_unknown_presets_are_named_with_the_choices(tmp_path: Path):
    with pytest.raises(ValueError, match=r"unknown augmentation 'flip'; choose one of \[.*'digits'.*'safe'"):
        ImageFolderDataModule(root=str(_class_folder(tmp_path / "f", [(20, 20)])), augmentation="flip")
    with pytest.raises(ValueError, match=r"unknown augmentation 'documents' for detection and segmentation; choose one of \["):
        detection_transform(64, True, augmentation="documents")


# -- the classical baseline ------------------------------------------------------------------------------

def test_baseline_scores_the_data_modules_test_split(tmp_path: Path, capsys):
    root = _class_folder(tmp_path / "f", [(12, 12)] * 12)
    split = (0.5, 0.25, 0.25)
    dm = ImageFolderDataModule(root=str(root), split=split, seed=3)
    train, val, test = dm.assign_splits()
    # the test images look like the other class: a baseline scored on the data module's test split gets none right
    items = dm.items
    for i in test:
        path, label = items[i]
        other = next(p for p, lab in items if lab != label and items.index((p, lab)) in train)
        Image.open(other).save(path)
    report = baseline.main([str(root), "--split", *map(str, split), "--seed", "3"])
    assert (report["train"], report["val"], report["test"]) == (len(train), len(val), len(test)) == (12, 6, 6)
    assert report["size"] == 12
    for name, r in report["models"].items():
        assert r["val_acc"] == 1.0 and r["test_acc"] == 0.0, name
    out = capsys.readouterr().out
    assert "12 train / 6 val / 6 test images, 2 classes, pixels at 12x12" in out
    assert "a CNN must beat test accuracy 0.0000" in out


def test_baseline_errors_and_the_digits_folder(tmp_path: Path):
    root = _class_folder(tmp_path / "f", [(12, 12)] * 4)
    with pytest.raises(ValueError, match="needs both"):
        baseline.run_baseline(root, split=(1.0, 0.0, 0.0))
    digits = baseline.write_digits_folder(tmp_path / "digits")
    assert sorted(p.name for p in digits.iterdir()) == [str(d) for d in range(10)]
    assert sum(1 for _ in digits.rglob("*.png")) == 1797
    with Image.open(next(digits.rglob("*.png"))) as im:
        assert im.size == (8, 8) and im.mode == "L"
    with pytest.raises(FileExistsError, match="not empty"):
        baseline.write_digits_folder(digits)
