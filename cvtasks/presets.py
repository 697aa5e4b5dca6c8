"""Task presets: the whole-model weights torchvision publishes, loaded into our detectors and segmenters by name.

``--model.pretrained coco`` on the detection tasks and ``--model.pretrained coco_voc`` on semantic
segmentation name a :class:`TaskPreset`: a torchvision model (``fasterrcnn_resnet50_fpn``, ...),
what our model must be built as to take its weights, and how its state_dict maps onto ours. The
table :data:`TASK_PRESETS` has one line per (detector or head, preset name):

- faster_rcnn / mask_rcnn ``coco``: ``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn`` (COCO_V1) on
  resnet50: FPN 256 from stride 4, anchors 32-512 px, a 1024-wide box head, frozen batch norm (eps 0);
- retinanet ``coco``: ``retinanet_resnet50_fpn_v2`` (COCO_V1) on resnet50: FPN 256, P6 from C5,
  torchvision's whole-pixel anchors (v2's GroupNorm head is ours; v1's head has no norm);
- fcos ``coco``: ``fcos_resnet50_fpn`` (COCO_V1) on resnet50: FPN 256, frozen batch norm;
- ssd ``coco``: ``ssd300_vgg16`` (COCO_V1) on vgg16: SSD300's layout at 300 px, its 0-255 normalisation;
- fcn / deeplabv3 ``coco_voc``: ``fcn_resnet50`` / ``deeplabv3_resnet50`` (COCO_WITH_VOC_LABELS_V1, 21
  classes) on resnet50 at output stride 8.

A preset's ``settings`` are what the weights need (the pyramid's width, the anchors, the box head's
width, the normalisation): a setting given otherwise is a ValueError naming it and the value to
use, before anything is built. Its ``defaults`` fill what the user left out: torchvision's own
sampling and test-time numbers, so that the preset reproduces the reference's outputs. The task
records the resolved settings in its hyperparameters, so a checkpoint reloads into the same
structure with ``pretrained=None`` and nothing is fetched again.

Loading (:meth:`TaskPreset.load_into`) reads the checkpoint through torchvision's own builder
(:class:`cvtasks.weights.PublishedWeights`: the cache, offline errors, corrupt files), converts the
backbone's part with the backbone plugin's ``remap_state_dict`` and renames the rest by prefix.
Where the task's class count differs from the checkpoint's, the class-specific layers keep their
fresh initialisation and everything else is loaded; one line reports what was kept and what not.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from torch import Tensor, nn

from .backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone
from .weights import PublishedWeights, url_file_name

__all__ = ["TASK_PRESETS", "TaskPreset", "preset_names", "task_preset"]

#: how SSD300's weights want their images: 0-255 pixel values less the mean, torchvision's
#: ``ssd300_vgg16`` (image_std 1/255 undoes the [0, 1] scaling of the data)
SSD300_MEAN = (0.48235, 0.45882, 0.40784)
SSD300_STD = (1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0)

#: torchvision's R-CNN sampling and test-time numbers (FasterRCNN's defaults), which our small-image
#: defaults replace; a preset restores them so that it reproduces the reference's detections
_TORCHVISION_RCNN = {
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_post_nms_top_n_test": 1000,
    "rpn_batch_size_per_image": 256,
    "box_batch_size_per_image": 512,
    "box_detections_per_img": 100,
}

#: torchvision's RetinaNet anchors: three octaves per level truncated to whole pixels (32, 40, 50, ...)
_RETINANET_ANCHORS = [[x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))] for x in (32, 64, 128, 256, 512)]

_IMAGENET = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}

#: what the FPN detectors' weights need: torchvision's pyramid width, ImageNet's normalisation
_FPN_DETECTOR = {"neck_channels": 256, **_IMAGENET}
_RCNN = {**_FPN_DETECTOR, "roi": "align", "min_stride": 4, "anchor_scale": 8.0, "aspect_ratios": [0.5, 1.0, 2.0],
         "representation_size": 1024, "canonical_scale": 224, "frozen_bn_eps": 0.0}

# torchvision's segmentation heads (classifier / aux_classifier Sequentials) in our names
_AUX_RENAMES = (("aux_classifier.0.", "aux_head.conv.conv."), ("aux_classifier.1.", "aux_head.conv.bn."),
                ("aux_classifier.4.", "aux_head.classifier."))
_DEEPLAB_RENAMES = (
    *((f"classifier.0.convs.{i}.0.", f"head.aspp.branches.{i}.conv.") for i in range(4)),
    *((f"classifier.0.convs.{i}.1.", f"head.aspp.branches.{i}.bn.") for i in range(4)),
    ("classifier.0.convs.4.1.", "head.aspp.branches.4.conv."), ("classifier.0.convs.4.2.", "head.aspp.branches.4.bn."),
    ("classifier.0.project.0.", "head.aspp.project.conv."), ("classifier.0.project.1.", "head.aspp.project.bn."),
    ("classifier.1.", "head.conv.conv."), ("classifier.2.", "head.conv.bn."), ("classifier.4.", "head.classifier."),
    *_AUX_RENAMES,
)
_FCN_RENAMES = (("classifier.0.", "head.conv.conv."), ("classifier.1.", "head.conv.bn."),
                ("classifier.4.", "head.classifier."), *_AUX_RENAMES)
# SSD300: torchvision's extra.0 holds VGG's pool4 and conv5 (its own indices 1, 3, 5 are VGG's 24, 26,
# 28: conv5_1..3) then pool5/fc6/fc7 at index 7; extra.1..4 are conv8..conv11
_SSD_RENAMES = (("backbone.extra.0.7.1.", "backbone.fc6."), ("backbone.extra.0.7.3.", "backbone.fc7."),
                *((f"backbone.extra.{i}.", f"backbone.extras.{i - 1}.") for i in range(1, 5)))


def _fpn_body(key: str) -> str | None:
    """torchvision's detection backbones keep the ResNet under ``backbone.body.`` in its own layout."""
    return key.removeprefix("backbone.body.") if key.startswith("backbone.body.") else None


def _segmentation_body(key: str) -> str | None:
    """torchvision's segmentation models keep the ResNet under ``backbone.`` in its own layout."""
    return key.removeprefix("backbone.") if key.startswith("backbone.") else None


def _ssd_vgg_body(key: str) -> str | None:
    """SSD300's VGG-16 convolutions in torchvision's ``vgg16.features`` indexing (conv1_1..conv4_3, conv5_1..3)."""
    if key.startswith("backbone.features."):
        return key.removeprefix("backbone.")
    if key.startswith("backbone.extra.0."):
        index, _, rest = key.removeprefix("backbone.extra.0.").partition(".")
        if index in ("1", "3", "5"):
            return f"features.{23 + int(index)}.{rest}"  # pool4 sits at VGG's index 23
    return None


def _same(a: Any, b: Any) -> bool:
    """Equal settings, lists and tuples alike (YAML gives lists), numbers by value."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def _say(line: str) -> None:
    """Print on the first process only (each process of a DDP run builds the task)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only  # imported here: `make weights` needs no Lightning

    rank_zero_only(print)(line)


@dataclass(frozen=True)
class TaskPreset:
    """One published task model: what it is, what our model must be to take it, how its keys map to ours.

    ``model`` is a DETECTOR= or HEAD= name and ``name`` what ``--model.pretrained`` says;
    ``reference``/``weights_name`` name torchvision's builder and weights enum member.
    ``num_classes`` counts the checkpoint's classes as our task does (COCO's 91 outputs with
    background are 90 classes for the softmax detectors, 91 for the sigmoid ones). ``settings``
    must hold (checked), ``defaults`` are filled in where not given. ``body`` gives a torchvision
    key's name in the backbone reference's own layout (None outside the backbone); ``renames`` are
    prefix renames for the other keys (unlisted keys keep their names). ``class_specific`` and
    ``optional`` are prefixes of our keys: re-initialised for another class count, and parts of
    the checkpoint our model builds only on request (``optional_note`` says how).
    """

    model: str
    name: str
    reference: str
    weights_name: str
    backbone: str
    num_classes: int
    settings: Mapping[str, Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    body: Callable[[str], str | None] = _fpn_body
    renames: Sequence[tuple[str, str]] = ()
    class_specific: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    optional_note: str = ""
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def key(self) -> str:
        """The name ``make weights`` takes: ``<model>:<preset>``, e.g. ``faster_rcnn:coco``."""
        return f"{self.model}:{self.name}"

    @property
    def title(self) -> str:
        """How reports and errors name the weights: ``coco (fasterrcnn_resnet50_fpn COCO_V1)``."""
        return f"{self.name} ({self.reference} {self.weights_name})"

    @property
    def weights(self) -> PublishedWeights:
        """The published file: torchvision's URL, cached under its own name, read by torchvision's builder."""
        tv = importlib.import_module("torchvision.models")
        url = tv.get_model_weights(self.reference)[self.weights_name].url
        return PublishedWeights(f"torchvision:{self.reference}", url, url_file_name(url), self.mean, self.std,
                                hint=f"make weights NAME={self.key}")

    def check_backbone(self, backbone: str) -> None:
        """Raise a ValueError naming the setting unless the task's backbone is the one the weights hold."""
        if backbone != self.backbone:
            raise ValueError(
                f"pretrained {self.title} holds a {self.backbone} backbone, but the task's backbone is {backbone!r}: "
                f"set --model.backbone {self.backbone} (make: BACKBONE={self.backbone}) or choose other weights"
            )

    def configure(self, given: Mapping[str, Any], *, own: Sequence[str] = (), kwargs_flag: str = "") -> dict[str, Any]:
        """The settings to build with: ``given`` (None = not given) checked against what the weights need, defaults added.

        ``own`` names the settings that are the task's own arguments (``--model.<name>``); the others
        live in ``kwargs_flag`` (``--model.detector_kwargs``, ``--model.head_kwargs``).
        """
        for key, need in self.settings.items():
            have = given.get(key)
            if have is not None and not _same(have, need):
                fix = (f"set --model.{key} {need} or leave it out" if key in own
                       else f"drop {key} from {kwargs_flag} or set it to {need}")
                raise ValueError(
                    f"pretrained {self.title} for {self.model} needs {key}={need!r}, but it is {have!r}: {fix}"
                )
        chosen = {k: v for k, v in given.items() if v is not None}
        return {**self.defaults, **chosen, **self.settings}

    def remap(self, model: nn.Module, reference: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's state_dict in ``model``'s names: the backbone through its plugin, the rest by prefix."""
        path, body = next((n, m) for n, m in model.named_modules() if isinstance(m, Backbone))
        body_sd, rest = {}, {}
        for key, value in reference.items():
            inner = self.body(key)
            if inner is None:
                rest[key] = value
            else:
                body_sd[inner] = value
        # the plugin maps its reference's classifier layout onto ours (backbone.*), as for imagenet
        converted = type(body).remap_state_dict(body_sd)
        converted = body.adapt_state_dict({k.removeprefix("backbone."): v for k, v in converted.items()
                                           if k.startswith("backbone.")})
        out = {f"{path}.{k}": v for k, v in converted.items()}
        for key, value in rest.items():
            old, new = next(((o, n) for o, n in self.renames if key.startswith(o)), ("", ""))
            out[new + key[len(old):]] = value
        return out

    def load_into(self, model: nn.Module, num_classes: int, reference: Mapping[str, Tensor] | None = None) -> str:
        """Load the weights into ``model`` (built with :meth:`configure`'s settings); print and return the report line.

        ``reference``: the weights' state_dict in torchvision's layout when already read (the
        tasks read it before building, so that a missing or corrupt file fails first); by default
        ``self.weights.state_dict()``. With another class count the ``class_specific`` layers keep
        their initialisation. Any other key the two do not share, or a shape that differs, is a
        ValueError naming it.
        """
        mapped = self.remap(model, self.weights.state_dict() if reference is None else reference)
        own = model.state_dict()
        # frozen batch norm keeps no batch count: neither side needs the other's
        mapped = {k: v for k, v in mapped.items() if k in own or not k.endswith("num_batches_tracked")}
        unused = sorted(k for k in mapped if k not in own and k.startswith(self.optional))
        other_classes = num_classes != self.num_classes
        fresh = sorted(k for k in mapped if other_classes and k in own and k.startswith(self.class_specific))
        unexpected = [k for k in mapped if k not in own and k not in unused]
        missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
        mismatched = [k for k in mapped if k in own and k not in fresh and mapped[k].shape != own[k].shape]
        if unexpected or missing or mismatched:
            detail = []
            if mismatched:
                k = mismatched[0]
                detail.append(f"{k} is {tuple(mapped[k].shape)} in the weights but {tuple(own[k].shape)} in the model")
            if missing:
                detail.append(f"the weights lack {len(missing)} of the model's tensors, e.g. {missing[:3]}")
            if unexpected:
                detail.append(f"the model lacks {len(unexpected)} of the weights' tensors, e.g. {unexpected[:3]}")
            settings = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
            raise ValueError(
                f"pretrained {self.title} does not fit this {self.model}: {'; '.join(detail)}. The weights need backbone "
                f"{self.backbone!r} with its default backbone_kwargs and {settings}"
            )
        kept = {k: v for k, v in mapped.items() if k in own and k not in fresh}
        model.load_state_dict(kept, strict=False)
        line = f"pretrained {self.title}: kept {len(kept)} tensors"
        if fresh:
            line += f"; re-initialised {len(fresh)} class-specific ones for {num_classes} classes: {', '.join(fresh)}"
        else:
            line += f" (all, {num_classes} classes as the checkpoint)"
        if unused:
            parts = ", ".join(sorted({k.split(".")[0] for k in unused}))
            line += f"; not used: {len(unused)} tensors of {parts} ({self.optional_note})"
        _say(line)
        return line


_R_CNN_CLASS_SPECIFIC = ("roi_heads.box_predictor.",)
_SEG_CLASS_SPECIFIC = ("head.classifier.", "aux_head.classifier.")
_AUX_NOTE = "the auxiliary head on layer3: aux_loss_weight > 0 builds it"

_PRESETS = (
    TaskPreset("faster_rcnn", "coco", "fasterrcnn_resnet50_fpn", "COCO_V1", "resnet50", 90, _RCNN,
               _TORCHVISION_RCNN, class_specific=_R_CNN_CLASS_SPECIFIC),
    TaskPreset("mask_rcnn", "coco", "maskrcnn_resnet50_fpn", "COCO_V1", "resnet50", 90, {**_RCNN, "mask_layers": 4},
               _TORCHVISION_RCNN, class_specific=(*_R_CNN_CLASS_SPECIFIC, "roi_heads.mask_predictor.mask_fcn_logits.")),
    # v2, not v1: its GroupNorm head is ours; its P6 comes from C5 (p6_from), v1's head has no norm at all
    TaskPreset("retinanet", "coco", "retinanet_resnet50_fpn_v2", "COCO_V1", "resnet50", 91,
               {**_FPN_DETECTOR, "min_stride": 8, "p6_from": "c5", "anchor_sizes": _RETINANET_ANCHORS,
                "aspect_ratios": [0.5, 1.0, 2.0]},
               {"box_loss": "giou"}, class_specific=("head.classification_head.cls_logits.",)),
    TaskPreset("fcos", "coco", "fcos_resnet50_fpn", "COCO_V1", "resnet50", 91,
               {**_FPN_DETECTOR, "min_stride": 8, "p6_from": "p5", "anchor_scale": 1.0, "num_convs": 4,
                "frozen_bn_eps": 1e-5},
               {"score_thresh": 0.2}, class_specific=("head.classification_head.cls_logits.",)),
    TaskPreset("ssd", "coco", "ssd300_vgg16", "COCO_V1", "vgg16", 90,
               {"layout": "ssd300", "min_size": 300, "image_mean": list(SSD300_MEAN), "image_std": list(SSD300_STD)},
               body=_ssd_vgg_body, renames=_SSD_RENAMES, class_specific=("head.classification_head.",),
               mean=SSD300_MEAN, std=SSD300_STD),
    TaskPreset("fcn", "coco_voc", "fcn_resnet50", "COCO_WITH_VOC_LABELS_V1", "resnet50", 21, {}, {"output_stride": 8},
               body=_segmentation_body, renames=_FCN_RENAMES, class_specific=_SEG_CLASS_SPECIFIC,
               optional=("aux_head.",), optional_note=_AUX_NOTE),
    TaskPreset("deeplabv3", "coco_voc", "deeplabv3_resnet50", "COCO_WITH_VOC_LABELS_V1", "resnet50", 21,
               {"channels": 256, "rates": [6, 12, 18]}, {"output_stride": 8},
               body=_segmentation_body, renames=_DEEPLAB_RENAMES, class_specific=_SEG_CLASS_SPECIFIC,
               optional=("aux_head.",), optional_note=_AUX_NOTE),
)
#: one entry per (detector or head, preset name)
TASK_PRESETS: dict[tuple[str, str], TaskPreset] = {(p.model, p.name): p for p in _PRESETS}


def preset_names() -> list[str]:
    """Every ``<model>:<preset>`` name (what ``make weights NAME=`` takes), in table order."""
    return [p.key for p in TASK_PRESETS.values()]


def task_preset(pretrained: str | None, model: str) -> TaskPreset | None:
    """The preset ``pretrained`` names for detector or head ``model``; None where it is no preset name (imagenet, a file).

    A preset name without weights for ``model`` is a ValueError naming the models that have them.
    """
    if pretrained is None or str(pretrained) not in {name for _, name in TASK_PRESETS}:
        return None
    found = TASK_PRESETS.get((model, str(pretrained)))
    if found is None:
        having = [m for m, name in TASK_PRESETS if name == pretrained]
        raise ValueError(
            f"pretrained {pretrained!r} names published task weights, which torchvision has for {', '.join(having)}, "
            f"not for {model!r}: choose one of those, or give the backbone's weights (imagenet, a URL or a file)"
        )
    return found
