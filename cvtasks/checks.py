"""Backbone conformance checks, shared by `make check-backbone` and the test suite."""

from __future__ import annotations

import importlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone, create_classifier
from .registry import BackboneEntry, get_backbone_entry
from .weights import IMAGENET, PublishedWeights, backbone_imagenet, torch_home

__all__ = ["CheckReport", "check_backbone", "build_reference", "check_parity", "count_parameters"]


@dataclass
class CheckReport:
    """What the checks observed for one backbone: each check's outcome by name."""

    name: str
    results: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no check failed."""
        return not self.failures

    def run(self, check: str, fn: Callable[[], str | None]) -> None:
        """Run one check, recording 'ok' (or the note it returns), 'skipped: ...', or the failure."""
        try:
            note = fn()
            self.results[check] = note or "ok"
        except _Skip as skip:
            self.results[check] = f"skipped: {skip}"
        except Exception as exc:  # a check must report, not stop the others
            self.results[check] = "FAILED"
            self.failures[check] = f"{type(exc).__name__}: {exc}"

    def __str__(self) -> str:
        width = max(len(k) for k in self.results) if self.results else 0
        lines = [f"backbone {self.name}:"]
        for k, v in self.results.items():
            lines.append(f"  {k:<{width}}  {v}")
            if k in self.failures:
                lines.append(f"  {'':<{width}}    {self.failures[k]}")
        return "\n".join(lines)


class _Skip(Exception):
    pass


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def _input_size(entry: BackboneEntry) -> int:
    return entry.spec.min_input_size


def _check_features(model: Backbone, size: int, in_chans: int = 3) -> str:
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, size, size))
    names = [f.name for f in model.feature_info]
    if not isinstance(out, dict) or list(out) != names:
        got = list(out) if isinstance(out, dict) else type(out).__name__
        raise AssertionError(f"forward returned {got}, feature_info declares {names}")
    prev = 0
    for info in model.feature_info:
        fmap = out[info.name]
        if fmap.shape[1] != info.channels:
            raise AssertionError(f"{info.name}: {fmap.shape[1]} channels, declared {info.channels}")
        if info.stride < prev:
            raise AssertionError(f"{info.name}: stride {info.stride} after a coarser level ({prev})")
        prev = info.stride
        est = size / fmap.shape[-1]
        if not (info.stride / 1.5 <= est <= info.stride * 1.5):
            raise AssertionError(
                f"{info.name}: a {size}px input gave {fmap.shape[-1]}px, i.e. stride ~{est:.1f}, declared {info.stride}"
            )
    return "ok (" + ", ".join(f"{f.name}:{f.channels}@{f.stride}" for f in model.feature_info) + ")"


def _check_output_stride(entry: BackboneEntry, size: int) -> str:
    spec = entry.spec
    strides = [s for s in spec.supported_output_strides if s != spec.native_stride]
    if not strides:
        raise _Skip("the family does not dilate")
    for os_ in strides:
        model = entry.build(output_stride=os_)
        if max(f.stride for f in model.feature_info) > os_:
            raise AssertionError(f"output_stride={os_} declared strides {[f.stride for f in model.feature_info]}")
        _check_features(model, size)
    return f"ok ({', '.join(map(str, strides))})"


def _check_train_step(entry: BackboneEntry, size: int) -> str:
    torch.manual_seed(0)
    model = create_classifier(entry.name, num_classes=3)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 2])
    loss = F.cross_entropy(model(x), y)
    if not torch.isfinite(loss):
        raise AssertionError(f"loss is {loss.item()}")
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    if not any(g is not None and g.abs().sum() > 0 for g in grads):
        raise AssertionError("no parameter received a gradient")
    opt.step()
    return f"ok (loss {loss.item():.3f})"


def _check_round_trip(entry: BackboneEntry, size: int) -> str:
    torch.manual_seed(0)
    model = entry.build().eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pt"
        torch.save(model.state_dict(), path)
        loaded = entry.build(pretrained=str(path)).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for k in a:
        if not torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4):
            raise AssertionError(f"level {k} differs after saving and loading the weights")
    return None  # type: ignore[return-value]


def build_reference(entry: BackboneEntry, **overrides: Any) -> nn.Module:
    """The reference implementation named by ``entry.reference`` ('torchvision:NAME' or 'timm:NAME'), random weights.

    ``overrides`` change the keywords the plugin declares for its reference (``reference_kwargs``).
    """
    ref = entry.reference
    if ":" not in ref:
        raise _Skip(f"no reference implementation declared ({ref or 'none'})")
    source, name = ref.split(":", 1)
    probe_cls = entry.builder if isinstance(entry.builder, type) else None
    kwargs: dict[str, Any] = {**(getattr(probe_cls, "reference_kwargs", {}) or {}), **overrides}
    if source == "torchvision":
        tv = importlib.import_module("torchvision.models")
        return tv.get_model(name, weights=None, **kwargs)
    if source == "timm":
        timm = importlib.import_module("timm")
        return timm.create_model(name, pretrained=False, **kwargs)
    raise _Skip(f"unknown reference source {source!r}")


#: keywords torchvision's builders add when they load published weights: the seed state_dict needs the same keys
_WEIGHTS_LAYOUT_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": True, "transform_input": True, "init_weights": False},
    "inception_v3": {"aux_logits": True, "transform_input": True, "init_weights": False},
}


def _informative(ref: nn.Module) -> nn.Module:
    """``ref`` with its last linear layer drawn at random: some references zero-initialise it (ViT)."""
    last = [m for m in ref.modules() if isinstance(m, nn.Linear)]
    if last:
        nn.init.normal_(last[-1].weight, std=0.02)
    return ref


def _reference_normalization(published: PublishedWeights) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the reference's own preprocessing applies (torchvision's transforms, timm's config)."""
    source, name = published.reference.split(":", 1)
    if source == "torchvision":
        preset = importlib.import_module("torchvision.models").get_model_weights(name).DEFAULT.transforms()
        return tuple(preset.mean), tuple(preset.std)
    return published.mean, published.std


def _normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def check_parity(name: str, size: int | None = None, rtol: float = 1e-4) -> str:
    """Reference with random weights -> ours: same logits and parameter count on the same images.

    Where the net has published ImageNet weights, the random weights take their path: saved in a
    fresh cache under the published file's name, read back by the reference's own library and by
    ``pretrained='imagenet'``, each model fed the images normalised as its weights expect. Else
    they go through a state_dict file (``pretrained=<path>``).
    """
    entry = get_backbone_entry(name)
    published = backbone_imagenet(entry)
    size = size or getattr(entry.builder, "parity_size", None) or _input_size(entry)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if published is None:
            ref = _informative(build_reference(entry)).eval()
            path = Path(tmp) / "reference.pt"
            torch.save(ref.state_dict(), path)
            ours = create_classifier(name, num_classes=num_classes_of(ref), pretrained=str(path)).eval()
            ref_norm = our_norm = (IMAGENET_MEAN, IMAGENET_STD)  # the same inputs for both
        else:
            with torch_home(tmp):
                seed_kwargs = _WEIGHTS_LAYOUT_KWARGS.get(published.reference.split(":", 1)[1], {})
                published.put(_informative(build_reference(entry, **seed_kwargs)).state_dict())
                ref = published.load_reference()
                ours = create_classifier(name, num_classes=num_classes_of(ref), pretrained=IMAGENET).eval()
            ref_norm, our_norm = _reference_normalization(published), tuple(ours.backbone.spec.normalization)
    n_ref, n_ours = count_parameters(ref), count_parameters(ours)
    if n_ref != n_ours:
        raise AssertionError(f"parameter count {n_ours:,} differs from the reference's {n_ref:,}")
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        a, b = ref(_normalise(x, *ref_norm)), ours(_normalise(x, *our_norm))
    if isinstance(a, tuple):  # torchvision's aux-logit outputs
        a = a[0]
    scale = a.abs().max().clamp_min(1e-6)
    err = ((a - b).abs().max() / scale).item()
    if err > rtol:
        raise AssertionError(f"logits differ from the reference: max relative error {err:.2e} > {rtol:.0e}")
    route = "published-weights cache, 'imagenet'" if published else "state_dict file"
    return f"ok ({n_ours:,} parameters, max rel. error {err:.1e}, through the {route})"


def num_classes_of(model: nn.Module) -> int:
    """Class count of a reference classifier: its last linear layer, else its last convolution (timm 1x1 heads)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if last:
        return last[-1].out_features
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def check_backbone(name: str, parity: bool = True, shapes: bool = True) -> CheckReport:
    """Run the conformance checks on the registered backbone ``name``.

    ``shapes=False`` leaves out the build, features and output_stride checks, which need no
    arithmetic: the contract test checks those for every net on the meta device, and the rest here.
    """
    entry = get_backbone_entry(name)
    report = CheckReport(name)
    size = _input_size(entry)
    if shapes:
        holder: dict[str, Backbone] = {}

        def build() -> str:
            holder["model"] = entry.build()
            return f"ok ({count_parameters(holder['model']):,} parameters)"

        report.run("build", build)
        if "model" not in holder:
            return report
        report.run("features", lambda: _check_features(holder["model"], size))
    report.run("in_chans=1", lambda: _check_features(entry.build(in_chans=1), size, in_chans=1))
    report.run("in_chans=4", lambda: _check_features(entry.build(in_chans=4), size, in_chans=4))
    if shapes:
        report.run("output_stride", lambda: _check_output_stride(entry, size))
    report.run("train_step", lambda: _check_train_step(entry, size))
    report.run("pretrained round-trip", lambda: _check_round_trip(entry, size))
    if parity:
        report.run("reference parity", lambda: check_parity(name))
    return report
