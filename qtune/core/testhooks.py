"""Test instrumentation, in one place: how the survival and export tests make qtune die or record what it did.

Production code reaches it through one hook each, and each does nothing unless its environment variable is set:

- `fault_point(stage, step=None)`: QTUNE_FAIL_CHECKPOINT_AT=<stage>[:<step>] ends the process at that stage of a
  checkpoint save, as a kill would (stages: optimizer, manifest); QTUNE_FAIL_EXPORT_AT=<stage> raises inside an
  export at that stage, mid-write (stages: merged, nf4, gguf).
- `injected(what, step)`: QTUNE_INJECT=<what>:<step> makes training fail as a GPU would, on a CPU: `nan` makes the
  loss NaN from that optimizer step on, `oom` raises CUDA's out-of-memory error in that step.
- `traced(trainer, run_dir)`: QTUNE_SAMPLE_TRACE=1 records, per process, the training sample indices fetched and a
  digest of every micro-batch as it is trained on (sample_trace/ in the run folder), and the final LoRA weights'
  sha256: how the tests prove each DDP rank trained its own shard, and that a resumed run saw the same batches, in
  the same order, as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHECKPOINT_FAULT = "QTUNE_FAIL_CHECKPOINT_AT"
EXPORT_FAULT = "QTUNE_FAIL_EXPORT_AT"
SAMPLE_TRACE = "QTUNE_SAMPLE_TRACE"
INJECT = "QTUNE_INJECT"
CHECKPOINT_STAGES = ("optimizer", "manifest")


def fault_point(stage: str, step: int | None = None) -> None:
    """Dies (checkpoint stages) or raises (export stages) here when the fault variable names this stage."""
    if stage in CHECKPOINT_STAGES:
        name, _, at_step = os.environ.get(CHECKPOINT_FAULT, "").partition(":")
        if name == stage and (not at_step or int(at_step) == step):
            os._exit(86)
    elif os.environ.get(EXPORT_FAULT) == stage:
        raise RuntimeError(f"injected export failure at {stage}")


def injected(what: str, step: int) -> bool:
    """True when QTUNE_INJECT names `what` and `step` (1-based) is at or past its step (`nan`) or is it (others)."""
    name, _, at = os.environ.get(INJECT, "").partition(":")
    if name != what or not at:
        return False
    return step >= int(at) if what == "nan" else step == int(at)


def tracing() -> bool:
    """Whether QTUNE_SAMPLE_TRACE asks for the sample trace."""
    return bool(os.environ.get(SAMPLE_TRACE))


class SampleTracer:
    """Wraps the training set: appends the sample indices each process fetches, batch by batch, in order."""

    def __init__(self, dataset, folder: Path, process_index: int):
        self.dataset = dataset
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank-{process_index}.jsonl"

    def __len__(self):
        return len(self.dataset)

    def _record(self, indices):
        with self.path.open("a") as f:
            f.write(json.dumps([int(i) for i in indices]) + "\n")

    def __getitem__(self, index):
        self._record([index])
        return self.dataset[index]

    def __getitems__(self, indices):
        self._record(indices)
        return [self.dataset[int(i)] for i in indices]


class StepTracer:
    """Appends (process, step, digest of the micro-batch's tokens) as each micro-batch is trained on."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, step: int, input_ids) -> None:
        digest = hashlib.sha256(input_ids.detach().cpu().numpy().tobytes()).hexdigest()[:16]
        with self.path.open("a") as f:
            f.write(json.dumps({"pid": os.getpid(), "step": step, "batch": digest}) + "\n")


def traced(trainer, run_dir: Path) -> None:
    """Installs the tracers on a Trainer (a qtune trainer calls `step_trace` per micro-batch)."""
    if not tracing():
        return
    folder = run_dir / "sample_trace"
    folder.mkdir(parents=True, exist_ok=True)
    rank = trainer.args.process_index
    if hasattr(trainer.train_dataset, "__len__"):  # a stream has no indices to record (and GRPO needs to see a stream)
        trainer.train_dataset = SampleTracer(trainer.train_dataset, folder, rank)
    trainer.step_trace = StepTracer(folder / f"steps-rank-{rank}.jsonl")


def record_final_weights(model, run_dir: Path, process_index: int) -> None:
    """Writes the sha256 of the trained (LoRA) weights of this process, when tracing."""
    if not tracing():
        return
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    trace = run_dir / "sample_trace" / f"final-rank-{process_index}.json"
    trace.write_text(json.dumps({"lora_sha256": digest.hexdigest()}))
