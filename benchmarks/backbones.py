"""Forward+backward time of each native backbone over its reference implementation, side by side."""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from cvtasks.backbone import create_classifier
from cvtasks.checks import build_reference, num_classes_of
from cvtasks.registry import get_backbone_entry, list_backbones

from .timing import interleaved


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    F.cross_entropy(out, y).backward()
    model.zero_grad(set_to_none=True)


def bench_backbone(name: str, size: int | None, batch: int, repeats: int, device: str = "cpu",
                   channels_last: bool = False) -> dict[str, Any] | None:
    """Median forward+backward seconds of ours and the reference, and their ratio; None without a reference."""
    entry = get_backbone_entry(name)
    try:
        ref = build_reference(entry)
    except Exception:
        return None
    num_classes = num_classes_of(ref)
    ours = create_classifier(name, num_classes=num_classes)
    size = size or entry.input_size
    size = max(size, entry.spec.min_input_size)
    size = getattr(entry.builder, "parity_size", None) or size  # a reference fixed to one size (ViT: 224)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    models = []
    for m in (ours, ref):
        m = m.to(device).train()
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        models.append(m)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)

    def run(m: torch.nn.Module) -> None:
        _step(m, x, y)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    # two warm-up runs each: the first pair in a process also pays for growing the allocator
    t_ours, t_ref = interleaved(lambda: run(models[0]), lambda: run(models[1]), repeats=repeats, warmup=2)
    return {"name": name, "reference": entry.reference, "size": size, "ours_s": t_ours, "ref_s": t_ref, "ratio": t_ours / t_ref}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the backbone pairs matching --pattern and print a table of ratios (ours / reference)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pattern", default=None, help="backbone names (shell pattern); default: every one with a reference")
    ap.add_argument("--size", type=int, default=128, help="input size (0: each net's native size)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=11, help="timed runs per side (5 left +-8%% noise on 2 cores)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--channels-last", action="store_true")
    ns = ap.parse_args(argv)
    rows = []
    print(f"{'backbone':<22} {'reference':<28} {'size':>4} {'ours (ms)':>10} {'ref (ms)':>10} {'ratio':>6}", flush=True)
    for name in list_backbones(ns.pattern):
        r = bench_backbone(name, ns.size or None, ns.batch, ns.repeats, ns.device, ns.channels_last)
        if r is None:
            continue
        rows.append(r)
        print(f"{name:<22} {r['reference']:<28} {r['size']:>4} {r['ours_s'] * 1e3:>10.1f} {r['ref_s'] * 1e3:>10.1f} {r['ratio']:>6.3f}", flush=True)
    if rows:
        worst = sorted(rows, key=lambda r: -r["ratio"])[:3]
        print("worst three: " + ", ".join(f"{r['name']} {r['ratio']:.3f}" for r in worst))
    return rows


if __name__ == "__main__":
    main()
