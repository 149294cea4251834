"""Launching gloo ranks for the multi-process tests: a free TCP port, and N ranks started from
a forkserver (a fresh server imports the heavy modules once and forks the ranks: spawn would
import them once per rank, fork would copy the test process's thread pools), one OpenMP thread
each, killed and reported if one hangs."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target: Callable[..., None], world: int, args: Sequence[Any], preload: Sequence[str],
              timeout: float) -> list[int | None]:
    """Run ``target(rank, world, port, *args)`` in ``world`` processes; returns their exit codes."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        port = free_port()
        procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                pytest.fail("a rank hung")
        return [p.exitcode for p in procs]
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads
