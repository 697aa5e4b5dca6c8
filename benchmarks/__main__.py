"""`make bench`: both benchmarks in one run, each a ratio measured side by side.

    python -m benchmarks [backbones|lightning] [their options]
"""

import sys

from . import backbones, lightning_loop


def main() -> None:
    args = sys.argv[1:]
    which = args[0] if args and args[0] in ("backbones", "lightning") else None
    rest = args[1:] if which else args
    if which in (None, "lightning"):
        print("== Lightning epoch over a plain PyTorch loop")
        lightning_loop.main(rest if which else [])
    if which in (None, "backbones"):
        print("\n== native backbone over its reference, forward+backward")
        backbones.main(rest if which else [])


if __name__ == "__main__":
    main()
