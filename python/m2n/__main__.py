"""`python -m m2n unique-id HOST:PORT`: print a fresh unique id for a launcher."""

from __future__ import annotations

import argparse
import sys

from . import Error, unique_id


def main(argv: list[str] | None = None) -> int:
    """Run the command line."""
    parser = argparse.ArgumentParser(prog="python -m m2n", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    uid = sub.add_parser("unique-id", help="print a unique id whose root the rank on HOST serves")
    uid.add_argument("addr", help="HOST:PORT (an IP address) where rank 0 will serve the root")
    args = parser.parse_args(argv)
    try:
        print(unique_id(args.addr))
    except Error as e:
        print(f"python -m m2n: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
