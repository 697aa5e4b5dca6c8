"""`make bench`: both benchmarks in one run, each a ratio measured side by side.

    python -m benchmarks [backbones|lightning|data|rcnn] [their options]
    python -m benchmarks throughput --device cuda      (not in the default run: it needs a GPU)
    python -m benchmarks baseline <folder> | digits-folder <out>   (classical baselines; see benchmarks/baseline.py)
"""

import sys

from . import backbones, baseline, data, lightning_loop, rcnn, throughput


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] in baseline.COMMANDS:  # a user's folder, not a side-by-side timing: never part of the default run
        baseline.COMMANDS[args[0]](args[1:])
        return
    if args and args[0] == "throughput":
        throughput.main(args[1:])
        return
    which = args[0] if args and args[0] in ("backbones", "lightning", "data", "rcnn") else None
    rest = args[1:] if which else args
    if which in (None, "lightning"):
        print("== Lightning epoch over a plain PyTorch loop")
        lightning_loop.main(rest if which else [])
    if which in (None, "data"):
        print("\n== the data path: loaders per core, step with the real loader over a fixed batch, folder vs torchvision")
        data.main(rest if which else [])
    if which in (None, "backbones"):
        print("\n== native backbone over its reference, forward+backward")
        backbones.main(rest if which else [])
    if which in (None, "rcnn"):
        print("\n== the lecture's comparison: R-CNN, Fast R-CNN (proposals apart), Faster R-CNN, ... at test and per training step")
        rcnn.main(rest if which else [])


if __name__ == "__main__":
    main()
