"""python -m deploy.grafana [--check]: write the dashboard JSON, or check that the checked-in one is current."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from deploy.grafana.dashboard import DASHBOARD_FILE, render


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.grafana", description="Write the Grafana dashboard.")
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs from the code")
    parser.add_argument("--output", type=Path, default=DASHBOARD_FILE, help=f"default: {DASHBOARD_FILE}")
    args = parser.parse_args(argv)
    generated = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        if current != generated:
            print(f"differs from deploy/grafana/dashboard.py: {args.output}", file=sys.stderr)
            print("regenerate with: python -m deploy.grafana", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(generated, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
