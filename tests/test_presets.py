"""Task presets: torchvision's published detectors and segmenters loaded whole into our models, by name.

Sockets are blocked: the cache is pre-filled with each reference's state_dict, random but seeded
(batch-norm statistics included, so that the mapping of every tensor shows in the outputs), saved
under the real URL's file name. The reference is then built by torchvision's own loading code
from that file, at the same small image size as ours, and the two must give the same outputs.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path
from typing import Any, Iterator

import lightning
import pytest
import torch
from torchvision.models import get_model

from cvtasks.backbone import backbone_normalization
from cvtasks.commands import weights as weights_command
from cvtasks.presets import TASK_PRESETS, TaskPreset, preset_names
from cvtasks.tasks.detection import DetectionTask, InstanceSegmentationTask
from cvtasks.tasks.segmentation import SemanticSegmentationTask
from cvtasks.weights import WeightsUnavailableError, torch_home

pytestmark = pytest.mark.disable_socket

PRESETS = list(TASK_PRESETS.values())
#: the image side both detectors resize to (SSD300's layout is made for 300)
SIDE = {"ssd": 300}
#: test-time settings given to both sides: fewer masks to paste keeps Mask R-CNN quick
SHARED = {"mask_rcnn": {"box_detections_per_img": 20}}


def _segmenter(preset: TaskPreset) -> bool:
    return preset.name == "coco_voc"


def _random_state(preset: TaskPreset) -> dict[str, torch.Tensor]:
    """The reference's state_dict with seeded random values: He-scaled weights, spread batch-norm statistics."""
    extra = {"aux_loss": True} if _segmenter(preset) else {}  # the published segmenters carry their aux head
    with torch.device("meta"):  # shapes only: no time spent initialising what is overwritten
        shapes = get_model(preset.reference, weights=None, weights_backbone=None, **extra).state_dict()
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, meta in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(meta.shape, generator=g) + 0.5
        elif meta.dim() >= 2:
            state[key] = torch.randn(meta.shape, generator=g) / math.sqrt(meta[0].numel())
        elif key.endswith("weight"):
            state[key] = torch.rand(meta.shape, generator=g) + 0.5
        else:  # biases, running means, SSD's L2 scale
            state[key] = torch.randn(meta.shape, generator=g) * 0.1
    return state


def _task(preset: TaskPreset, num_classes: int, **kw: Any) -> Any:
    """Our task with ``pretrained=<preset>``, at the test's image size."""
    if _segmenter(preset):
        return SemanticSegmentationTask(head=preset.model, backbone=preset.backbone, pretrained=preset.name,
                                        num_classes=num_classes, **kw)
    cls = InstanceSegmentationTask if preset.model == "mask_rcnn" else DetectionTask
    side = SIDE.get(preset.model, 128)
    return cls(detector=preset.model, backbone=preset.backbone, pretrained=preset.name, num_classes=num_classes,
               min_size=side, max_size=side, detector_kwargs=SHARED.get(preset.model), **kw)


def _outputs(preset: TaskPreset, model: Any) -> list[dict[str, torch.Tensor]]:
    """A detector's detections or a segmenter's scores (main and auxiliary) on the same two images."""
    torch.manual_seed(5)
    with torch.no_grad():
        if _segmenter(preset):
            x = torch.randn(2, 3, 72, 88)
            if hasattr(model, "forward_all"):  # ours: main and auxiliary scores
                out, aux = model.forward_all(x)
                return [{"out": out, "aux": aux}]
            return [dict(model(x))]  # torchvision's: {"out", "aux"}
        images = [torch.rand(3, 96, 128), torch.rand(3, 128, 112)]
        return model(images[:1] if preset.model == "ssd" else images)  # SSD300 runs at 300 px: one image


@pytest.fixture(scope="module")
def threads() -> Iterator[None]:
    """One intra-op thread: two contended cores run these nets many times slower with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=PRESETS, ids=lambda p: p.key)
def published(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, threads: None
) -> Iterator[dict[str, Any]]:
    """A cache holding one preset's file; the reference read back from it; our task with the checkpoint's class count."""
    preset: TaskPreset = request.param
    with torch_home(tmp_path_factory.mktemp("torch")):
        preset.weights.put(_random_state(preset))
        side = SIDE.get(preset.model, 128)
        builder = {} if _segmenter(preset) or preset.model == "ssd" else {"min_size": side, "max_size": side}
        reference = preset.weights.load_reference(**builder, **SHARED.get(preset.model, {}))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            ours = _task(preset, preset.num_classes, **({"aux_loss_weight": 0.4} if _segmenter(preset) else {})).eval()
        yield {"preset": preset, "ours": ours, "report": printed.getvalue().strip(),
               "expected": _outputs(preset, reference), "got": _outputs(preset, ours.model)}
        preset.weights.path.unlink()  # 100-250 MB each


def test_preset_reproduces_the_reference(published: dict[str, Any]) -> None:
    preset, ours = published["preset"], published["ours"]
    model = ours.model if _segmenter(preset) else ours.model.model
    # every tensor of ours comes from the file (the auxiliary head included: aux_loss_weight > 0)
    assert published["report"] == (f"pretrained {preset.name} ({preset.reference} {preset.weights_name}): kept "
                                   f"{len(model.state_dict())} tensors (all, {preset.num_classes} classes as the checkpoint)")
    expected, got = published["expected"], published["got"]
    assert len(got) == len(expected)
    for want, have in zip(expected, got):
        if not _segmenter(preset):
            assert len(want["scores"]) > 0, "the random weights must give detections to compare"
            have = {**have, "labels": have["labels"] + ours.model.label_offset}  # ours are 0-based, no background
        assert sorted(have) == sorted(want)
        for key in want:
            torch.testing.assert_close(have[key], want[key], msg=f"{preset.key}: {key}")


def test_the_normalisation_follows_the_weights(published: dict[str, Any]) -> None:
    preset, ours = published["preset"], published["ours"]
    if _segmenter(preset):
        # the data normalises with the backbone's spec (the CLI links it): what these weights expect
        assert backbone_normalization(preset.backbone) == (pytest.approx(preset.mean), pytest.approx(preset.std))
    else:  # the detectors normalise inside, for training, evaluation, predict and export alike
        transform = ours.model.model.transform
        assert transform.image_mean == pytest.approx(list(preset.mean))
        assert transform.image_std == pytest.approx(list(preset.std))
    if preset.model == "ssd":
        assert transform.image_std[0] == pytest.approx(1 / 255)  # SSD300's 0-255 scale


def test_another_class_count_keeps_all_but_the_class_specific_layers(
    published: dict[str, Any], capsys: pytest.CaptureFixture
) -> None:
    preset, full = published["preset"], published["ours"]
    three = _task(preset, 3)
    report = capsys.readouterr().out.strip().splitlines()[-1]
    fresh = report.split(" for 3 classes: ")[1].split(";")[0].split(", ")
    assert fresh and all(k.startswith(preset.class_specific) for k in fresh), report
    assert report.startswith(f"pretrained {preset.name} ({preset.reference} {preset.weights_name}): kept ")
    model = three.model if _segmenter(preset) else three.model.model
    reference = full.model if _segmenter(preset) else full.model.model
    theirs = reference.state_dict()
    kept = 0
    for key, value in model.state_dict().items():
        if key in fresh:
            assert value.shape != theirs[key].shape, key
        elif key in theirs:
            torch.testing.assert_close(value, theirs[key], msg=key)
            kept += 1
    assert f"kept {kept} tensors" in report
    if _segmenter(preset):  # no auxiliary loss asked for: its head is not built, and the report says so
        assert re.search(r"not used: \d+ tensors of aux_head \(.*aux_loss_weight > 0", report), report


def test_a_checkpoint_reloads_without_fetching(published: dict[str, Any], tmp_path: Path) -> None:
    """The task records what the preset configured, so the checkpoint alone rebuilds the same model."""
    preset, ours = published["preset"], published["ours"]
    path = tmp_path / "best.ckpt"
    torch.save({"state_dict": ours.state_dict(), "hyper_parameters": dict(ours.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    with torch_home(tmp_path / "empty"):  # nothing cached, no network: the checkpoint must need neither
        again = type(ours).load_from_checkpoint(path, map_location="cpu", pretrained=None).eval()
    for want, have in zip(published["got"], _outputs(preset, again.model)):
        for key in want:
            torch.testing.assert_close(have[key], want[key])


def test_settings_the_weights_cannot_take_are_named_with_the_fix() -> None:
    def detection(**kw: Any) -> None:
        DetectionTask(**{"detector": "faster_rcnn", "backbone": "resnet50", "pretrained": "coco", "num_classes": 3,
                         "min_size": 128, **kw})

    with pytest.raises(ValueError, match=r"resnet50 backbone, but the task's backbone is 'resnet18': set --model.backbone resnet50"):
        detection(backbone="resnet18")
    with pytest.raises(ValueError, match=r"needs neck_channels=256, but it is 128: set --model.neck_channels 256"):
        detection(neck_channels=128)
    with pytest.raises(ValueError, match=r"needs representation_size=1024, but it is 256: drop representation_size from --model.detector_kwargs"):
        detection(detector_kwargs={"representation_size": 256})
    with pytest.raises(ValueError, match=r"needs roi='align', but it is 'pool'"):
        detection(roi="pool")
    with pytest.raises(ValueError, match=r"ssd300_vgg16.*needs min_size=300, but it is 128: set --model.min_size 300"):
        detection(detector="ssd", backbone="vgg16")
    with pytest.raises(ValueError, match=r"needs p6_from='c5'"):
        detection(detector="retinanet", detector_kwargs={"p6_from": "p5"})
    with pytest.raises(ValueError, match=r"torchvision has for faster_rcnn, mask_rcnn, retinanet, fcos, ssd, not for 'yolo'"):
        detection(detector="yolo")
    with pytest.raises(ValueError, match=r"needs channels=256, but it is 128: drop channels from --model.head_kwargs"):
        SemanticSegmentationTask(head="deeplabv3", backbone="resnet50", pretrained="coco_voc", num_classes=3,
                                 head_kwargs={"channels": 128})
    with pytest.raises(ValueError, match=r"'coco_voc'.*fcn, deeplabv3, not for 'fcn8s'"):
        SemanticSegmentationTask(head="fcn8s", backbone="resnet50", pretrained="coco_voc", num_classes=3)


@pytest.mark.filterwarnings("ignore:A test tried to use socket")
def test_missing_or_corrupt_files_are_named(tmp_path: Path) -> None:
    preset = TASK_PRESETS[("faster_rcnn", "coco")]
    with torch_home(tmp_path):
        with pytest.raises(WeightsUnavailableError) as missing:  # no network here, nothing cached
            DetectionTask(detector="faster_rcnn", backbone="resnet50", pretrained="coco", num_classes=3, min_size=128)
        message = str(missing.value)
        assert preset.weights.url in message and str(preset.weights.path) in message
        assert "make weights NAME=faster_rcnn:coco" in message
        preset.weights.path.write_bytes(b"not a checkpoint")
        with pytest.raises(ValueError, match=rf"{preset.weights.path}.*corrupt.*make weights NAME=faster_rcnn:coco"):
            DetectionTask(detector="faster_rcnn", backbone="resnet50", pretrained="coco", num_classes=3, min_size=128)


@pytest.fixture(scope="module")
def fcos_cache(tmp_path_factory: pytest.TempPathFactory, threads: None) -> Iterator[Path]:
    """A cache holding FCOS's file (the cheapest reference to build), for the tests that need any one preset."""
    with torch_home(tmp_path_factory.mktemp("fcos")):
        yield TASK_PRESETS[("fcos", "coco")].weights.put(_random_state(TASK_PRESETS[("fcos", "coco")]))


def test_make_weights_takes_the_preset_names(fcos_cache: Path, capsys: pytest.CaptureFixture) -> None:
    assert preset_names() == ["faster_rcnn:coco", "mask_rcnn:coco", "retinanet:coco", "fcos:coco", "ssd:coco",
                              "fcn:coco_voc", "deeplabv3:coco_voc"]
    found = weights_command.published("ssd:coco")
    assert found.url == "https://download.pytorch.org/models/ssd300_vgg16_coco-b556d3b4.pth"
    assert found.file_name == "ssd300_vgg16_coco-b556d3b4.pth" and found.hint == "make weights NAME=ssd:coco"
    with pytest.raises(ValueError, match=r"no task preset 'ssd:voc'; the task presets are: faster_rcnn:coco "):
        weights_command.published("ssd:voc")
    assert weights_command.main(["fcos:coco"]) == 0
    assert f"fcos:coco: already cached {fcos_cache}" in capsys.readouterr().out


def test_a_structure_no_setting_names_is_named_by_its_tensor(fcos_cache: Path) -> None:
    # a one-channel stem cannot take the RGB stem's weights: the loader names the tensor and the settings
    with pytest.raises(ValueError, match=r"does not fit this fcos: backbone.body.stages.stem.conv.weight is \(64, 3, 7, 7\) "
                                         r"in the weights but \(64, 1, 7, 7\) in the model.*default backbone_kwargs"):
        DetectionTask(detector="fcos", backbone="resnet50", pretrained="coco", num_classes=3, min_size=128,
                      backbone_kwargs={"in_chans": 1})
