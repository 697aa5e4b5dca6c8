"""A bridge to timm: any ``timm/<model>`` name is one of timm's models as a feature extractor.

The registry resolves ``timm/<model>`` to the entry registered here as ``timm/*``, passing
``model_name=<model>``. We build ``timm.create_model(model_name, features_only=True,
pretrained=False, ...)`` and describe its levels with timm's own ``feature_info``: each level is
named after the timm module it is taken from, with dots as underscores (``layer1``, ``stages_0``,
``blocks_5``), with timm's channels and reductions. Maps are always channels-first; models that
emit channels-last features (timm's Swin) are permuted (a view).

``pretrained=<file>`` takes the state_dict of the *full* timm model (``timm.create_model(name)
.state_dict()``). timm's feature wrappers keep the module names of the kept modules, except that
some flatten the top-level sequence (``stages.0`` becomes ``stages_0``) and some hold the model as
``model`` (``model.blocks.0``); the classifier and anything after the last kept level are dropped.

``output_stride`` (8 or 16) is passed to timm for the models that take it (ResNets, RegNets,
EfficientNets, MobileNets, ...); the bridge cannot know which those are before building, so its
spec declares 8, 16 and 32 and a model that refuses is reported clearly once built. The spec's
mean/std are those of the model's timm ``pretrained_cfg`` (read without building or downloading).
Other timm keywords (``img_size=64`` for timm's ViTs, ``drop_path_rate``, ...) pass through.
"""

from __future__ import annotations

import difflib
from dataclasses import replace
from typing import Any, Iterable, Mapping

from torch import Tensor, nn

from cvtasks.backbone import Backbone, BackboneSpec, FeatureInfo
from cvtasks.layers import SUPPORTED_OUTPUT_STRIDES
from cvtasks.registry import UnknownBackboneError, register_backbone

__all__ = ["TimmBackbone"]

_PAPER = "Wightman, PyTorch Image Models (timm), GitHub 2019"


def _timm() -> Any:
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        raise ImportError("timm/<model> backbones need the 'timm' package (pip install timm)") from exc
    return timm


def _close_timm_names(model_name: str, n: int = 5) -> list[str]:
    """timm model names that look like ``model_name``: a shared stem first, then by similarity."""
    timm = _timm()
    stem = model_name.split("_")[0].rstrip("0123456789").lower()
    by_stem = timm.list_models(f"{stem}*") if len(stem) >= 2 else []
    pool = by_stem or [m for m in timm.list_models() if not m.startswith("test_")]  # test_* are timm's toys
    close = difflib.get_close_matches(model_name, pool, n=n, cutoff=0.5)
    return close or by_stem[:n]


def _candidate_keys(key: str) -> list[str]:
    """The spellings a full-model key can take inside timm's feature wrappers."""
    head, _, rest = key.partition(".")
    keys = [key, "model." + key]
    if rest:  # flatten_sequential: 'stages.0.conv.weight' -> 'stages_0.conv.weight'
        second, _, tail = rest.partition(".")
        keys.append(f"{head}_{second}" + (f".{tail}" if tail else ""))
    return keys


class TimmBackbone(Backbone):
    """One of timm's models built with ``features_only=True``, behind our backbone contract."""

    head_prefixes: tuple[str, ...] = ()
    spec = BackboneSpec(supported_output_strides=SUPPORTED_OUTPUT_STRIDES)

    def __init__(
        self,
        *,
        model_name: str,
        in_chans: int = 3,
        out_features: Iterable[str] | None = None,
        output_stride: int = 32,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        timm = _timm()
        if not timm.is_model(model_name):
            close = _close_timm_names(model_name)
            hint = f" Close timm names: {', '.join('timm/' + c for c in close)}." if close else ""
            raise UnknownBackboneError(
                f"unknown backbone 'timm/{model_name}': timm has no model {model_name!r}.{hint} "
                f"List them with timm.list_models('<pattern>')."
            )
        kwargs: dict[str, Any] = dict(features_only=True, pretrained=False, in_chans=in_chans, **timm_kwargs)
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        self.model_name = model_name
        self.model = self._create(kwargs)
        names = [m.replace(".", "_") for m in self.model.feature_info.module_name()]
        if out_features is not None:
            wanted = list(out_features)
            bad = [n for n in wanted if n not in names]
            if bad or not wanted:
                raise ValueError(f"timm/{model_name} has no feature levels {bad or wanted}; valid names are {names}")
            # rebuild with only the requested levels: timm then drops the modules after the deepest
            indices = list(self.model.feature_info.out_indices)
            kwargs["out_indices"] = tuple(indices[names.index(n)] for n in sorted(wanted, key=names.index))
            self.model = self._create(kwargs)
            names = [m.replace(".", "_") for m in self.model.feature_info.module_name()]
            self._drop_trailing_blocks()
        info = self.model.feature_info
        self.feature_info = [FeatureInfo(n, c, r) for n, c, r in zip(names, info.channels(), info.reduction())]
        if output_stride != 32 and max(f.stride for f in self.feature_info) > output_stride:
            raise ValueError(
                f"timm/{model_name} ignored output_stride={output_stride} (its strides are "
                f"{[f.stride for f in self.feature_info]}); it cannot be dilated, use output_stride=32"
            )
        self.output_stride = output_stride
        fmt = getattr(self.model, "output_fmt", "NCHW")
        self._channels_last = str(getattr(fmt, "value", fmt)) == "NHWC"
        self.first_conv = self._first_conv_key()

    @classmethod
    def spec_for(cls, **kwargs: Any) -> BackboneSpec:
        """The normalisation of the model's timm weights (its pretrained_cfg), without building it."""
        name = kwargs.get("model_name")
        try:
            cfg = _timm().models.get_pretrained_cfg(name) if name else None
        except Exception:  # an unknown name is reported, with close names, when the model is built
            cfg = None
        if cfg is None or not getattr(cfg, "mean", None) or not getattr(cfg, "std", None):
            return cls.spec
        return replace(cls.spec, mean=tuple(cfg.mean), std=tuple(cfg.std))

    def _create(self, kwargs: dict[str, Any]) -> Any:
        try:
            return _timm().create_model(self.model_name, **kwargs)
        except TypeError as exc:
            if "output_stride" in kwargs and "output_stride" in str(exc):
                raise ValueError(
                    f"timm/{self.model_name} does not take output_stride={kwargs['output_stride']} "
                    f"(it has no dilated variant); use output_stride=32"
                ) from exc
            raise
        except RuntimeError as exc:
            if "features_only" in str(exc):
                raise ValueError(f"timm/{self.model_name} cannot be built as a feature extractor: {exc}") from exc
            raise

    def _drop_trailing_blocks(self) -> None:
        """Remove blocks after the deepest kept level where timm's wrapper keeps them.

        timm's FeatureListNet stops at the deepest level itself; its EfficientNet and MobileNetV3
        feature classes run every block whatever ``out_indices`` says, and parameters that get no
        gradient break DDP. Those classes record the kept block stages in ``_stage_out_idx``.
        """
        stages = getattr(self.model, "_stage_out_idx", None)
        blocks = getattr(self.model, "blocks", None)
        if isinstance(stages, dict) and stages and isinstance(blocks, nn.Sequential):
            if getattr(self.model, "feature_hooks", None) is None:
                del blocks[max(stages) :]

    def _first_conv_key(self) -> str | None:
        first = _timm().models.get_pretrained_cfg_value(self.model_name, "first_conv")
        if not first:
            return None
        own = self.model.state_dict()
        for key in _candidate_keys(f"{first}.weight"):
            if key in own:
                return "model." + key
        return None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """timm's feature maps under our level names, channels-first."""
        feats = self.model(x)
        if isinstance(feats, Mapping):
            feats = list(feats.values())
        if self._channels_last:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return {info.name: f for info, f in zip(self.feature_info, feats)}

    @classmethod
    def remap_state_dict(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A full timm model's keys, in every spelling timm's feature wrappers use.

        The loader keeps the spelling this model has and drops the others, with the classifier
        and the modules after the last kept level.
        """
        out: dict[str, Tensor] = {}
        for k, v in state_dict.items():
            for cand in _candidate_keys(k):
                out["backbone.model." + cand] = v
        return out


register_backbone("timm/*", family="timm", paper=_PAPER, reference="timm:*", input_size=224)(
    TimmBackbone
)
