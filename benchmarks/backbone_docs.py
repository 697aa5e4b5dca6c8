"""Generate docs/backbones.md from what the checks observe, so the table cannot drift from the code.

    python -m benchmarks.backbone_docs [--pattern 'resnet*'] [--compile] [--out docs/backbones.md]

The observed rows are kept in docs/backbones.json; a run with --pattern refreshes those rows only.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from cvtasks.backbone import create_classifier
from cvtasks.checks import build_reference, check_parity, count_parameters
from cvtasks.detection.models import build_detector
from cvtasks.heads.segmentation import build_segmentation_model
from cvtasks.registry import get_backbone_entry, list_backbones
from cvtasks.summary import measure_backbone


def _try(fn: Callable[[], Any]) -> str:
    try:
        out = fn()
        return "yes" if out is None else str(out)
    except Exception as exc:  # a capability a net lacks is a row entry, not a crash
        reason = " ".join(str(exc).split())[:70].replace("|", "/")
        return f"no ({type(exc).__name__}: {reason})"


def _channels_last(name: str, size: int) -> None:
    model = create_classifier(name, num_classes=10).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    if not torch.allclose(ref, out, atol=1e-4, rtol=1e-3):
        raise AssertionError("channels_last output differs")


def _torchscript(name: str, size: int) -> None:
    """Script the classifier and compare logits, in a fresh interpreter: TorchScript keeps compiled
    classes per process, so a net scripted after another can fail on the other's leftovers."""
    code = f"from benchmarks.backbone_docs import _torchscript_here as t; t({name!r}, {size})"
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    if proc.returncode:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        at = [i for i, ln in enumerate(lines) if re.match(r"^[\w.]+(Error|Exception):", ln)]
        if not at:
            raise RuntimeError(f"exit code {proc.returncode}")
        message = lines[at[-1]].split(":", 1)[1].strip() or " ".join(lines[at[-1] + 1 : at[-1] + 2])
        raise RuntimeError(message)


def _torchscript_here(name: str, size: int) -> None:
    model = create_classifier(name, num_classes=10).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        if not torch.allclose(scripted(x), model(x), atol=1e-4, rtol=1e-3):
            raise AssertionError("scripted output differs")


def _onnx(name: str, size: int) -> None:
    model = create_classifier(name, num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), io.BytesIO(), dynamo=False)


def _compile(name: str, size: int) -> None:
    model = create_classifier(name, num_classes=10).eval()
    compiled = torch.compile(model)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        if not torch.allclose(compiled(x), model(x), atol=1e-3, rtol=1e-3):
            raise AssertionError("compiled output differs")


def _train_step(name: str, size: int) -> None:
    model = create_classifier(name, num_classes=5).train()
    loss = F.cross_entropy(model(torch.randn(2, 3, size, size)), torch.tensor([0, 1]))
    loss.backward()
    if not torch.isfinite(loss):
        raise AssertionError("non-finite loss")


def _segmentation_step(name: str, size: int) -> str:
    """One training step of semantic segmentation with FCN-8s, else DeepLabV3 (one-level nets): the head used."""
    errors = []
    for head in ("fcn8s", "deeplabv3"):
        try:
            model = build_segmentation_model(head, name, num_classes=3).train()
        except ValueError as exc:  # the backbone lacks the levels this head reads
            errors.append(f"{head}: {exc}")
            continue
        logits = model(torch.randn(2, 3, size, size))
        loss = F.cross_entropy(logits, torch.randint(0, 3, (2, size, size)))
        loss.backward()
        if logits.shape[-2:] != (size, size) or not torch.isfinite(loss):
            raise AssertionError(f"{head}: output {tuple(logits.shape)} or loss {loss.item()} wrong")
        return f"yes ({head})"
    raise RuntimeError("; ".join(errors))


def _detection_step(name: str, size: int) -> str:
    """One training step of Faster R-CNN (FPN neck) on two images with one box each."""
    model = build_detector("faster_rcnn", name, num_classes=3, min_size=size).train()
    images = [torch.rand(3, size, size) for _ in range(2)]
    box = torch.tensor([[size * 0.2, size * 0.25, size * 0.7, size * 0.8]])
    losses = model(images, [{"boxes": box, "labels": torch.tensor([1])}] * 2)
    loss = sum(losses.values())
    loss.backward()
    if not torch.isfinite(loss):
        raise AssertionError("non-finite loss")
    return "yes (faster_rcnn)"


def _published(entry: Any) -> str:
    """The reference implementation's parameter count (parity requires ours to equal it), else the paper's."""
    if entry.reference and ":" in entry.reference:
        return f"{count_parameters(build_reference(entry)):,} ({entry.reference.split(':')[0]})"
    return entry.published_params or "-"


def observe(name: str, with_compile: bool) -> dict[str, Any]:
    """Every column of one backbone's row, observed now."""
    entry = get_backbone_entry(name)
    size = entry.spec.min_input_size
    native = entry.input_size  # exports and layouts are checked where the net is used: at its own size
    row: dict[str, Any] = {"name": name, "family": entry.family, "paper": entry.paper, "reference": entry.reference or "-"}
    try:
        m = measure_backbone(name, entry.input_size)
        row.update(params=f"{m['params']:,}", gflops=f"{m['gflops']:.2f}", native=entry.input_size,
                   levels=" ".join(f"{f.name}:{f.channels}@{f.stride}" for f in m["features"]))
    except Exception as exc:
        row.update(params="-", gflops="-", native=entry.input_size, levels=f"({type(exc).__name__})")
    row["output_stride"] = "/".join(str(s) for s in entry.spec.supported_output_strides)
    row["parity"] = _try(lambda: check_parity(name).split("(")[0].strip() if entry.reference and ":" in entry.reference else "-")
    row["published params"] = _try(lambda: _published(entry))
    row["classification step"] = _try(lambda: _train_step(name, size))
    row["segmentation step"] = _try(lambda: _segmentation_step(name, max(size, 64)))
    row["detection step"] = _try(lambda: _detection_step(name, max(size, 128)))
    row["channels_last"] = _try(lambda: _channels_last(name, native))
    row["TorchScript"] = _try(lambda: _torchscript(name, native))
    row["ONNX"] = _try(lambda: _onnx(name, native))
    row["torch.compile"] = _try(lambda: _compile(name, native)) if with_compile else "not run"
    return row


def render(rows: list[dict[str, Any]], missing: list[str] = ()) -> str:
    """The Markdown page: one row per backbone, then the capability matrix."""
    seconds = sum(r.get("seconds", 0) for r in rows)
    where = ", ".join(sorted({r.get("machine", "?") for r in rows}))
    out = [
        "# Backbones",
        "",
        "Generated by `make docs` (`python -m benchmarks.backbone_docs`) from what the checks observed",
        f"({where}; {seconds / 60:.0f} minutes of observation); do not edit by hand.",
        "Parameters are those of the net with its documented head (1000 classes; 10 for LeNet-5 and the",
        "CIFAR WRNs); beside them, the reference implementation's count (parity requires equality) or the",
        "paper's. GFLOPs are multiply-adds at the net's native resolution (as papers count them). Parity: the",
        "reference implementation with random weights, saved and loaded into ours, gives the same logits",
        "(1e-4 relative) and parameter count. The training-step columns run one step of each task at the",
        "net's smallest input (classification), 64 px (segmentation: FCN-8s where the net has the",
        "stride-8/16/32 levels, else DeepLabV3) and 128 px (detection: Faster R-CNN on an FPN neck);",
        "channels_last, TorchScript and torch.compile must reproduce the eager logits at the native size, and",
        "torch.onnx.export (TorchScript-based exporter) must write the model there.",
        "",
        "| name | family | parameters | reference's / published parameters | GFLOPs | native px | levels (name:channels@stride) | reference | paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(f"| {r['name']} | {r['family']} | {r['params']} | {r['published params']} | {r['gflops']} | {r['native']} "
                   f"| {r['levels']} | {r['reference']} | {r['paper']} |")
    caps = ["output_stride", "parity", "classification step", "segmentation step", "detection step",
            "channels_last", "TorchScript", "ONNX", "torch.compile"]
    out += ["", "## Capabilities", "", "| name | " + " | ".join(caps) + " |", "|---|" + "---|" * len(caps)]
    for r in rows:
        out.append(f"| {r['name']} | " + " | ".join(str(r[c]) for c in caps) + " |")
    if missing:
        out += ["", "Registered but not observed yet (`make docs ARGS=\"--pattern NAME\"`): " + ", ".join(missing)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Observe every backbone matching --pattern, keep the rows, and write the page from all rows kept.

    Rows live in a JSON file beside the page, written after each backbone, so the long run over the
    whole zoo can be done in parts (--pattern) and survives an interruption; a row of a backbone no
    longer registered is dropped.
    """
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pattern", default=None, help="observe only these backbones (shell pattern); the others keep their rows")
    ap.add_argument("--compile", action="store_true", help="also try torch.compile (slow on CPU)")
    ap.add_argument("--out", default="docs/backbones.md")
    ns = ap.parse_args(argv)
    out = Path(ns.out)
    rows_file = out.with_suffix(".json")
    native = [n for n in list_backbones() if not n.startswith("timm/")]
    rows: dict[str, dict[str, Any]] = json.loads(rows_file.read_text()) if rows_file.exists() else {}
    rows = {n: r for n, r in rows.items() if n in native}
    for name in list_backbones(ns.pattern):
        if name.startswith("timm/"):
            continue
        t0 = time.time()
        row = observe(name, ns.compile)
        row.update(seconds=round(time.time() - t0, 1), machine=f"{platform.machine()}, torch {torch.__version__}")
        rows[name] = row
        rows_file.write_text(json.dumps(dict(sorted(rows.items())), indent=1) + "\n")
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("paper", "levels")), flush=True)
    out.write_text(render([rows[n] for n in native if n in rows], [n for n in native if n not in rows]))
    print(f"wrote {out} ({len(rows)} of {len(native)} backbones observed)")


if __name__ == "__main__":
    main()
