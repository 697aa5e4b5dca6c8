"""The anatomy of a net: each layer's output shape, parameters, multiply-adds, stride and receptive field."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    """``python -m cvtasks summary NAME [--size PX] [--depth N]``: the table of one registered net."""
    from ..anatomy import anatomy_table

    ap = argparse.ArgumentParser(prog="python -m cvtasks summary", description=__doc__)
    ap.add_argument("name", help="a registered backbone (make backbones lists them), a plugin's included")
    ap.add_argument("--size", type=int, default=224, help="input size in pixels (default: 224, as make backbones)")
    ap.add_argument("--depth", type=int, default=None,
                    help="one row per module this many levels deep (default: every layer)")
    ns = ap.parse_args(argv)
    print(anatomy_table(ns.name, ns.size, ns.depth))
    return 0
