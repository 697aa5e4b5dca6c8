"""How far the tests that assert training outcomes sit from their limits, over seeds and threads.

    .venv/bin/python tests/spread.py            # seeds 0-4 on 1 and 2 threads: a markdown table

Each test module keeps a measuring function and its limits beside the test that asserts them
(``overfit_one_batch`` and ``OVERFIT_LIMITS``, ...). Every seed and thread count runs in a fresh
process, as the test suite would on another machine; the table shows the worst value of each.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: test module, its measuring function, the name of its limits, and the test that asserts them
CHECKS = [
    ("test_classification_task", "overfit_one_batch", "OVERFIT_LIMITS", "test_training_lowers_the_loss"),
    ("test_segmentation_task", "overfit_scenes", "OVERFIT_LIMITS", "test_short_training_lowers_loss_and_beats_chance"),
    ("test_yolo", "overfit_one_image", "OVERFIT_LIMITS", "test_loss_decreases_when_overfitting_one_image"),
    ("test_cornernet", "overfit_one_image", "OVERFIT_LIMITS", "test_overfitting_one_image_finds_an_object"),
]


def measure_once(module: str, function: str, seed: int, threads: int) -> dict[str, float]:
    """One measurement in this process."""
    import torch

    sys.path.insert(0, str(HERE))
    torch.set_num_threads(threads)
    return getattr(importlib.import_module(module), function)(seed)


def main(seeds: range = range(5), threads: tuple[int, ...] = (1, 2)) -> None:
    """Measure every check in fresh processes and print test, value, limit, min, max."""
    rows = ["| test | value | limit | min | max | runs |", "|---|---|---|---|---|---|"]
    for module, function, limits_name, test in CHECKS:
        sys.path.insert(0, str(HERE))
        limits = getattr(importlib.import_module(module), limits_name)
        runs = []
        for seed in seeds:
            for n in threads:
                out = subprocess.run([sys.executable, __file__, "--one", module, function, str(seed), str(n)],
                                     capture_output=True, text=True, check=True, cwd=HERE.parent)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        for name, (op, limit) in limits.items():
            values = [r[name] for r in runs]
            rows.append(f"| {module}::{test} | {name} | {op} {limit} | {min(values):.4f} | {max(values):.4f} | {len(values)} |")
    print("\n".join(rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        _, _, mod, fn, seed, n = sys.argv
        print(json.dumps(measure_once(mod, fn, int(seed), int(n))))
    else:
        main()
