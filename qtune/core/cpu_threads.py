"""CPU threads when the machine is shared: torch runs on the cores other processes leave free.

torch's OpenMP threads, one per core, spin-wait for each other at the end of every parallel region; when another
process holds a core, each of the thousands of small regions in a training step waits for a scheduler time slice,
and a run beside one neighbour collapses far beyond fair sharing (bench/README.md, "On a shared CPU", has the
figures). So qtune counts the cores other processes keep busy before training and every few seconds while it trains,
and sizes torch's thread pool to the free ones, saying so when it changes. OMP_WAIT_POLICY=PASSIVE cures the collapse
too, but slows a run on an idle machine, so qtune does not set it.

QTUNE_CPU_THREADS=N fixes the thread count; QTUNE_CPU_THREADS=all leaves torch's default (one per core) alone, as
does an OMP_NUM_THREADS the user (or torchrun, one per process) has set.
"""

from __future__ import annotations

import os
import time

from qtune.core.log import get_logger

log = get_logger(__name__)

SETTING = "QTUNE_CPU_THREADS"
RECHECK_SECONDS = 5.0


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def choose_threads(cores: int, busy_elsewhere: float) -> int:
    """The free cores, at least one. A core counts as taken when other processes use more than half of it."""
    return max(1, min(cores, cores - int(busy_elsewhere + 0.5)))


def fixed_setting() -> int | str | None:
    """QTUNE_CPU_THREADS as a thread count, "all", or None when qtune should follow the free cores."""
    setting = os.environ.get(SETTING, "").strip().lower()
    if setting == "all" or (not setting and "OMP_NUM_THREADS" in os.environ):
        return "all"  # the user's (or torchrun's) choice stands
    if not setting:
        return None
    try:
        return max(1, int(setting))
    except ValueError:
        from qtune.core.errors import RecipeError

        raise RecipeError(
            f"{SETTING}={setting!r} is not a number", fix=f"set {SETTING} to a thread count or 'all'"
        ) from None


class FreeCoreThreads:
    """Keeps torch's CPU thread count at the number of cores other processes leave free."""

    def __init__(self, recheck_seconds: float = RECHECK_SECONDS):
        import psutil

        self.recheck_seconds = recheck_seconds
        self.cores = usable_cores()
        self.process = psutil.Process()
        self.setting = fixed_setting()
        self.last_check = None

    def busy_elsewhere(self) -> float:
        """Cores used by other processes since the previous call (system-wide use minus this process's own)."""
        import psutil

        system = psutil.cpu_percent() / 100 * (psutil.cpu_count() or 1)
        own = self.process.cpu_percent() / 100
        return max(0.0, system - own)

    def start(self, sample_seconds: float = 0.5) -> int | None:
        """Before training: sample the machine while this process is idle, and size the pool. None: left to torch."""
        import torch

        if self.setting == "all":
            return None
        if isinstance(self.setting, int):
            torch.set_num_threads(self.setting)
            return self.setting
        self.busy_elsewhere()  # psutil measures between two calls: this one starts the interval
        time.sleep(sample_seconds)
        return self.adjust(torch)

    def adjust(self, torch) -> int:
        """Sizes torch's pool to the cores free now, saying so when the count changes."""
        busy = self.busy_elsewhere()
        self.last_check = time.monotonic()
        threads = choose_threads(self.cores, busy)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            if threads < self.cores:
                log.info(
                    f"cpu: other processes keep {busy:.1f} of {self.cores} cores busy; training on {threads} "
                    f"thread(s), slower than on an idle machine ({SETTING}=N to choose)"
                )
            else:
                log.info(f"cpu: the other processes are gone; training on all {threads} cores again")
        return threads

    def recheck(self) -> None:
        """During training, at most every `recheck_seconds`: follow neighbours that started or stopped."""
        if self.setting is not None or self.last_check is None:
            return
        if time.monotonic() - self.last_check >= self.recheck_seconds:
            import torch

            self.adjust(torch)
