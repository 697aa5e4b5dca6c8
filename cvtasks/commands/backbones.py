"""List the registered backbones: family, parameters, GFLOPs, levels, reference."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    """``python -m cvtasks backbones [PATTERN] [--size N|native] [--no-flops]``."""
    from ..summary import backbone_table

    ap = argparse.ArgumentParser(prog="python -m cvtasks backbones", description="List the registered backbones.")
    ap.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. 'resnet*' or 'vgg'")
    ap.add_argument("--size", default="224", help="input size for GFLOPs: a number or 'native'")
    ap.add_argument("--no-flops", action="store_true", help="skip building each net to count parameters and FLOPs")
    ns = ap.parse_args(argv)
    print(backbone_table(ns.pattern, size=ns.size, measure=not ns.no_flops))
    return 0
