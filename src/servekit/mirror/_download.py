"""Child process of :func:`servekit.mirror.fetch`: one ``snapshot_download`` with the real SDK.

It runs in its own interpreter because the SDK reads its endpoint and limits from the
environment once, when it is imported. On failure the last line on stderr is
``error: <exception type>: <first line of its message>``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m servekit.mirror._download")
    parser.add_argument("model_id")
    parser.add_argument("local_dir")
    parser.add_argument("--revision", default=None)
    args = parser.parse_args(argv)

    from modelscope.hub.snapshot_download import snapshot_download

    try:
        snapshot_download(args.model_id, revision=args.revision, local_dir=args.local_dir)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        detail = str(exc).strip()
        if "\n" in detail:
            print(detail, file=sys.stderr)
        first = detail.splitlines()[0] if detail else ""
        print(f"error: {type(exc).__name__}: {first}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
