"""`r1lab report RUN_DIR [RUN_DIR ...] [-o out.html] [--price-per-hour X]`: one self-contained HTML report.

r1lab report runs/grpo-tiny                              -> runs/grpo-tiny/report.html
r1lab report runs/grpo runs/dr-grpo -o compare.html      (curves of both runs on the same axes)
"""

from __future__ import annotations

from pathlib import Path

from r1lab.report.html import write_report


def add_arguments(parser) -> None:
    parser.add_argument("run_dirs", nargs="+", help="run directories (curves of several runs are overlaid)")
    parser.add_argument("-o", "--out", default=None, help="output file (default: FIRST_RUN_DIR/report.html)")
    parser.add_argument(
        "--price-per-hour", type=float, default=None, help="US$ per hour of the machine the runs used"
    )


def run(args) -> int:
    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "report.html"
    path = write_report(args.run_dirs, out, args.price_per_hour)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
    return 0
