"""The entropy-reg demo: a real (tiny) RLVR run on the CPU that shows entropy collapse and what AER does.

``python -m entropy_reg.demo`` (or ``entropy-reg demo``, or ``make demo``) trains a
tiny transformer with GRPO on the ``modes`` task (a finite prompt pool with a rare
answer mode, where entropy collapse costs) in several arms (no entropy term,
Clip-Higher, a low and a high fixed coefficient, AER, and with ``--ablate`` AER
minus each component) and writes a table, a figure and a JSON of every number to
``demo_out/``. Needs the ``demo`` extra (matplotlib, tqdm); the core package does not.
"""

from .runner import add_arguments, main, run

__all__ = ["add_arguments", "main", "run"]
