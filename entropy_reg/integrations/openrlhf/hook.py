"""Swap AER's subclasses into OpenRLHF in every process: Ray's ``worker_process_setup_hook``.

OpenRLHF 0.11.2 has no extension points: ``BasePPOTrainer.__init__`` builds
``RemoteExperienceMaker`` and ``PolicyModelActor.init_model_from_pretrained``
builds ``ActorPPOTrainer``, each looked up by name in its module when called,
and ``train_ppo_ray`` imports ``PolicyModelActor`` by name. Rebinding those
names to subclasses (:mod:`.maker`, :mod:`.actor`) is therefore the whole
integration. It must happen in each Ray worker, which is what
``runtime_env={"worker_process_setup_hook": HOOK}`` runs (the launcher sets it).

The swap happens when the OpenRLHF module is imported, not when the hook
runs: the hook runs in every worker of the job, vLLM engines included, and
OpenRLHF keeps DeepSpeed out of those on purpose (its ``trainer/ray/__init__``
says so). :func:`install` costs nothing in a process that never imports
OpenRLHF's trainer modules.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Any

__all__ = ["HOOK", "install", "uninstall", "installed"]

HOOK = f"{__name__}.install"

# OpenRLHF module whose names are swapped -> our module that holds the subclasses in ``REPLACES``.
_TARGETS = {
    "openrlhf.trainer.ppo_trainer": "entropy_reg.integrations.openrlhf.maker",
    "openrlhf.trainer.ray.ppo_actor": "entropy_reg.integrations.openrlhf.actor",
}
_OURS = {ours: target for target, ours in _TARGETS.items()}
_originals: dict[tuple[str, str], Any] = {}
_installed = False


def installed() -> bool:
    """True between :func:`install` and :func:`uninstall`."""
    return _installed


def _swap(target_name: str) -> None:
    """Rebind the names once both modules are complete; otherwise the later one to finish does it."""
    target = sys.modules.get(target_name)
    # REPLACES is the last assignment of our module: absent while that module is still importing.
    replaces = getattr(sys.modules.get(_TARGETS[target_name]), "REPLACES", None)
    if target is None or replaces is None:
        return
    for name, cls in replaces.items():
        _originals.setdefault((target_name, name), getattr(target, name))
        setattr(target, name, cls)


def apply_if_installed(our_module: str) -> None:
    """Called by :mod:`.maker` and :mod:`.actor` as the last line of their import."""
    if _installed:
        _swap(_OURS[our_module])


def _after_import(target_name: str) -> None:
    # When our module is what imported the target (Ray unpickling an actor class), this
    # returns it half-initialized and its own last line does the swap.
    importlib.import_module(_TARGETS[target_name])
    _swap(target_name)


class _SwapAfterExec(importlib.abc.Loader):
    """Wraps the target module's loader: run the module, then swap."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _after_import(self._name)

    def __getattr__(self, attr: str) -> Any:  # get_code, get_source, ... of the real loader
        return getattr(self._loader, attr)


class _SwapOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                spec.loader = _SwapAfterExec(spec.loader, fullname)
                return spec
        return None


_FINDER = _SwapOnImport()


def install() -> None:
    """Make OpenRLHF build AER's experience maker, actor trainer and policy actor in this process.

    Ray runs it in each worker (``worker_process_setup_hook``); the launcher runs
    it in the driver. Modules already imported are swapped now, the others when
    they are imported. Idempotent.
    """
    global _installed
    if _installed:
        return
    _installed = True
    sys.meta_path.insert(0, _FINDER)
    for target_name in _TARGETS:
        if target_name in sys.modules:
            _after_import(target_name)


def uninstall() -> None:
    """Undo :func:`install`: OpenRLHF's own classes are bound again."""
    global _installed
    _installed = False
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    for (target_name, name), original in _originals.items():
        module = sys.modules.get(target_name)
        if module is not None:
            setattr(module, name, original)
    _originals.clear()
