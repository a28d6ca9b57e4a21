"""Running under accelerate / torchrun: who is the main process, and did we really get the processes asked for.

Multi-GPU is accelerate's and torch's job; qtune only makes sure the run folder is prepared once, and refuses the
launches that silently give fewer processes than asked (`accelerate launch --cpu --num_processes 2` starts one).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from qtune.core.errors import EnvironmentProblem


def launched_world_size() -> int:
    """The number of processes the launcher says it started (WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (RANK; 0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    """Whether more than one process trains."""
    return launched_world_size() > 1


def barrier() -> None:
    """Waits for every process; sets up the process group the Trainer will use (accelerate's shared state)."""
    if is_distributed():
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def processes_asked_of_accelerate(parent_cmdline: list[str]) -> int | None:
    """--num_processes of an `accelerate launch` command line (or of its --config_file), if that is what started us."""
    if "launch" not in parent_cmdline or not any(
        Path(part).name == "accelerate" or part.endswith("accelerate") for part in parent_cmdline[:3]
    ):
        return None
    asked = None
    for index, part in enumerate(parent_cmdline):
        for flag in ("--num_processes", "--num-processes", "--config_file", "--config-file"):
            value = None
            if part == flag and index + 1 < len(parent_cmdline):
                value = parent_cmdline[index + 1]
            elif part.startswith(flag + "="):
                value = part.split("=", 1)[1]
            if value is None:
                continue
            if "num" in flag:
                asked = int(value)
            elif asked is None and Path(value).is_file():
                import yaml

                asked = (yaml.safe_load(Path(value).read_text()) or {}).get("num_processes")
    return asked


def check_world_size(actual: int) -> None:
    """Refuses a run that got fewer processes than its launcher was asked for."""
    requested = launched_world_size()
    try:
        import psutil

        parent = psutil.Process(os.getppid()).cmdline()
    except Exception:  # no psutil, no permission: the environment check below still runs
        parent = []
    from_accelerate = processes_asked_of_accelerate(parent)
    if from_accelerate:
        requested = max(requested, from_accelerate)
    if requested > actual:
        launcher = " ".join(shlex.quote(p) for p in parent[:6]) or "the launcher"
        raise EnvironmentProblem(
            f"asked for {requested} processes but training runs in {actual} ({launcher} ...)",
            fix="on CPU, `accelerate launch --cpu` starts one process: use `accelerate launch --multi_gpu "
            "--num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no -m qtune train ...` "
            "or `torchrun --standalone --nproc_per_node N -m qtune train ...`",
        )
