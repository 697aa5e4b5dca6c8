"""The registry as a table: what `make backbones` prints and docs/backbones.md is built from."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .registry import get_backbone_entry, list_backbones
from .weights import backbone_imagenet

__all__ = ["measure_backbone", "backbone_table"]


def measure_backbone(name: str, size: int | None = None) -> dict[str, Any]:
    """Parameters (backbone and its documented classifier) and GFLOPs (multiply-adds, as papers count) at ``size``."""
    from .backbone import create_classifier

    entry = get_backbone_entry(name)
    size = size or entry.input_size
    model = create_classifier(name, num_classes=entry.num_classes).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, size, size))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": counter.get_total_flops() / 2e9,  # FlopCounterMode counts a multiply-add as 2
        "size": size,
        "features": model.backbone.feature_info,
    }


def backbone_table(pattern: str | None = None, size: str | int = 224, measure: bool = True) -> str:
    """A fixed-width table of the registered backbones matching ``pattern``; ``weights`` names their published weights."""
    names = list_backbones(pattern)
    if not names:
        return f"no registered backbone matches {pattern!r}"
    header = ["name", "family", "params (M)", "GFLOPs", "input", "features (name:channels@stride)", "reference", "weights"]
    rows: list[list[str]] = []
    for name in names:
        entry = get_backbone_entry(name)
        px = entry.input_size if str(size) == "native" else int(size)
        if measure:
            try:
                m = measure_backbone(name, px)
                params, gflops = f"{m['params'] / 1e6:.2f}", f"{m['gflops']:.2f}"
                feats = " ".join(f"{f.name}:{f.channels}@{f.stride}" for f in m["features"])
            except Exception as exc:  # one net that fails at this size must not hide the others
                params, gflops, feats = "-", "-", f"(cannot run at {px}px: {type(exc).__name__})"
        else:
            model = entry.build()
            params, gflops = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}", "-"
            feats = " ".join(f"{f.name}:{f.channels}@{f.stride}" for f in model.feature_info)
        weights = "imagenet" if backbone_imagenet(entry) is not None else "-"
        rows.append([name, entry.family, params, gflops, str(px), feats, entry.reference or "-", weights])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)
