"""`python -m service serve|keys ...`: the service's commands without the rest of `reid`."""
from __future__ import annotations

import argparse
import sys

from reid.errors import ReidError
from service.commands import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description="wildreid web service")
    commands = register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        commands[args.command](args)
    except ReidError as exc:
        print(f"reid {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
