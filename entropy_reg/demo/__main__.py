"""``python -m entropy_reg.demo [--quick] [--steps N] [--seeds N] [--device cuda] [--out DIR] [--ablate]``."""

from .runner import main

raise SystemExit(main(prog="python -m entropy_reg.demo"))
