"""llama.cpp itself loads qtune's GGUF files, tokenizes like transformers and predicts like the merged model.

Slow and needs llama-cpp-python, a source package that builds for ~8 minutes on 2 cores:
    pip install llama-cpp-python && python -m pytest -m slow tests/test_llama_cpp.py
"""

import numpy as np
import pytest

from qtune.export.run import export
from qtune.metrics import DECISIVE_MARGIN

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["bpe", "sentencepiece", "qwen3", "mistral"])
def exported(request, tmp_path_factory):
    run = request.getfixturevalue(
        {"bpe": "llama_run", "sentencepiece": "spm_llama_run", "qwen3": "qwen3_run", "mistral": "mistral_run"}[
            request.param
        ]
    )
    out = tmp_path_factory.mktemp("gguf")
    export(
        run, ["merged_fp16", "gguf_f16", "gguf_q8_0", "gguf_q4_0"], out_dir=out, eval_samples=2, echo=lambda *_: None
    )
    return out


@pytest.mark.parametrize("quant, tolerance", [("f16", 0.05), ("q8_0", 0.3), ("q4_0", 3.0)])
def test_llama_cpp_loads_tokenizes_and_predicts(exported, quant, tolerance):
    import llama_cpp  # an ImportError here is a failure: this check needs the real llama.cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = llama_cpp.Llama(model_path=str(exported / f"model-{quant}.gguf"), n_ctx=256, logits_all=True, verbose=False)
    hf_tokenizer = AutoTokenizer.from_pretrained(exported / "merged-fp16")
    text = (
        "Below is an instruction that describes a task.\n\n### Instruction:\nReverse the word.\n\n### Input:\napple ünï"
    )
    ids = hf_tokenizer(text).input_ids
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids

    llm.eval(ids)
    cpp_logits = np.array(llm.eval_logits)  # one row per evaluated position
    merged = AutoModelForCausalLM.from_pretrained(exported / "merged-fp16", dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = merged(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert cpp_logits.shape == hf_logits.shape
    print(
        f"llama.cpp {quant}: max |Δlogit| {np.abs(cpp_logits - hf_logits).max():.4f}, "
        f"top-1 agreement {(cpp_logits.argmax(-1) == hf_logits.argmax(-1)).mean():.4f}"
    )
    assert np.abs(cpp_logits - hf_logits).max() < tolerance
    # top-1 agreement where the reference's two best logits differ by more than DECISIVE_MARGIN, as qtune's fidelity
    # report counts it: closer than that, rounding alone flips the winner (one such flip out of 37 positions was seen
    # with q8_0 on a CPU with AVX512-BF16, from qtune's current and previous code alike)
    top2 = np.sort(hf_logits, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > DECISIVE_MARGIN
    agreement = (cpp_logits.argmax(-1) == hf_logits.argmax(-1))[decisive].mean()
    assert decisive.sum() >= len(ids) // 2 and agreement >= (0.99 if quant != "q4_0" else 0.8)

    completion = llm.create_completion(text + "\n\n### Response:\n", max_tokens=8, temperature=0.0)
    assert completion["usage"]["completion_tokens"] > 0 and completion["choices"][0]["finish_reason"] in (
        "stop",
        "length",
    )


def test_llama_cpp_follows_llama3_rope_scaling_past_the_original_context(llama3_run, tmp_path):
    """Positions past the original context (32 here) are where llama3 rope scaling changes the model: llama.cpp must
    agree with the merged model there as closely as it does for a model without scaling (it did not before qtune
    wrote the rope_freqs tensor: 0.008 against 0.0003 within 160 tokens)."""
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export(llama3_run, ["merged_fp16", "gguf_f16"], out_dir=tmp_path, eval_samples=2, echo=lambda *_: None)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged-fp16")
    ids = tokenizer(" ".join(["the river is green and blue"] * 30)).input_ids[:160]
    assert len(ids) == 160
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model-f16.gguf"), n_ctx=256, logits_all=True, verbose=False)
    llm.eval(ids)
    cpp_logits = np.array(llm.eval_logits)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-fp16", dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = merged(input_ids=torch.tensor([ids])).logits[0].numpy()
    past = np.abs(cpp_logits[32:] - hf_logits[32:]).max()
    print(f"llama.cpp f16, llama3 rope: max |Δlogit| past position 32: {past:.5f}")
    assert past < 0.002
