"""The GPU proof kit must not rot between the sessions that have a GPU: its dry run (the same sections, commands and
report, on a CPU with tiny shapes) must bring every section out ok with figures that make sense. The dry run takes
two minutes, so it is a slow test (run it before a GPU session); the default suite checks that every qtune name the
kit imports still exists."""

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_every_qtune_name_the_kit_imports_exists():
    imported = [
        (node.module, alias.name)
        for node in ast.walk(ast.parse((BENCH / "gpu_check.py").read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qtune")
        for alias in node.names
    ]
    assert len(imported) >= 6  # the kit's imports were found, function-local ones included
    missing = [f"{module}.{name}" for module, name in imported if not hasattr(importlib.import_module(module), name)]
    assert missing == []


@pytest.mark.slow
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
    ran = ("environment", "models", "t4_fp16", "context_8b", "side_by_side_1b", "export_1b", "bf16_8b", "nan_fp16",
           "grpo_1b", "moe_30b_a3b")  # fmt: skip
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
    assert fidelity["gptq_int4"]["top1_agreement"] >= 0.7  # GPTQ through the kit's export, as on the GPU
    assert sections["nan_fp16"]["exit"] == 6 and sections["nan_fp16"]["checkpoint_2_kept"]
    grpo = sections["grpo_1b"]  # generation timed apart from the step, on the 4-bit weights
    assert grpo["generation_tokens_per_second"] > 0 and 0 < grpo["generation_share"] < 1 and grpo["peak_bytes"] > 0
    moe = sections["moe_30b_a3b"]
    assert moe["exit"] == 0 and moe["planned_48_layer_bytes"] > moe["planned_bytes"] and moe["losses"]
    report = (out / "gpu_check.md").read_text()
    assert report.startswith("# qtune GPU check (dry run on CPU)") and "| qtune | " in report
