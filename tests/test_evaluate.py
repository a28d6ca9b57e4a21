"""qtune eval and qtune quantize-report on small models whose weights are not random."""

import json

import pytest


def test_quantize_report_orders_the_precisions_sanely(pretrained_llama, alpaca_file, tmp_path, run_cli):
    code, out, err = run_cli(
        "quantize-report",
        pretrained_llama,
        "--data",
        alpaca_file,
        "--format",
        "alpaca",
        "--samples",
        "24",
        "--out",
        tmp_path,
    )
    assert code == 0, err
    report = json.loads((tmp_path / "quantize_report" / "quantize_report.json").read_text())
    rows = report["precisions"]
    assert list(rows) == ["fp32", "bf16", "fp16", "int8", "fp4", "nf4", "nf4_dq"]
    assert (tmp_path / "quantize_report" / "quantize_report.png").stat().st_size > 1000
    assert rows["fp16"]["mean_kl_vs_fp32"] < 1e-4
    assert rows["fp16"]["perplexity"] == pytest.approx(rows["fp32"]["perplexity"], rel=5e-3)
    assert rows["nf4"]["mean_kl_vs_fp32"] <= rows["fp4"]["mean_kl_vs_fp32"]  # NF4 fits normal weights better than FP4
    assert rows["int8"]["mean_kl_vs_fp32"] < rows["nf4"]["mean_kl_vs_fp32"]
    for precision, row in rows.items():  # the memory arithmetic of `qtune memory`, on the loaded model
        assert abs(row["predicted_bytes"] - row["footprint_bytes"]) / row["footprint_bytes"] < 0.02, precision
    assert "nf4_dq" in out and "KL vs fp32" in out


def test_eval_covers_base_adapter_and_exports(llama_run, tmp_path, run_cli):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(llama_run, run)
    code, _, err = run_cli("export", run, "--format", "merged_fp16", "--format", "gguf_q8_0", "--eval-samples", "2")
    assert code == 0, err
    code, out, err = run_cli("eval", run, "--samples", "16")
    assert code == 0, err
    models = json.loads((run / "eval_report.json").read_text())["models"]
    assert list(models) == ["base (4-bit)", "adapter", "merged_fp16", "gguf_q8_0"]
    assert models["adapter"]["loss"] < models["base (4-bit)"]["loss"]  # fine-tuning helped on held-out data
    assert models["merged_fp16"]["perplexity"] == pytest.approx(models["adapter"]["perplexity"], rel=1e-3)
    assert models["gguf_q8_0"]["perplexity"] == pytest.approx(models["adapter"]["perplexity"], rel=1e-2)
    assert "base (4-bit)" in out
