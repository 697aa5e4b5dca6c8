"""Run the backbone conformance checks (levels, in_chans, output_stride, training step, weights, parity)."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    """``python -m cvtasks check-backbone NAME [NAME ...] [--no-parity]``; 1 when a check fails."""
    from ..checks import check_backbone

    ap = argparse.ArgumentParser(prog="python -m cvtasks check-backbone", description="Run the backbone conformance checks.")
    ap.add_argument("names", nargs="+", help="registered backbone names")
    ap.add_argument("--no-parity", action="store_true", help="skip the reference-parity check")
    ns = ap.parse_args(argv)
    ok = True
    for name in ns.names:
        report = check_backbone(name, parity=not ns.no_parity)
        print(report)
        ok &= report.ok
    return 0 if ok else 1
