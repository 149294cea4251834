"""The verl adapter's checkpoints: ``aer_state.json`` in verl's ``global_step_N/`` folders.

Written before verl's ``_save_checkpoint`` (which ends by marking the step complete in
``latest_checkpointed_iteration.txt``), read back when verl resumes from that folder; a resume that
finds none raises unless ``+aer.reanchor_on_missing_state=true``.
"""

from __future__ import annotations

import os
from typing import Any

from .. import check_resumed
from .config import RESUME_SETTING
from .driver import VerlAER


def resume_folder(trainer_config: Any, global_steps: int) -> str:
    """The ``global_step_N`` folder verl resumed from (relative paths are taken from the cwd, as verl does)."""
    if trainer_config.resume_mode == "resume_path":
        return os.path.abspath(trainer_config.resume_from_path)
    return os.path.join(os.path.abspath(trainer_config.default_local_dir), f"global_step_{global_steps}")


def load_on_resume(trainer: Any) -> None:
    """After verl's ``_load_checkpoint``: restore AER's state when verl resumed (``global_steps > 0``);
    a checkpoint without it raises unless ``+aer.reanchor_on_missing_state=true`` (:func:`check_resumed`)."""
    if trainer.global_steps > 0:
        folder = resume_folder(trainer.config.trainer, trainer.global_steps)
        check_resumed(trainer.aer.regularizer, trainer.aer.load(folder, missing_ok=True), folder, RESUME_SETTING)


def save_before_verl(trainer: Any) -> None:
    """``global_step_N/aer_state.json``, written before verl's ``_save_checkpoint``, which ends by marking the
    step complete (``latest_checkpointed_iteration.txt``, what ``resume_mode=auto`` reads)."""
    trainer.aer.save(os.path.join(trainer.config.trainer.default_local_dir, f"global_step_{trainer.global_steps}"))


class AERCheckpointCallback:
    """verl checkpoint callback (``trainer.checkpoint_callback_class``) that saves the trainer's AER state.

    ``on_save`` writes ``checkpoint_dir/aer_state.json`` from ``trainer.aer``,
    then calls ``inner`` (the callback verl built from the user's
    ``trainer.checkpoint_callback_class``, if any), so both run.
    """

    def __init__(self, config: Any = None, inner: Any = None) -> None:
        self.config = config
        self.inner = inner

    def on_save(self, trainer: Any, global_step: int, checkpoint_dir: str, async_save: bool = False, **kwargs: Any):
        aer = getattr(trainer, "aer", None)
        if not isinstance(aer, VerlAER):
            raise TypeError(f"AERCheckpointCallback: the trainer has no VerlAER at .aer ({type(trainer).__name__})")
        aer.save(checkpoint_dir)
        if self.inner is not None:
            self.inner.on_save(
                trainer=trainer, global_step=global_step, checkpoint_dir=checkpoint_dir, async_save=async_save,
                **kwargs,
            )
