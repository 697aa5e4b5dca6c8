"""`python -m cvtasks ...`: the commands of cvtasks.commands by name, anything else to the LightningCLI."""

from __future__ import annotations

import os
import sys
from typing import Sequence

from .registry import PluginLoadError, UnknownBackboneError

#: errors a user causes (a name, a path, a value): one line on stderr and exit status 2, no traceback
USER_ERRORS = (UnknownBackboneError, PluginLoadError, FileNotFoundError, ValueError, FloatingPointError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a cvtasks command or a Lightning subcommand (fit, validate, test, predict); returns the exit status."""
    from .commands import COMMANDS, command_help, run_command

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in COMMANDS:
            return run_command(args[0], args[1:])
        if args in ([], ["-h"], ["--help"]):
            print("cvtasks commands (python -m cvtasks COMMAND --help):\n" + command_help() + "\n")
        from .cli import CvtasksCLI

        CvtasksCLI(None if argv is None else args)
        return 0
    except USER_ERRORS as exc:
        if os.environ.get("CVTASKS_DEBUG"):
            raise
        print(f"cvtasks: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
