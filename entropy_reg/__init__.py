"""entropy-reg: Adaptive Entropy Regularization (AER) for RL on LLMs.

Kernels: :func:`token_entropy`, :func:`token_logprobs_and_entropy`, and
:func:`linear_token_entropy` (straight from the lm_head input).
Controllers: :class:`DifficultyAllocator`, :class:`AnchoredTarget`,
:class:`GlobalCoefficientController`, wired together by
:class:`AdaptiveEntropyRegularizer`; :func:`masked_mean` reduces statistics
across data-parallel ranks.
"""

from .aggregation import AGG_MODES, aggregate
from .controller import GlobalCoefficientController
from .difficulty import DifficultyAllocator
from .distributed import all_reduce_sum, masked_mean
from .entropy import token_entropy, token_logprobs_and_entropy
from .linear import linear_token_entropy
from .regularizer import AdaptiveEntropyRegularizer, AERConfig
from .target import AnchoredTarget

__version__ = "0.2.0"

__all__ = [
    "token_entropy",
    "token_logprobs_and_entropy",
    "linear_token_entropy",
    "DifficultyAllocator",
    "AnchoredTarget",
    "GlobalCoefficientController",
    "AdaptiveEntropyRegularizer",
    "AERConfig",
    "masked_mean",
    "all_reduce_sum",
    "aggregate",
    "AGG_MODES",
    "__version__",
]
