"""`qtune eval RUN_DIR`: the loss and perplexity of the 4-bit base, the adapter and every export in the run, on the
same samples, written to eval_report.json."""

from __future__ import annotations

import math

import torch

from qtune.config.runs import open_run
from qtune.core.folders import EVAL_REPORT
from qtune.core.log import get_logger
from qtune.evaluation import metrics
from qtune.evaluation.eval_report import update_eval_report
from qtune.evaluation.fidelity import artifact_config, fidelity_samples, load_artifact
from qtune.export.formats import FORMATS
from qtune.modeling.load import load_adapter_model
from qtune.training.methods import method_of

log = get_logger(__name__)


def eval_run(run_dir, *, data: str | None = None, data_format: str | None = None, samples: int | None = None) -> dict:
    """Loss and perplexity of the 4-bit base, the adapter and every export in the run, on the same samples: by
    default the whole validation split the training evaluated on. The loss is the mean over supervised tokens."""
    trained = open_run(run_dir)
    chosen = fidelity_samples(trained, data, data_format, samples, max_tokens=None)  # whole, as trained
    on_gpu = torch.cuda.is_available()
    compute = torch.float32
    losses = {}
    adapted = load_adapter_model(trained, compute)
    with adapted.disable_adapter():
        losses["base (4-bit)"] = metrics.supervised_loss(adapted, chosen)
    losses["adapter"] = metrics.supervised_loss(adapted, chosen)
    del adapted
    config = artifact_config(trained)
    for fmt, entry in FORMATS.items():
        path = trained.artifact(fmt)
        if entry.load is not None and path.exists():
            model = load_artifact(fmt, path, config=config, on_gpu=on_gpu)
            losses[fmt] = metrics.supervised_loss(model, chosen)
            del model
    table = {name: {"loss": loss, "perplexity": math.exp(loss)} for name, loss in losses.items()}
    where = f"--data {data}" if data else "the run's validation split"
    log.info(
        f"{'model':<14} {'loss':>8} {'perplexity':>11}   ({len(chosen)} samples of {where}; mean over supervised tokens)"
    )
    for name, row in table.items():
        log.info(f"{name:<14} {row['loss']:>8.4f} {row['perplexity']:>11.4f}")
    trained_metrics = trained.metrics()
    if (
        not data
        and method_of(trained.recipe).language_model_loss  # else its eval_loss is another loss than this one
        and trained_metrics.get("eval_loss") is not None
        and trained_metrics.get("eval_loss_before") is not None
    ):
        log.info(
            f"(training's own eval_loss in metrics.json: {trained_metrics['eval_loss_before']:.4f} -> "
            f"{trained_metrics['eval_loss']:.4f}, on the same samples; the Trainer averages per-batch means instead of "
            "weighing every token the same, which moves the figure most where per-token losses spread widely, as on "
            "an untrained base)"
        )
    report = {"samples": len(chosen), "data": data or "validation split", "models": table}
    update_eval_report(trained.run_dir / EVAL_REPORT, report)  # the task scores, if any, stay
    return report
