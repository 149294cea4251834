"""The ``entropy-reg`` console command.

``entropy-reg --version`` prints the installed version. Subcommands:

- ``entropy-reg demo [--quick] [--steps N] [--seeds N] [--device cuda] [--out DIR] [--ablate]``:
  the CPU demo of entropy collapse and AER (needs ``pip install 'entropy-reg[demo]'``).
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="entropy-reg", description="Adaptive Entropy Regularization tools.")
    parser.add_argument("--version", action="version", version=f"entropy-reg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # Importing the demo's argument definitions pulls in torch only, not matplotlib or tqdm.
    from .demo import add_arguments, run

    demo = add_arguments(sub.add_parser("demo", help="run the CPU demo: entropy collapse vs AER"))
    demo.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
