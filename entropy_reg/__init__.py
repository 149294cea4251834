"""entropy-reg: Adaptive Entropy Regularization (AER) for RL on LLMs.

Kernels: :func:`token_entropy`, :func:`token_logprobs_and_entropy`.
"""

from .entropy import token_entropy, token_logprobs_and_entropy

__version__ = "0.1.0"

__all__ = ["token_entropy", "token_logprobs_and_entropy", "__version__"]
