"""The ``embseg`` command line: one entry point, subcommands, thin over the Python API.

User errors (:class:`embseg.errors.UserError`) print one line and exit with code 2; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from embseg.errors import UserError


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from embseg.evaluate import evaluate_folders, format_report, write_json

    thresholds = None
    if args.thresholds:
        thresholds = [float(t) for t in args.thresholds.split(",")]
    result = evaluate_folders(args.gt_dir, args.pred_dir, thresholds=thresholds)
    print(format_report(result))
    if args.json:
        write_json(result, args.json, overwrite=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``embseg`` with all subcommands."""
    parser = argparse.ArgumentParser(prog="embseg", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("evaluate", help="score predicted label images against ground truth")
    p.add_argument("gt_dir", help="folder of ground-truth label TIFFs")
    p.add_argument("pred_dir", help="folder of predicted label TIFFs (paired by file name)")
    p.add_argument("--thresholds", help="comma-separated IoU thresholds (default by ndim)")
    p.add_argument("--json", help="write all figures to this JSON file")
    p.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``embseg`` command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        if args.debug:
            raise
        print(f"embseg: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("embseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
