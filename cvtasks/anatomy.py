"""The anatomy of a net, layer by layer: output shape, parameters, multiply-adds, stride, receptive field.

What `make summary NAME=...` prints. Parameters and multiply-adds are counted on the same model
(the backbone with its documented classifier) and by the same counter (torch's FlopCounterMode)
as `make backbones`, so the totals at the bottom are that table's figures exactly.

The receptive field is computed, not measured: one forward pass under a ``TorchFunctionMode``
attaches to every tensor a ``Field`` that says, for each spatial axis, which input pixels feed its
position ``i``: the interval ``[lo + i * jump, hi + i * jump]``. Convolutions and pools (kernel k,
stride s, padding p, dilation d) map ``lo -> lo - p * jump``, ``hi -> hi + (d (k - 1) - p) * jump``,
``jump -> jump * s`` (so the size grows by ``(d (k - 1)) * jump``, the lectures' recurrence); ``pad``
shifts it; every op that keeps the spatial size and is not one of those (activations, norms, adds,
concatenation along channels, multiplication by an attention map) takes the union over its inputs.
The union is what makes branches exact: an Inception block or a residual add sees the widest of its
paths, with each path's own offset. Following the tensors rather than the modules means the adds and
concatenations written inside ``forward`` are seen too, not only the layers. A global reduction
(global pooling, an SE block's squeeze) makes a field ``global``; an op whose spatial meaning is not
known here (a reshape into tokens, attention, interpolation) makes it ``unknown``, printed as ``-``,
never guessed. tests/test_summary_command.py checks the result against a gradient measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Axis", "Field", "LayerRow", "Anatomy", "trace_fields", "level_fields", "anatomy", "anatomy_table"]


@dataclass(frozen=True)
class Axis:
    """Along one spatial axis, position ``i`` of a map sees input pixels ``lo + i*jump .. hi + i*jump``."""

    lo: int
    hi: int
    jump: int

    @property
    def size(self) -> int:
        """The receptive field's extent in input pixels."""
        return self.hi - self.lo + 1

    def interval(self, i: int) -> tuple[int, int]:
        """The first and last input pixel that position ``i`` sees (before clipping to the image)."""
        return self.lo + i * self.jump, self.hi + i * self.jump

    def window(self, kernel: int, stride: int, padding: int, dilation: int = 1) -> Axis:
        """After a sliding window (convolution or pool) with these settings along this axis."""
        return Axis(self.lo - padding * self.jump, self.hi + (dilation * (kernel - 1) - padding) * self.jump,
                    self.jump * stride)


@dataclass(frozen=True)
class Field:
    """A tensor's receptive field: ``local`` (one Axis per spatial axis), ``global`` or ``unknown``."""

    kind: str
    axes: tuple[Axis, Axis] | None = None
    spatial: tuple[int, int] | None = None  # the (H, W) sizes the axes belong to

    @property
    def stride(self) -> tuple[int, int] | None:
        """Input pixels between neighbouring positions (the product of the strides so far), per axis."""
        return (self.axes[0].jump, self.axes[1].jump) if self.axes else None

    @property
    def size(self) -> tuple[int, int] | None:
        """The receptive field's extent (height, width) in input pixels; None unless local."""
        return (self.axes[0].size, self.axes[1].size) if self.axes else None

    def describe(self, image: tuple[int, int]) -> tuple[str, str]:
        """(stride, receptive field) as table cells; a global field is the image's size, marked."""
        if self.kind == "global":
            return "-", f"{_pair(image)} (all)"
        if self.kind != "local":
            return "-", "-"
        return _pair(self.stride), _pair(self.size)


GLOBAL = Field("global")
UNKNOWN = Field("unknown")

# ops that mix positions in a way not followed here: their outputs are unknown, never merged
_OPAQUE = ("conv", "interpolate", "upsample", "roll", "unfold", "fold", "grid_sample", "fft", "flip", "attention",
           "pixel_shuffle", "pixel_unshuffle", "rot90", "cumsum", "cumprod", "sort", "topk", "softmax")
# reductions that, dropping the spatial axes, see the whole image
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "logsumexp", "std", "var", "norm"}


# positional arguments of the windowed ops, as torch.nn.functional declares them
_SIGNATURES = {
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "max_pool2d": ("input", "kernel_size", "stride", "padding", "dilation"),
    "max_pool2d_with_indices": ("input", "kernel_size", "stride", "padding", "dilation"),
    "max_pool3d": ("input", "kernel_size", "stride", "padding", "dilation"),
    "avg_pool2d": ("input", "kernel_size", "stride", "padding"),
    "avg_pool3d": ("input", "kernel_size", "stride", "padding"),
    "lp_pool2d": ("input", "norm_type", "kernel_size", "stride"),
}


def _pair(v: tuple[int, int] | None) -> str:
    if v is None:
        return "-"
    return str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"


def _two(v: Any) -> tuple[int, int]:
    """An int or a sequence of ints as (height, width): the last two entries, as 3-D pools list them."""
    if isinstance(v, int):
        return v, v
    v = tuple(int(x) for x in v)
    return (v[0], v[0]) if len(v) == 1 else (v[-2], v[-1])


def _spatial(t: Tensor) -> tuple[int, int] | None:
    return (int(t.shape[-2]), int(t.shape[-1])) if t.dim() >= 3 else None


def _arguments(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (positional ones first), with defaults filled in."""
    out = dict(defaults)
    out.update(zip(names, args))
    out.update(kwargs)
    return out


class _FieldTracer(TorchFunctionMode):
    """Attaches a Field to every tensor computed inside it (by the tensor's id, tensors kept alive)."""

    def __init__(self, image: Tensor) -> None:
        super().__init__()
        self.fields: dict[int, Field] = {}
        self._alive: list[Tensor] = []  # an id is only a name while its tensor lives
        start = Axis(0, 0, 1)
        self._set(image, Field("local", (start, start), _spatial(image)))

    def _set(self, t: Tensor, f: Field) -> None:
        if f.kind == "local" and f.spatial is None:  # a window's output: its size is known only now
            f = replace(f, spatial=_spatial(t))
        self.fields[id(t)] = f
        self._alive.append(t)

    def field_of(self, t: Tensor) -> Field | None:
        """The Field of a tensor computed inside the trace; None for constants and parameters."""
        return self.fields.get(id(t))

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor) and id(t) in self.fields]
        if not inputs:
            return out
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        if not outputs:
            return out
        name = getattr(func, "__name__", str(func)).lstrip("_").removesuffix("_")
        f = self._propagate(name, args, kwargs, [self.fields[id(t)] for t in inputs], outputs[0])
        for t in outputs:
            self._set(t, f)
        return out

    def _propagate(self, name: str, args: tuple, kwargs: dict, fields: list[Field], out: Tensor) -> Field:
        """The output's Field from the op's name, its arguments and its inputs' Fields."""
        if any(f.kind == "unknown" for f in fields):
            return UNKNOWN
        first = fields[0] if id(args[0] if args else None) in self.fields else None
        if name in _SIGNATURES:
            return self._window(name, args, kwargs, first) if first is not None else UNKNOWN
        if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
            return self._adaptive(first, out) if first is not None else UNKNOWN
        if name == "pad":
            return self._pad(args, kwargs, first) if first is not None else UNKNOWN
        if any(word in name for word in _OPAQUE):
            return UNKNOWN
        size = _spatial(out)
        locals_ = [f for f in fields if f.kind == "local"]
        if size is not None and locals_ and all(f.spatial == size for f in locals_):
            if any(f.kind == "global" for f in fields):  # e.g. x * SE(x): every position sees the whole image
                return GLOBAL
            jumps = {f.stride for f in locals_}
            if len(jumps) != 1:  # maps of one size but different sampling: not one interval per position
                return UNKNOWN
            axes = tuple(Axis(min(f.axes[a].lo for f in locals_), max(f.axes[a].hi for f in locals_),
                              locals_[0].axes[a].jump) for a in range(2))
            return Field("local", axes, size)  # type: ignore[arg-type]
        if not locals_:
            return GLOBAL  # computed from global values only (flatten, linear, ... after global pooling)
        if name in _REDUCTIONS:  # over the spatial axes (over channels, the sizes matched above)
            return GLOBAL
        return UNKNOWN

    @staticmethod
    def _window(name: str, args: tuple, kwargs: dict, f: Field) -> Field:
        """A convolution or pool: kernel, stride, padding and dilation along each axis."""
        if f.kind != "local":
            return f
        if name == "conv2d":
            a = _arguments(args, kwargs, _SIGNATURES[name], {"stride": 1, "padding": 0, "dilation": 1})
            kernel = (int(a["weight"].shape[-2]), int(a["weight"].shape[-1]))
        else:
            a = _arguments(args, kwargs, _SIGNATURES.get(name, _SIGNATURES["max_pool2d"]),
                           {"stride": None, "padding": 0, "dilation": 1})
            kernel = _two(a["kernel_size"])
            if a["stride"] is None or (not isinstance(a["stride"], int) and len(a["stride"]) == 0):
                a["stride"] = a["kernel_size"]  # pools default to non-overlapping windows
        stride, dilation = _two(a["stride"]), _two(a["dilation"])
        padding = a["padding"]
        if isinstance(padding, str):  # 'valid', or 'same': torch pads total d(k-1), the smaller half first
            padding = (0, 0) if padding == "valid" else tuple(dilation[i] * (kernel[i] - 1) // 2 for i in range(2))
        padding = _two(padding)
        axes = tuple(f.axes[i].window(kernel[i], stride[i], padding[i], dilation[i]) for i in range(2))
        return Field("local", axes, None)  # type: ignore[arg-type]

    @staticmethod
    def _adaptive(f: Field, out: Tensor) -> Field:
        """Adaptive pooling: global to 1x1, a plain window where the sizes divide, unknown otherwise."""
        size = _spatial(out)
        if f.kind != "local" or size is None:
            return f
        if f.spatial is None:
            return UNKNOWN
        if size == (1, 1):
            return GLOBAL
        if any(f.spatial[i] % size[i] for i in range(2)):
            return UNKNOWN  # windows of unequal sizes: no single interval rule
        k = tuple(f.spatial[i] // size[i] for i in range(2))
        return Field("local", tuple(f.axes[i].window(k[i], k[i], 0) for i in range(2)), size)  # type: ignore[arg-type]

    @staticmethod
    def _pad(args: tuple, kwargs: dict, f: Field) -> Field:
        """``F.pad``: the last axis's (left, right), then the one before's (top, bottom)."""
        if f.kind != "local":
            return f
        pad = list(_arguments(args, kwargs, ("input", "pad"), {})["pad"]) + [0, 0, 0, 0]
        left, top = pad[0], pad[2]
        h, w = f.axes
        return Field("local", (Axis(h.lo - top * h.jump, h.hi - top * h.jump, h.jump),
                               Axis(w.lo - left * w.jump, w.hi - left * w.jump, w.jump)), None)


def trace_fields(model: nn.Module, x: Tensor) -> tuple[Any, Callable[[Tensor], Field | None]]:
    """Run ``model(x)`` once, returning its output and a function giving any computed tensor's Field."""
    tracer = _FieldTracer(x)
    with torch.no_grad(), tracer:
        out = model(x)
    return out, tracer.field_of


def level_fields(backbone: nn.Module, size: int, in_chans: int = 3) -> dict[str, Field]:
    """Each feature level's receptive field, for a backbone returning a dict of maps, at a ``size`` input."""
    x = torch.zeros(1, in_chans, size, size, dtype=next(backbone.parameters()).dtype)
    feats, field_of = trace_fields(backbone.eval(), x)
    if isinstance(feats, tuple):  # VGG with pooling indices returns (features, indices)
        feats = feats[0]
    return {name: field_of(t) or UNKNOWN for name, t in feats.items()}


@dataclass
class LayerRow:
    """One line of the table: a module (or a module's own work beside its children's)."""

    name: str
    kind: str
    shape: tuple[int, ...] | None
    params: int
    macs: int
    field: Field
    level: str = ""


@dataclass
class Anatomy:
    """A net's rows, the totals that `make backbones` prints, and the levels' receptive fields."""

    name: str
    size: int
    rows: list[LayerRow]
    params: int
    flops: int  # as FlopCounterMode counts: a multiply-add is 2
    levels: dict[str, tuple[Field, tuple[int, ...]]] = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        """Multiply-adds in billions: the GFLOPs column of `make backbones`."""
        return self.flops / 2e9


def _first_tensor(out: Any) -> Tensor | None:
    return next((t for t in tree_flatten(out)[0] if isinstance(t, Tensor)), None)


def _module_names(root: nn.Module) -> dict[nn.Module, str]:
    """Each module's name as FlopCounterMode's tracker spells it: the root's class, then the attribute path."""
    names: dict[nn.Module, str] = {}

    def walk(mod: nn.Module, name: str) -> None:
        names[mod] = name
        for child_name, child in mod.named_children():
            walk(child, f"{name}.{child_name}")

    walk(root, type(root).__name__)
    return names


def anatomy(name: str, size: int | None = None, depth: int | None = None) -> Anatomy:
    """The table's contents for registered net ``name`` at ``size`` px (its native size by default).

    ``depth`` merges everything below that many levels of modules into one row (None: every layer).
    """
    from .backbone import create_classifier
    from .registry import get_backbone_entry

    entry = get_backbone_entry(name)
    size = size or entry.input_size
    if size < entry.min_input_size:
        raise ValueError(f"{name} takes inputs of at least {entry.min_input_size} px, got --size {size}; "
                         f"pass --size {entry.min_input_size} or more")
    if depth is not None and depth < 1:
        raise ValueError(f"--depth must be at least 1, got {depth}")
    # the model and the count of `make backbones` (summary.measure_backbone), so the totals agree
    model = create_classifier(name, num_classes=entry.num_classes).eval()
    x = torch.zeros(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    names = _module_names(model)

    # the second pass: receptive fields, and each module's output in the order modules finish
    finished: dict[nn.Module, tuple[Tensor | None, Field]] = {}
    tracer = _FieldTracer(x)

    backbone = getattr(model, "backbone", None)
    levels: dict[str, tuple[Field, tuple[int, ...]]] = {}

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        if mod is backbone:  # the levels, as heads receive them (VGG's unpooling variant adds indices)
            feats = out[0] if isinstance(out, tuple) else out
            if isinstance(feats, dict):
                levels.update({k: (tracer.field_of(v) or UNKNOWN, tuple(v.shape[1:])) for k, v in feats.items()})
        t = _first_tensor(out)
        finished.pop(mod, None)  # a module called twice is listed where it last finished
        finished[mod] = (t, (tracer.field_of(t) if t is not None else None) or UNKNOWN)

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.no_grad(), tracer:
            model(x)
    finally:
        handle.remove()

    if backbone is not None and not levels:  # a head that reads the backbone without calling it (ViT's class token)
        levels = {k: (f, shape) for k, (f, shape) in _levels_alone(backbone, x).items()}

    def depth_of(mod: nn.Module) -> int:
        return names[mod].count(".")

    def is_row(mod: nn.Module) -> bool:
        return not any(True for _ in mod.children()) or (depth is not None and depth_of(mod) >= depth)

    def inside_row(mod: nn.Module) -> bool:
        return depth is not None and depth_of(mod) > depth

    stage_levels = getattr(backbone, "_level_of_stage", {})
    level_of = {backbone.stages[s]: lvl for s, lvl in stage_levels.items()} if stage_levels else {}

    seen: set[int] = set()

    def own_params(mod: nn.Module, recurse: bool) -> int:
        n = 0
        for p in mod.parameters(recurse=recurse):
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    def accounted(mod: nn.Module) -> int:
        """The FLOPs counted in ``mod``'s rows: its own count if it ran, else (a container) its children's."""
        return counts.get(names[mod], 0) if mod in finished else sum(accounted(c) for c in mod.children())

    rows: list[LayerRow] = []
    order = list(finished) + [m for m in names if m not in finished]
    for mod in order:
        if inside_row(mod):
            continue
        t, fld = finished.get(mod, (None, UNKNOWN))
        shape = tuple(t.shape[1:]) if t is not None else None
        label = names[mod].split(".", 1)[1] if "." in names[mod] else names[mod]
        if is_row(mod):
            rows.append(LayerRow(label, type(mod).__name__, shape, own_params(mod, True), counts.get(names[mod], 0) // 2,
                                 fld, level_of.get(mod, "")))
            continue
        # the work a module does itself, beside its children's (the adds and matmuls in its forward)
        own_flops = counts.get(names[mod], 0) - sum(accounted(c) for c in mod.children()) if mod in finished else 0
        n = own_params(mod, False)
        if n or own_flops:
            rows.append(LayerRow(f"{label} (own)", type(mod).__name__, shape, n, own_flops // 2, fld, level_of.get(mod, "")))
        if mod in level_of:
            rows.append(LayerRow(label, "(level output)", shape, 0, 0, fld, level_of[mod]))
    params = sum(p.numel() for p in model.parameters())
    flops = counter.get_total_flops()
    # every parameter and every counted FLOP is in exactly one row, so the rows add up to the totals
    assert sum(r.params for r in rows) == params and sum(r.macs for r in rows) * 2 == flops, name
    return Anatomy(name, size, rows, params, flops, levels)


def _levels_alone(backbone: nn.Module, x: Tensor) -> dict[str, tuple[Field, tuple[int, ...]]]:
    """Each level's Field and shape from a traced pass of the backbone by itself."""
    out, field_of = trace_fields(backbone, x)
    feats = out[0] if isinstance(out, tuple) else out
    return {k: (field_of(v) or UNKNOWN, tuple(v.shape[1:])) for k, v in feats.items()} if isinstance(feats, dict) else {}


def _count(n: int) -> str:
    return f"{n:,}" if n else "-"


def anatomy_table(name: str, size: int | None = None, depth: int | None = None) -> str:
    """The printed table of `python -m cvtasks summary NAME`: one row per layer, totals, then the levels."""
    from .registry import get_backbone_entry

    a = anatomy(name, size, depth)
    image = (a.size, a.size)
    header = ["layer", "type", "output", "params", "mult-adds", "stride", "receptive field", "level"]
    body = []
    for r in a.rows:
        stride, rf = r.field.describe(image)
        shape = "x".join(str(d) for d in r.shape) if r.shape else "-"
        body.append([r.name, r.kind, shape, _count(r.params), _count(r.macs), stride, rf, r.level])
    total = ["total", "", "", f"{a.params:,}", f"{a.flops // 2:,}", "", "", ""]
    widths = [max(len(row[i]) for row in [header, total, *body]) for i in range(len(header))]
    right = {3, 4, 5}
    fmt = lambda row: "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    rule = "  ".join("-" * w for w in widths)
    entry = get_backbone_entry(name)
    lines = [f"{name} ({entry.family}) at {a.size}x{a.size}, with its classifier for {entry.num_classes} classes",
             "", fmt(header), rule, *(fmt(r) for r in body), rule, fmt(total), "",
             f"params (M) {a.params / 1e6:.2f}   GFLOPs {a.gflops:.2f}   (multiply-adds, as make backbones counts them)"]
    if a.levels:
        lines += ["", "levels (what heads read): name, output, stride, receptive field"]
        for lvl, (fld, shape) in a.levels.items():
            stride, rf = fld.describe(image)
            lines.append(f"  {lvl:<12} {'x'.join(str(d) for d in shape):<16} {stride:>6}  {rf}")
    return "\n".join(lines)
