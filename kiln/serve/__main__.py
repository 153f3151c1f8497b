"""`python -m kiln.serve MODEL [options]`: the same as `kiln serve`."""

from __future__ import annotations

import argparse
import sys

from kiln.errors import KilnError
from kiln.serve.cli import add_serve_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.serve")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(commands)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.func(args)
    except (KilnError, ValueError) as error:
        print(f"kiln: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
