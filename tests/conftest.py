"""Test set-up shared by every module.

The Triton kernels run on the CPU through Triton's interpreter, which must be
switched on before triton is imported; entropy_reg imports triton lazily, so
setting it here is early enough.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Inductor's FX-graph cache outlives a change of a custom op's fake (meta) function and then
# replays stale output shapes; tests compile from scratch.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("default", deadline=None, max_examples=30, derandomize=True)
settings.load_profile("default")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def registry():
    """(verl tests) Restore verl's trainer registry and main_ppo_v0's trainer name after install()."""
    from verl.trainer import main_ppo_v0
    from verl.trainer.ppo.v1 import trainer_base

    saved, legacy = dict(trainer_base.TRAINER_REGISTRY), main_ppo_v0.RayPPOTrainer
    yield
    trainer_base.TRAINER_REGISTRY.clear()
    trainer_base.TRAINER_REGISTRY.update(saved)
    main_ppo_v0.RayPPOTrainer = legacy
