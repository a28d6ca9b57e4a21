"""The GPU proof kit cannot rot between the sessions that have a GPU: its dry run (the same sections, commands and
report, on a CPU with tiny shapes) runs here, and every section must come out ok with figures that make sense."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_the_gpu_kit_dry_run_passes_every_section(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(out), "--budget-s", "900"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout[-3000:], (out / "gpu_check.log").read_text()[-3000:])
    results = json.loads((out / "gpu_check.json").read_text())
    sections = results["sections"]
    ran = ("environment", "models", "t4_fp16", "context_8b", "side_by_side_1b", "export_1b", "bf16_8b", "nan_fp16")
    assert {name: s["status"] for name, s in sections.items()} == {**dict.fromkeys(ran, "ok"), "fsdp_2gpu": "skipped"}
    # FSDP needs 2 GPUs (accelerate's FSDP plugin refuses a CPU): skipped, and said why
    assert sections["fsdp_2gpu"]["why"] == "needs 2 GPUs, this machine has 0"
    assert sections["environment"]["sdpa_packed_rows"]["MATH"]["runs"]  # the probe for the next GPU session runs
    t4 = sections["t4_fp16"]
    assert t4["losses_finite"] and len(t4["losses"]) == 4
    assert t4["resume_exit"] == 0 and t4["resume_max_loss_difference"] == 0.0  # a CPU resumes bit-identically
    assert abs(t4["plan_error"]) < 0.15 and t4["peak_bytes"] > 0
    context = sections["context_8b"]
    assert context["qtune_longest"] >= 1024 and context["baseline_tries"][0]["fits"]
    side = sections["side_by_side_1b"]
    assert side["speed_ratio"] > 0 and 0.9 < side["eval_loss_ratio"] < 1.1
    # the 1B shape's embedding has more rows than qtune's tokenizer has tokens: the GGUF pads its vocabulary
    fidelity = sections["export_1b"]["fidelity"]
    assert fidelity["merged_fp16"]["top1_agreement"] >= 0.999 and fidelity["gguf_q8_0"]["top1_agreement"] >= 0.99
    assert sections["nan_fp16"]["exit"] == 6 and sections["nan_fp16"]["checkpoint_2_kept"]
    report = (out / "gpu_check.md").read_text()
    assert report.startswith("# qtune GPU check (dry run on CPU)") and "| qtune | " in report
