"""The `tfbn` command. Thin: each subcommand parses its flags, calls one library
function, prints its result and returns the exit code (0 ok, 1 findings/failure,
2 bad usage). Library modules are imported inside the handlers so `tfbn --help`
stays fast.

To add a subcommand: write `_add_<name>(subparsers)` that registers its flags and
sets `func`, and list it in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import os
import sys


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(
            f"a shape is positive integers separated by commas, e.g. 32,56,56,64; got {text!r}"
        )
    return dims


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time tfbn against keras.layers.BatchNormalization and the raw fused op",
        description="Training-step and inference timings (medians, ratios vs tfbn, one run).",
    )
    p.add_argument("--shape", type=_shape, action="append", dest="shapes",
                   help="input shape (repeatable); default: the four README shapes")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per implementation")
    p.add_argument("--json", dest="json_path", help="also write the rows as JSON here")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    from tfbn import bench

    bench.main(tuple(args.shapes) if args.shapes else bench.DEFAULT_SHAPES,
               args.repeats, args.json_path)
    return 0


SUBCOMMANDS = (_add_bench,)


def build_parser() -> argparse.ArgumentParser:
    from tfbn import __version__

    parser = argparse.ArgumentParser(
        prog="tfbn", description="Batch Normalization for TensorFlow/Keras 3, to TF Serving."
    )
    parser.add_argument("--version", action="version", version=f"tfbn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"tfbn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
