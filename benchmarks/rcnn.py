"""The lecture's R-CNN / Fast R-CNN / Faster R-CNN comparison, timed side by side in one run.

    python -m benchmarks rcnn [--backbone resnet18] [--images 4] [--repeats 3] [--runs fast_rcnn=<run> ...]

Every detector of the table that has no masks (read at run time: those that have not landed are
left out), in the lecture's order: R-CNN, Fast R-CNN, SPP-net's pooling (``faster_rcnn`` with
``roi=spp``, where that pooler exists), Faster R-CNN, R-FCN, then the single-stage detectors. All
on the same backbone (random weights: the work per image does not depend on them), the same
images (the first ``--images`` validation scenes of configs/detection.yaml, letterboxed to its
size) and the settings of that config (neck width, image size). Trains nothing. Per detector:

- test time per image: the eval forward of the batch of images, over their number; for the
  detectors that read external proposals, selective search's time per image is measured apart
  (the lecture's "2 s of region proposals") and added for the total;
- training step: forward, backward and an SGD step on the batch of images (proposals, computed
  once per scene and kept with the data, cost training nothing);
- with ``--runs name=<run folder> ...``: the val and test mAP@0.5 of those trained runs (their metrics.json).

The detectors are timed in turn within each repeat (round robin), so all see the same machine
state; each figure is the median over ``--repeats``, on one thread by default (``--threads``). With ``--recall-scenes N`` (default: the
config's whole validation split) it also measures selective search's recall at IoU 0.5 on N
validation scenes: the share of objects any proposal-based detector can find at all.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import yaml

from cvtasks.detection.models import DETECTORS, ROI_POOLERS
from cvtasks.detection.proposals import proposal_recall, selective_search
from cvtasks.runs import RunFolder
from cvtasks.visualize import to_uint8

from .data import CONFIGS, _build, default_data

# The lecture's order, each (label, table name, setting: roi and/or detector keywords); names not in the
# table (not landed yet) are skipped; the table's other detectors follow in its order. R-CNN also at the
# paper's 227 px warp: its cost grows with the square of the warp, and 32 px hides most of the lecture's gap.
ORDER: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("R-CNN", "rcnn", {}), ("R-CNN, the paper's 227 px warp", "rcnn", {"crop_size": 227}),
    ("SPP-net pooling", "faster_rcnn", {"roi": "spp"}), ("Fast R-CNN", "fast_rcnn", {}),
    ("Faster R-CNN", "faster_rcnn", {}), ("R-FCN", "rfcn", {}),
)


def row_key(name: str, setting: dict[str, Any]) -> str:
    """How ``--runs`` names a row: the table name, then ``:key=value`` per setting (``faster_rcnn:roi=spp``)."""
    return name + "".join(f":{k}={v}" for k, v in setting.items())


@dataclass
class Entry:
    """One row: a detector built for the benchmark and its measured seconds."""

    label: str
    name: str
    setting: dict[str, Any]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    test: list[float]
    step: list[float]

    @property
    def key(self) -> str:
        """The row's ``--runs`` name."""
        return row_key(self.name, self.setting)


def lineup() -> list[tuple[str, str, dict[str, Any]]]:
    """(label, table name, setting) of every detector to time: the lecture's order, then the single-stage ones."""
    rows = [(label, name, setting) for label, name, setting in ORDER
            if name in DETECTORS and not DETECTORS[name].masks and setting.get("roi", "align") in ROI_POOLERS]
    named = {name for _, name, _ in ORDER}
    rows += [(name, name, {}) for name, spec in DETECTORS.items() if not spec.masks and name not in named]
    return rows


def _scenes(n: int, **data: Any) -> tuple[list[torch.Tensor], list[dict[str, Any]], Any]:
    """The first ``n`` validation scenes of the detection config (eval transform), and the data module."""
    dm = default_data("detection", num_workers=0, **data)
    dm.setup("validate")
    val = dm._datasets["val"]
    items = [val[i] for i in range(min(n, len(val)))]
    return [x for x, _ in items], [t for _, t in items], dm


def _timed(fn: Callable[[], None], out: list[float]) -> None:
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)


def recall_on_val(scenes: int) -> tuple[float, float, int]:
    """Selective search's recall at IoU 0.5 and 0.7 on the first ``scenes`` validation scenes, and their object count."""
    images, targets, _ = _scenes(scenes)
    proposals = [selective_search(to_uint8(x).permute(1, 2, 0).numpy()) for x in images]
    boxes = [t["boxes"].numpy() for t in targets]
    return proposal_recall(proposals, boxes, 0.5), proposal_recall(proposals, boxes, 0.7), sum(len(b) for b in boxes)


def run_map(run: str) -> tuple[float, float]:
    """val and test mAP@0.5 of a trained run (its metrics.json)."""
    metrics = RunFolder.from_name(run).metrics()
    return metrics.get("val/map_50", float("nan")), metrics.get("test/map_50", float("nan"))


def measure(backbone: str, n_images: int, repeats: int, **model: Any) -> tuple[list[Entry], float, int]:
    """Every detector's seconds (test per image, train step) and selective search's seconds per image; the image size.

    Each detector is configs/detection.yaml's model (neck width, resize bounds = the data's size)
    with its ``detector`` and ``roi`` swapped in; ``model`` overrides more of the config's keywords.
    """
    images, targets, dm = _scenes(n_images)
    size = dm.img_size
    pixels = [to_uint8(x).permute(1, 2, 0).numpy() for x in images]
    proposals = [torch.from_numpy(selective_search(p)) for p in pixels]
    config = yaml.safe_load((CONFIGS / "detection.yaml").read_text())["model"]
    entries = []
    for label, name, setting in lineup():
        torch.manual_seed(0)
        keywords = {k: v for k, v in setting.items() if k != "roi"}
        task = _build(config, backbone=backbone, num_classes=dm.num_classes, class_names=dm.class_names,
                      min_size=size, max_size=size, detector=name, roi=setting.get("roi"),
                      **({"detector_kwargs": keywords} if keywords else {}), **model)
        entries.append(Entry(label, name, setting, task.model, torch.optim.SGD(task.parameters(), lr=1e-4, momentum=0.9), [], []))

    def extra(e: Entry) -> dict[str, Any]:
        return {"proposals": proposals} if e.model.proposals else {}

    def test(e: Entry) -> None:
        e.model.eval()
        with torch.no_grad():
            e.model(images, **extra(e))

    def step(e: Entry) -> None:
        e.model.train()
        losses = e.model(images, targets, **extra(e))
        e.optimizer.zero_grad()
        torch.stack(list(losses.values())).sum().backward()
        e.optimizer.step()

    search: list[float] = []
    for e in entries:  # warm-up: first-call allocations are no one's cost
        test(e)
        step(e)
    for _ in range(repeats):
        _timed(lambda: [selective_search(p) for p in pixels], search)
        for e in entries:
            _timed(lambda: test(e), e.test)
            _timed(lambda: step(e), e.step)
    return entries, statistics.median(search) / len(images), size


def table(entries: list[Entry], search: float, n_images: int, maps: dict[str, tuple[float, float]]) -> str:
    """The markdown table: proposals, network and total test seconds per image, the train step, mAP@0.5 of given runs."""
    fast = next((e for e in entries if e.key == "fast_rcnn"), None)
    fast_total = (statistics.median(fast.test) / n_images + search) if fast else None
    lines = ["| detector | proposals s/img | network s/img | test s/img | test vs Fast R-CNN | train step s "
             f"({n_images} img) | val mAP@0.5 | test mAP@0.5 |", "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        net = statistics.median(e.test) / n_images
        prop = search if e.model.proposals else 0.0
        total = net + prop
        label = e.label + (f" (`{e.key}`)" if e.label != e.key else "")
        val, test = maps.get(e.key, (float("nan"), float("nan")))
        vs = f"{total / fast_total:.2f}x" if fast_total else "-"
        lines.append(f"| {label} | {prop:.3f} | {net:.3f} | {total:.3f} | {vs} | {statistics.median(e.step):.3f} | "
                     f"{'-' if np.isnan(val) else f'{val:.3f}'} | {'-' if np.isnan(test) else f'{test:.3f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Print (and return) the comparison table, the lecture's ratios and, if asked, the proposals' recall."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--images", type=int, default=4, help="validation scenes per timed batch")
    ap.add_argument("--repeats", type=int, default=3)
    # on a loaded machine two threads stall each other whenever one is preempted (measured: every row
    # 2-15x slower, unevenly); one thread keeps the ratios, which is what this benchmark reports
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (0: torch's default)")
    ap.add_argument("--runs", nargs="*", default=[], metavar="NAME=RUN",
                    help="trained runs whose mAP@0.5 to show, e.g. fast_rcnn=fast_rcnn-default (faster_rcnn:roi=spp=<run> for a row with a setting)")
    ap.add_argument("--recall-scenes", type=int, default=None, help="validation scenes for the proposals' recall (default: all; 0: skip)")
    ns = ap.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    maps = {}
    for item in ns.runs:
        name, sep, run = item.rpartition("=")
        if not sep or not run:
            raise SystemExit(f"--runs takes NAME=RUN pairs (e.g. fast_rcnn=fast_rcnn-default), got {item!r}")
        maps[name] = run_map(run)
    entries, search, size = measure(ns.backbone, ns.images, ns.repeats)
    out = [f"{ns.backbone}, {ns.images} validation scenes at {size} px, {torch.get_num_threads()} threads, "
           f"median of {ns.repeats}; selective search {search:.3f} s per image", "", table(entries, search, ns.images, maps)]
    by = {e.key: statistics.median(e.test) / ns.images for e in entries}
    if "fast_rcnn" in by:
        fast_total = by["fast_rcnn"] + search
        out.append("")
        for key in ("rcnn", row_key("rcnn", {"crop_size": 227})):
            if key in by:
                out.append(f"{key} / fast_rcnn at test: {(by[key] + search) / fast_total:.1f}x "
                           f"(networks alone: {by[key] / by['fast_rcnn']:.1f}x)")
        out.append(f"proposals are {search / fast_total:.0%} of Fast R-CNN's test time")
        if "faster_rcnn" in by:
            out.append(f"faster_rcnn / fast_rcnn at test (proposals included): {by['faster_rcnn'] / fast_total:.2f}x")
    scenes = ns.recall_scenes
    if scenes is None or scenes > 0:
        n = scenes if scenes is not None else 10**9
        r50, r70, objects = recall_on_val(n)
        out += ["", f"selective search recall on {'the validation split' if scenes is None else f'{n} validation scenes'} "
                    f"({objects} objects): {r50:.3f} at IoU 0.5, {r70:.3f} at IoU 0.7"]
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()
