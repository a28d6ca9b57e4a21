"""CPU threads when the machine is shared: why a CPU run collapsed ~30x beside one other job, and what qtune does.

torch's CPU kernels run in OpenMP parallel regions with one thread per core. At the end of each region libgomp's
threads spin-wait (by default for ~300,000 spins) for the slowest one. When another process holds a core, one
thread of the region is descheduled and the others burn their time slice spinning until it runs again: every one
of the thousands of small regions in a training step pays a scheduler time slice. Fair sharing would cost 2-3x;
this costs 30x (bench/contention.py measures it).

qtune, on CPU, unless QTUNE_CPU_THREADS says otherwise:
- sets OMP_WAIT_POLICY=PASSIVE before torch loads (a waiting thread sleeps instead of spinning);
- counts the cores other processes keep busy at the start and trains on the free ones only, and says so.

QTUNE_CPU_THREADS=N fixes the thread count; QTUNE_CPU_THREADS=all leaves torch's and OpenMP's defaults alone.
"""

from __future__ import annotations

import os

SETTING = "QTUNE_CPU_THREADS"


def set_wait_policy_before_torch() -> None:
    """Must run before torch is imported: libgomp reads OMP_WAIT_POLICY once, when it loads."""
    if os.environ.get(SETTING, "").strip().lower() != "all":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def busy_cores_elsewhere(sample_seconds: float = 0.5) -> float:
    """Cores kept busy by other processes over a short sample (this process is idle while it samples)."""
    import psutil

    return psutil.cpu_percent(interval=sample_seconds) / 100 * (psutil.cpu_count() or 1)


def choose_threads(cores: int, busy_elsewhere: float) -> int:
    """The free cores, at least one. A core counts as taken when another process uses more than half of it."""
    return max(1, min(cores, cores - int(busy_elsewhere + 0.5)))


def size_thread_pool(echo=print) -> int | None:
    """Set torch's thread count for a CPU run; returns it (None: left to torch)."""
    import torch

    setting = os.environ.get(SETTING, "").strip().lower()
    if setting == "all" or (not setting and "OMP_NUM_THREADS" in os.environ):
        return None  # the user's (or torchrun's: one thread per process) choice stands
    if setting:
        try:
            threads = int(setting)
        except ValueError:
            from qtune.errors import RecipeError

            raise RecipeError(f"{SETTING}={setting!r} is not a number", fix=f"set {SETTING} to a thread count or 'all'") from None
        torch.set_num_threads(max(1, threads))
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = busy_cores_elsewhere()
    threads = choose_threads(cores, busy)
    torch.set_num_threads(threads)
    if threads < cores:
        echo(f"cpu: other processes keep {busy:.1f} of {cores} cores busy; training on {threads} thread(s). Steps "
             f"will be slower than on an idle machine ({SETTING}=N to choose)")
    return threads
