"""Writes the dashboards' JSON from `dashboards/boards.py`: `python -m dashboards.build`.

`--check` writes nothing and fails when the committed JSON differs from what the code builds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dashboards.boards import every_dashboard

GRAFANA_DIR = Path(__file__).resolve().parent / "grafana"


def rendered() -> dict[str, str]:
    """File name -> JSON text, for every dashboard."""
    return {
        f"{board.uid.removeprefix('sluis-')}.json": json.dumps(board.json(), indent=2) + "\n"
        for board in every_dashboard()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.build", description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name, text in rendered().items():
        path = GRAFANA_DIR / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
            continue
        GRAFANA_DIR.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m dashboards.build", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
