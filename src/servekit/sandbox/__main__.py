"""``python -m servekit.sandbox {up,down,status,images,engine}``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..checkout import CheckoutError
from . import IMAGE_NAMES, SandboxError, down, ensure_docker_engine, ensure_images, status, up


def _progress():
    start = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {message}", flush=True)

    return progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m servekit.sandbox", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="bring the sandbox up (idempotent)")
    p_up.add_argument("--hosts", type=int, default=1, help="number of sandbox hosts (default 1)")
    p_up.add_argument(
        "--gateway", action="store_true", help="fleet mode: a gateway host in front of the hosts"
    )
    sub.add_parser("down", help="remove the sandbox hosts, the registry, and stop the mirror")
    sub.add_parser("status", help="print what runs, as JSON")
    p_img = sub.add_parser("images", help="build the images that are missing")
    p_img.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(IMAGE_NAMES)}")
    sub.add_parser("engine", help="install/start the local Docker engine if it does not answer")
    args = parser.parse_args(argv)
    if args.command == "images" and (unknown := set(args.names) - set(IMAGE_NAMES)):
        parser.error(f"unknown image(s): {', '.join(sorted(unknown))}")
    progress = _progress()
    try:
        if args.command == "up":
            ensure_docker_engine(progress)
            up(args.hosts, gateway=args.gateway, progress=progress)
        elif args.command == "down":
            down(progress=progress)
        elif args.command == "status":
            print(json.dumps(status(), indent=2))
        elif args.command == "images":
            ensure_docker_engine(progress)
            for name, ref in ensure_images(args.names or IMAGE_NAMES, progress=progress).items():
                print(f"{name}: {ref}")
        elif args.command == "engine":
            ensure_docker_engine(progress)
    except (SandboxError, CheckoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
