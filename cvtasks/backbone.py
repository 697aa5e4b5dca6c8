"""The backbone contract: named multi-scale features with declared channels and strides."""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence, Union

import torch
from torch import Tensor, nn

from .layers import SUPPORTED_OUTPUT_STRIDES, SpatialPyramidPooling, check_input_side
from .registry import get_backbone_entry, list_backbones
from .weights import backbone_weights, read_weights_file, weights_from_checkpoint

__all__ = [
    "FeatureInfo",
    "BackboneSpec",
    "BackboneRequest",
    "Normalization",
    "backbone_normalization",
    "Backbone",
    "StagedBackbone",
    "Classifier",
    "GlobalPoolLinear",
    "SpatialPyramidLinear",
    "CLASSIFICATION_HEADS",
    "create_classifier",
    "load_state_dict_file",
    "adapt_input_conv",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: timm's IMAGENET_INCEPTION_MEAN/STD: inputs scaled to [-1, 1] (Inception, Xception, timm's ResNetV2 and ViTs)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class FeatureInfo:
    """One output level of a backbone: its name, channel count and stride (reduction from the input)."""

    name: str
    channels: int
    stride: int


class Normalization(NamedTuple):
    """The per-channel mean and std (of pixels in [0, 1]) that a backbone's published weights expect."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class BackboneRequest:
    """What a head (or detector) asks of a backbone, declared beside it and checked before the backbone is built.

    ``output_stride``: the coarsest stride it wants, by dilation (DeepLabV3 asks for 16). Unless
    ``strict``, a backbone that cannot give it is built at its own stride, with a warning.
    ``pool_indices``: it reads the encoder's max-pool indices (the SegNet-like unpool decoder).
    """

    output_stride: int | None = None
    strict: bool = False
    pool_indices: bool = False

    def __post_init__(self) -> None:
        if self.output_stride is not None and self.output_stride not in SUPPORTED_OUTPUT_STRIDES:
            raise ValueError(
                f"output_stride={self.output_stride!r} cannot be asked of a backbone; ask for one of "
                f"{SUPPORTED_OUTPUT_STRIDES} (8 and 16 by dilation)"
            )


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone can do: declared once by its class (``spec = BackboneSpec(...)``), checked when it is built.

    - ``supported_output_strides``: the coarsest strides it can be built at (its ``output_stride``
      keyword); its own stride alone when the family does not dilate, e.g. ``(8, 16, 32)`` else.
    - ``min_input_size``: the smallest square input side at which every declared level is
      meaningful (its map size within 1.5x of input/stride); predict pads smaller images to it.
    - ``mean``/``std``: the normalisation its published weights expect (ImageNet's by default;
      timm's Inception-style weights expect 0.5/0.5, i.e. inputs in [-1, 1]).
    - ``exposes_pool_indices``: it has ``forward_with_pool_indices(x)`` (features and max-pool indices).

    A registration may change fields for one variant (``register_backbone(..., spec={...})``), and a
    family whose capabilities follow its keywords overrides ``Backbone.spec_for``.
    """

    supported_output_strides: tuple[int, ...] = (32,)
    min_input_size: int = 32
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    exposes_pool_indices: bool = False

    def __post_init__(self) -> None:
        # lists (from YAML or a plugin) become tuples, so that specs compare equal and hash
        for name in ("supported_output_strides", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        strides = self.supported_output_strides
        if not strides or any(not isinstance(s, int) or s < 1 for s in strides):
            raise ValueError(f"BackboneSpec.supported_output_strides must be positive integers, got {strides}")
        if not isinstance(self.min_input_size, int) or self.min_input_size < 1:
            raise ValueError(f"BackboneSpec.min_input_size must be a positive integer, got {self.min_input_size!r}")
        if not self.mean or len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError(
                f"BackboneSpec mean {self.mean} and std {self.std} need one value per channel each, std positive"
            )

    @property
    def native_stride(self) -> int:
        """The stride it has when nothing is dilated (the largest supported)."""
        return max(self.supported_output_strides)

    @property
    def normalization(self) -> Normalization:
        """``(mean, std)`` of its published weights."""
        return Normalization(self.mean, self.std)

    def check_output_stride(self, output_stride: int | None, net: str) -> None:
        """Raise naming the valid values when ``net`` cannot be built at ``output_stride`` (None: its own)."""
        if output_stride is None or output_stride in self.supported_output_strides:
            return
        valid = self.supported_output_strides
        if len(valid) == 1:
            dilating = _registered_where(lambda spec: len(spec.supported_output_strides) > 1)
            fix = (f"{net} has no dilated variant (it does not dilate): leave output_stride unset or pass "
                   f"{valid[0]}, or choose a backbone that dilates ({dilating})")
        else:
            choices = ", ".join(map(str, valid[:-1])) + f" or {valid[-1]}"
            fix = f"pass {choices} (below {self.native_stride} the last strides are replaced by dilation)"
        raise ValueError(f"{net}: output_stride={output_stride!r} is not supported; valid values are {valid}; {fix}")

    def check_build(self, cls: type, kwargs: Mapping[str, Any]) -> None:
        """What is checked once, when ``cls`` is built with ``kwargs``: the output stride and the declared interfaces."""
        self.check_output_stride(kwargs.get("output_stride"), cls.__name__)
        if self.exposes_pool_indices and not callable(getattr(cls, "forward_with_pool_indices", None)):
            raise TypeError(
                f"{cls.__name__} declares exposes_pool_indices=True in its spec but has no "
                f"forward_with_pool_indices(x); add the method or declare False"
            )

    def resolve(self, request: BackboneRequest, *, backbone: str, asker: str) -> dict[str, Any]:
        """The build keywords that meet ``request`` (``asker``, e.g. "head 'deeplabv3'", names who asks).

        A stride the backbone cannot give falls back to its own with a warning unless the request is
        strict; a missing interface is an error naming the backbones that have it.
        """
        if request.pool_indices and not self.exposes_pool_indices:
            having = _registered_where(lambda spec: spec.exposes_pool_indices, limit=8)
            raise ValueError(
                f"{asker} needs a backbone that exposes its max-pool indices (spec exposes_pool_indices=True "
                f"and forward_with_pool_indices(x)), but backbone {backbone!r} does not; use one that does "
                f"({having}) or another head"
            )
        want = request.output_stride
        if want is None:
            return {}
        if want in self.supported_output_strides:
            # the native stride is what the backbone's own defaults build (4 for the CIFAR WRNs)
            return {} if want == self.native_stride else {"output_stride": want}
        if request.strict:
            raise ValueError(
                f"{asker} needs output_stride={want}, but backbone {backbone!r} supports only "
                f"{self.supported_output_strides}; choose a backbone that dilates to {want}"
            )
        warnings.warn(
            f"backbone {backbone!r} does not support output_stride={want} by dilation (its spec supports "
            f"{self.supported_output_strides}); {asker} runs on it at its own stride {self.native_stride}",
            stacklevel=3,
        )
        return {}


def _registered_where(predicate: Any, limit: int = 4) -> str:
    """Registered names whose spec satisfies ``predicate``, for error messages (read without building)."""
    names = [n for n in list_backbones() if not n.startswith("_") and predicate(get_backbone_entry(n).spec)]
    if not names:
        return "none registered"
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def backbone_normalization(name: str | None) -> Normalization:
    """``(mean, std)`` that backbone ``name``'s published weights expect, read from its spec without building it.

    ``None`` gives ImageNet's. Meant for linking a data module's ``mean``/``std`` to the model's backbone.
    """
    if name is None:
        return Normalization(IMAGENET_MEAN, IMAGENET_STD)
    return get_backbone_entry(name).spec.normalization


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state_dict saved with torch.save (bare, or under 'state_dict'/'model'/'module') or as safetensors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"pretrained weights file {str(p)!r} does not exist; pass a local file holding the "
            f"reference model's state_dict (torch.save(model.state_dict(), path))"
        )
    obj: Any = read_weights_file(p)
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


#: a state_dict, or the path of a file holding one
WeightsSource = Union[str, os.PathLike, Mapping[str, Tensor]]


def _state_dict_of(source: WeightsSource) -> tuple[dict[str, Tensor], str]:
    """The state_dict ``source`` is or holds, and how to name it in messages."""
    if isinstance(source, Mapping):
        return dict(source), "the given state_dict"
    return load_state_dict_file(source), str(source)


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
    __jit_ignored_attributes__ = ["feature_info", "spec", "output_stride"]
    #: what the family can do; each built instance holds the spec of its own keywords (``spec_for``)
    spec: BackboneSpec = BackboneSpec()
    #: keys of the reference state_dict that belong to the classifier head (prefixes)
    head_prefixes: tuple[str, ...] = ("fc.",)
    #: our key of the first convolution's weight (adapted when in_chans != 3)
    first_conv: str | None = None
    #: the coarsest stride the net was built at (below its native stride by dilation)
    output_stride: int = 32

    def __new__(cls, *args: Any, **kwargs: Any) -> "Backbone":
        # checked here, before __init__ builds a layer: every way of building (the registry, the class
        # called directly, a factory) gets the same check, and plugins write none of their own
        spec = cls.spec_for(**kwargs)
        spec.check_build(cls, kwargs)
        self = super().__new__(cls)
        object.__setattr__(self, "spec", spec)
        return self

    @classmethod
    def spec_for(cls, **kwargs: Any) -> BackboneSpec:
        """The spec of this class built with ``kwargs``; a family whose capabilities follow its keywords overrides it."""
        return cls.spec

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

    def load_pretrained(self, source: WeightsSource) -> None:
        """Load the reference implementation's state_dict (or ours), or a local file holding one, into this backbone."""
        raw, path = _state_dict_of(source)
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


class SpatialPyramidLinear(nn.Module):
    """SPP-net's classifier (He et al., ECCV 2014): spatial pyramid pooling of one level, then a linear layer ``fc``.

    The pyramid (``bins`` per side, {1, 2, 4} by default: the paper's 3-level pyramid) gives
    ``in_channels * sum(b**2)`` features at any map size, so the classifier takes images of any size.
    """

    def __init__(self, feature: str, in_channels: int, num_classes: int, bins: Sequence[int] = (1, 2, 4),
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.feature = feature
        self.spp = SpatialPyramidPooling(bins)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(self.spp.out_features(in_channels), num_classes)

    def forward(self, feats: dict[str, Tensor]) -> Tensor:
        return self.fc(self.dropout(self.spp(feats[self.feature])))


#: classification heads chosen by name in place of the net's own (``head=None``)
CLASSIFICATION_HEADS = ("spp",)


class Classifier(nn.Module):
    """A backbone and its classification head: images in, logits out."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone.forward_head_features(x))

    def load_pretrained(self, source: WeightsSource, with_head: bool = True) -> None:
        """Load the reference's full state_dict (or a file holding it); the head only if ``with_head`` and shapes agree."""
        raw, path = _state_dict_of(source)
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
    head: str | None = None,
    head_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Classifier:
    """Build backbone ``name`` with its documented classification head (or ``head``) for ``num_classes``.

    ``pretrained`` loads the reference implementation's full state_dict (head included when
    ``num_classes`` matches the file's). ``head="spp"`` puts :class:`SpatialPyramidLinear` on the
    last level instead of the net's own head, so any input size is accepted; ``head_kwargs`` go to
    it (``bins``).
    """
    if head is not None and head not in CLASSIFICATION_HEADS:
        raise ValueError(f"unknown classification head {head!r}; choose null (the net's own head) or one of "
                         f"{list(CLASSIFICATION_HEADS)} (spp: spatial pyramid pooling + linear, any input size)")
    head_kwargs = dict(head_kwargs or {})
    if head is None and head_kwargs:
        raise ValueError(f"head_kwargs {head_kwargs} need a named head (head: spp); the net's own head takes none")
    if set(head_kwargs) - {"bins"}:
        raise ValueError(f"head {head!r} takes only 'bins' in head_kwargs (bins per side, e.g. [1, 2, 4]); "
                         f"got {sorted(head_kwargs)}")
    backbone = get_backbone_entry(name).build(**kwargs)
    if head == "spp":
        last = backbone.feature_info[-1]
        head_module = SpatialPyramidLinear(last.name, last.channels, num_classes, dropout=dropout or 0.0, **head_kwargs)
    else:
        head_module = backbone.build_head(num_classes) if dropout is None else backbone.build_head(num_classes, dropout=dropout)
    model = Classifier(backbone, head_module)
    if pretrained is not None and not weights_from_checkpoint():
        model.load_pretrained(backbone_weights(get_backbone_entry(name), pretrained))
    return model
