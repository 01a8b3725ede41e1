"""``python -m servekit.mirror ROOT [--host H] [--port P]``: run the mirror."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from servekit.mirror.server import DEFAULT_HOST, DEFAULT_PORT, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m servekit.mirror",
        description="Serve ROOT/<owner>/<name>/ model directories to the ModelScope SDK.",
    )
    parser.add_argument("root", type=Path)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a directory")
    try:
        serve(args.root, host=args.host, port=args.port)
    except OSError as exc:  # e.g. the port is taken
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
