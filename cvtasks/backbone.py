"""The backbone contract: named multi-scale features with declared channels and strides."""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .layers import check_input_side
from .registry import get_backbone_entry

__all__ = [
    "FeatureInfo",
    "Backbone",
    "StagedBackbone",
    "Classifier",
    "GlobalPoolLinear",
    "create_classifier",
    "load_state_dict_file",
    "adapt_input_conv",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FeatureInfo:
    """One output level of a backbone: its name, channel count and stride (reduction from the input)."""

    name: str
    channels: int
    stride: int


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state_dict saved with torch.save (bare, or under 'state_dict'/'model'/'module')."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"pretrained weights file {str(p)!r} does not exist; pass a local file holding the "
            f"reference model's state_dict (torch.save(model.state_dict(), path))"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read pretrained weights from {str(p)!r}: {exc}") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{str(p)!r} does not hold a state_dict (a mapping of names to tensors)")
    # checkpoints of wrapped models carry a prefix on every key
    keys = list(obj)
    for prefix in ("module.", "model."):
        if keys and all(k.startswith(prefix) for k in keys):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return dict(obj)


def adapt_input_conv(weight: Tensor, in_chans: int) -> Tensor:
    """Fit a first-conv weight made for 3 channels to ``in_chans`` (sum for 1, tiled and rescaled else)."""
    c = weight.shape[1]
    if in_chans == c:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // c)
    tiled = weight.repeat(1, reps, 1, 1)[:, :in_chans]
    return tiled * (c / in_chans)


class Backbone(nn.Module):
    """Base class of registry backbones.

    Subclasses set ``self.feature_info`` (fine to coarse) and return from ``forward`` a dict of
    those names to feature maps, in that order. Class attributes describe how the reference
    implementation's state_dict maps onto ours (see ``remap_state_dict``).
    """

    feature_info: list[FeatureInfo]
    # TorchScript compiles properties; these are Python-side descriptions only
    __jit_unused_properties__ = ["feature_names", "out_channels"]
    __jit_ignored_attributes__ = ["feature_info", "supported_output_strides", "output_stride"]
    #: keys of the reference state_dict that belong to the classifier head (prefixes)
    head_prefixes: tuple[str, ...] = ("fc.",)
    #: our key of the first convolution's weight (adapted when in_chans != 3)
    first_conv: str | None = None
    #: normalisation the reference weights expect
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    #: whether the net was built with an output_stride other than 32 (by dilation)
    output_stride: int = 32

    @property
    def feature_names(self) -> list[str]:
        """Names of the output levels, fine to coarse."""
        return [f.name for f in self.feature_info]

    @property
    def out_channels(self) -> int:
        """Channels of the coarsest level."""
        return self.feature_info[-1].channels

    def feature(self, name: str) -> FeatureInfo:
        """The declared level called ``name``."""
        for f in self.feature_info:
            if f.name == name:
                return f
        raise KeyError(f"{type(self).__name__} has no feature level {name!r}; it has {self.feature_names}")

    def forward_head_features(self, x: Tensor) -> dict[str, Tensor]:
        """What the classification head consumes: the features dict, plus whatever else the family's head reads."""
        return self(x)

    def build_head(self, num_classes: int, dropout: float = 0.0) -> nn.Module:
        """The net's own classifier head; the default is global average pooling and a linear layer."""
        last = self.feature_info[-1]
        return GlobalPoolLinear(last.name, last.channels, num_classes, dropout=dropout)

    @classmethod
    def remap_state_dict(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Map the reference's state_dict to the Classifier layout ('backbone.*' and 'head.*').

        The default keeps names and files keys under ``head_prefixes`` into the head; a family
        whose layout differs from its reference overrides this.
        """
        out: dict[str, Tensor] = {}
        for k, v in state_dict.items():
            if any(k.startswith(p) for p in cls.head_prefixes):
                out["head." + k] = v
            else:
                out["backbone." + k] = v
        return out

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Fit a state_dict in our layout to this instance (e.g. ViT resizes its position embedding)."""
        return state_dict

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Load a local file holding the reference implementation's state_dict into this backbone."""
        raw = load_state_dict_file(path)
        own = self.state_dict()
        if set(raw) == set(own) or all(k.startswith("backbone.") for k in raw):
            # already our layout: a backbone's own state_dict, or a Classifier's
            sd = {k.removeprefix("backbone."): v for k, v in raw.items() if k.startswith("backbone.") or k in own}
        else:
            sd = self.remap_state_dict(raw)
            sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
        _load_adapted(self, self.adapt_state_dict(sd), self.first_conv, path)


def _load_adapted(module: nn.Module, sd: dict[str, Tensor], first_conv: str | None, path: Any) -> None:
    """load_state_dict with the first conv adapted to the input channels and unused keys dropped."""
    own = module.state_dict()
    if first_conv and first_conv in sd and first_conv in own:
        sd[first_conv] = adapt_input_conv(sd[first_conv], own[first_conv].shape[1])
    # a backbone truncated by out_features, or built at another output_stride, lacks some keys
    unexpected = [k for k in sd if k not in own]
    for k in unexpected:
        del sd[k]
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    mismatched = [k for k in sd if sd[k].shape != own[k].shape]
    if missing or mismatched:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} keys, e.g. {missing[:3]}")
        if mismatched:
            k = mismatched[0]
            detail.append(f"shape mismatch at {k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}")
        raise ValueError(
            f"pretrained weights in {str(path)!r} do not fit {type(module).__name__}: "
            f"{'; '.join(detail)}. Is the file the reference model of the same variant?"
        )
    module.load_state_dict(sd, strict=False)


class StagedBackbone(Backbone):
    """A backbone that is a chain of named stages, some of whose outputs are feature levels.

    Stages after the deepest requested level are never built into the forward pass
    (``out_features`` selects levels), which is how detection asks for only what it needs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleDict()
        self._level_of_stage: dict[str, str] = {}
        self.net_name = type(self).__name__
        self.min_side = 0  # nets with unpadded layers set it (layers.min_input_side): smaller inputs are refused

    def _finish(self, levels: Sequence[tuple[str, str, int, int]], out_features: Iterable[str] | None) -> None:
        """Declare levels as (stage, feature name, channels, stride) and keep only what is asked for."""
        all_info = [FeatureInfo(name, ch, st) for _, name, ch, st in levels]
        names = [f.name for f in all_info]
        wanted = list(out_features) if out_features is not None else names
        bad = [n for n in wanted if n not in names]
        if bad:
            raise ValueError(f"{type(self).__name__} has no feature levels {bad}; valid names are {names}")
        self.feature_info = [f for f in all_info if f.name in wanted]
        stage_of = {name: stage for stage, name, _, _ in levels}
        self._level_of_stage = {stage_of[f.name]: f.name for f in self.feature_info}
        order = list(self.stages)
        last = max(order.index(stage_of[n]) for n in wanted)
        for name in order[last + 1 :]:
            del self.stages[name]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self.min_side > 0:
            check_input_side(self.net_name, x, self.min_side)
        out: dict[str, Tensor] = OrderedDict()
        for stage_name, stage in self.stages.items():
            x = stage(x)
            level = self._level_of_stage.get(stage_name)
            if level is not None:
                out[level] = x
        return out


class GlobalPoolLinear(nn.Module):
    """Global average pooling of one level followed by (dropout and) a linear layer named ``fc``."""

    def __init__(self, feature: str, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.feature = feature
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, feats: dict[str, Tensor]) -> Tensor:
        x = feats[self.feature]
        x = torch.flatten(x.mean(dim=(2, 3)) if x.dim() == 4 else x, 1)
        return self.fc(self.dropout(x))


class Classifier(nn.Module):
    """A backbone and its classification head: images in, logits out."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone.forward_head_features(x))

    def load_pretrained(self, path: str | os.PathLike, with_head: bool = True) -> None:
        """Load the reference's full state_dict; the head only if ``with_head`` and shapes agree."""
        raw = load_state_dict_file(path)
        own = self.state_dict()
        ours = all(k.startswith(("backbone.", "head.")) for k in raw)
        sd = dict(raw) if ours else type(self.backbone).remap_state_dict(raw)
        backbone_sd = self.backbone.adapt_state_dict({k[9:]: v for k, v in sd.items() if k.startswith("backbone.")})
        sd = {**{f"backbone.{k}": v for k, v in backbone_sd.items()}, **{k: v for k, v in sd.items() if k.startswith("head.")}}
        head_keys = [k for k in sd if k.startswith("head.")]
        # a file without head keys (a features-only checkpoint) keeps the model's own head
        head_fits = with_head and bool(head_keys) and all(k in own and own[k].shape == sd[k].shape for k in head_keys)
        if not head_fits:
            sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
            own_head = {k: v for k, v in own.items() if k.startswith("head.")}
            sd.update(own_head)
        first = f"backbone.{self.backbone.first_conv}" if self.backbone.first_conv else None
        _load_adapted(self, sd, first, path)


def create_classifier(
    name: str,
    num_classes: int,
    *,
    pretrained: str | os.PathLike | None = None,
    dropout: float | None = None,
    **kwargs: Any,
) -> Classifier:
    """Build backbone ``name`` with its documented classification head for ``num_classes``.

    ``pretrained`` loads the reference implementation's full state_dict (head included when
    ``num_classes`` matches the file's).
    """
    backbone = get_backbone_entry(name).build(**kwargs)
    head = backbone.build_head(num_classes) if dropout is None else backbone.build_head(num_classes, dropout=dropout)
    model = Classifier(backbone, head)
    if pretrained is not None:
        model.load_pretrained(pretrained)
    return model
