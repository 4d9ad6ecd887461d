"""Where the server's processes run: CPU placement, and children that never outlive the launcher.

On a small CPU machine the model's compute threads and the HTTP process fight over the same cores
unless each is confined (measured in docs/benchmarks.md); ``plan_cpus`` decides the split once, in
one place: the engine core calls it once it knows its device, confines itself, and hands the plan
to the launcher, which places the API servers by it.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15  # linux/prctl.h


@dataclass(frozen=True)
class CpuPlan:
    api_servers: int
    engine_threads: int  # torch intra-op threads in the engine core
    api_cpus: frozenset[int] | None  # None: no pinning
    engine_cpus: frozenset[int] | None


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def plan_cpus(api_servers: int | None, engine_threads: int | None, pin: bool, gpu: bool) -> CpuPlan:
    """The process split. ``None`` means auto:

    - on a GPU the engine only feeds the device, so it gets one core and the API servers the rest
      (decoding is then the bottleneck);
    - on a CPU the model needs the cores: one API server per four cores (at least one), the engine
      the rest, with one torch thread per core it owns.

    With ``pin``, the API servers share the first cores and the engine the others, so neither
    preempts the other; with one core there is nothing to split.
    """
    cpus = available_cpus()
    n = len(cpus)
    if api_servers is None:
        api_servers = max(1, n - 1) if gpu else max(1, n // 4)
    front = min(api_servers, n - 1) if n > 1 else 0  # cores for the API servers
    engine_cores = n - front if n > 1 else 1
    if engine_threads is None:
        engine_threads = 1 if gpu else engine_cores
    if not pin or n < 2:
        return CpuPlan(api_servers, engine_threads, None, None)
    return CpuPlan(api_servers, engine_threads, frozenset(cpus[:front]), frozenset(cpus[front:]))


def become_child(role: str, cpus: frozenset[int] | None = None) -> None:
    """In a freshly spawned child: its own session (signals meant for the launcher's process group
    reach the launcher alone, which forwards them in order), killed when the launcher dies even by
    SIGKILL, confined to ``cpus``, and named ``role`` in ps and top (at most 15 characters)."""
    try:
        os.setsid()
    except OSError:  # already a session leader
        pass
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(role.encode()[:15]))
    launcher = multiprocessing.parent_process()
    if launcher is not None and os.getppid() != launcher.pid:  # it died before prctl took effect
        os._exit(1)
    confine(cpus)


def confine(cpus: frozenset[int] | None) -> None:
    """Run this process on ``cpus`` only (None: wherever the OS likes)."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    log.debug("process %d on cpus %s", os.getpid(), sorted(os.sched_getaffinity(0)))


def freeze_startup_heap() -> None:
    """Called once a child has started (app built, engine connected, model warmed up): every object
    allocated so far (modules, the app, the model) moves to the collector's permanent generation,
    so its full collections under load no longer walk them. Measured on an API server at threshold
    0 under wrk, alternating with one that did not: 7 % less CPU per request (six pairs, all lower)."""
    import gc

    gc.collect()
    gc.freeze()


def skip_final_collection() -> None:
    """Called by a child just before it returns and exits: the interpreter's last garbage collection
    at exit walks every object torch and the web stack allocated, about 0.5-0.9 s of each stop (py-spy
    found the API server in ``gc_collect_main`` after uvicorn had finished). Frozen objects are
    skipped, and their memory goes back with the process anyway; atexit handlers and flushing still
    run."""
    import gc

    gc.freeze()
