"""Exports: each format written, reloaded in its real loader, and measured against the trained model."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import gguf_read_back, recipe_dict, write_recipe

from qtune.config.runs import open_run
from qtune.core.errors import EXIT_ENVIRONMENT, QtuneError
from qtune.core.folders import LOCK, MARKER
from qtune.export.formats import FORMAT_NAMES
from qtune.export.formats.merged import merged_config, write_merged
from qtune.export.run import export
from qtune.modeling.config import load_config
from qtune.modeling.weights import quantized_weight_names

ALL_FORMATS = list(FORMAT_NAMES)  # every format, adapter included


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_every_format_round_trips_and_meets_the_targets(request, tmp_path, family, run_cli):
    run_dir = request.getfixturevalue(f"{family}_run")
    out = tmp_path / "export"
    args = ["export", run_dir, "--out", out] + [x for f in ALL_FORMATS for x in ("--format", f)]
    args += ["--set", "export.gptq.group_size=32", "--set", "export.gptq.calibration_samples=8"]  # 64-wide models
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr
    report = json.loads((out / "export_report.json").read_text())
    rows = report["artifacts"]
    assert set(rows) == set(ALL_FORMATS) - {"adapter"}
    for name in ("merged_fp16", "gguf_f16"):
        assert rows[name]["top1_agreement"] >= 0.999, (name, rows[name])
        assert rows[name]["mean_kl"] <= 1e-5, (name, rows[name])
    assert rows["merged_bf16"]["top1_agreement"] >= 0.99
    assert rows["gguf_q8_0"]["top1_agreement"] >= 0.99
    # 64 columns: the k-quant formats are llama.cpp's fallback mixes here (Q8_0 for Q6_K, Q5_0 / Q5_1 for Q4_K /
    # Q5_K); tests/test_kquants.py exports a model wide enough for the k-quants themselves
    for name in ("nf4", "gguf_q5_k_m", "gguf_q4_k_m", "gguf_q4_0"):
        assert np.isfinite(rows[name]["perplexity"]) and rows[name]["mean_kl"] > rows["gguf_q8_0"]["mean_kl"]
    assert rows["gguf_q6_k"]["top1_agreement"] >= 0.99
    # GPTQ through each family's own layers (Gemma's sliding and global masks, Phi-3's fused projections)
    assert rows["gptq_int8"]["top1_agreement"] >= 0.99 and rows["gptq_int4"]["top1_agreement"] >= 0.9
    print(family, {name: f"{row['mean_kl']:.1e} / {100 * row['top1_agreement']:.1f}%" for name, row in rows.items()})
    assert "adapter+NF4" in stdout and "gguf_q4_0" in stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # no staging or work folders left behind: only qtune's marker and lock are hidden
    assert sorted(p.name for p in out.glob(".*")) == sorted([MARKER, LOCK])
    modelfile = (out / "model-q8_0.gguf.Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf") and "TEMPLATE" in modelfile and "PARAMETER stop" in modelfile


def test_nf4_export_loads_with_no_extra_arguments(llama_run, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    export(llama_run, ["nf4"], out_dir=tmp_path, eval_samples=4)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    linears_per_block = 7  # q, k, v, o, gate, up, down
    assert len(layers) == model.config.num_hidden_layers * linears_per_block
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in layers)
    assert all(p.suffix != ".bin" for p in (tmp_path / "nf4").iterdir())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_merge_quantizes_exactly_the_layers_the_loader_does(family, pretrained_llama, pretrained_qwen2):
    import bitsandbytes as bnb
    from transformers import AutoConfig

    from qtune.config.recipe import ModelSection, QuantSection
    from qtune.modeling.load import load_base

    folder = pretrained_llama if family == "llama" else pretrained_qwen2
    loaded = load_base(ModelSection(name=str(folder)), QuantSection(), torch.float32)
    expected = {f"{n}.weight" for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized_weight_names(AutoConfig.from_pretrained(folder)) == expected


def reference_and_merged_logits(run_dir, merged_dir, batch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qtune.modeling.load import load_base

    trained = open_run(run_dir)
    base = load_base(trained.recipe.model, trained.recipe.quant, torch.float32)
    reference = PeftModel.from_pretrained(base, trained.adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return reference(input_ids=batch).logits, merged(input_ids=batch).logits


def test_merge_into_dequantized_base_is_exact_and_original_is_not(llama_run, tmp_path):
    trained = open_run(llama_run)
    batch = torch.randint(5, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    write_merged(trained, tmp_path / "fp32", dtype_name="float32", merge_base="dequantized")
    write_merged(trained, tmp_path / "fp16", dtype_name="float16", merge_base="dequantized")
    write_merged(trained, tmp_path / "orig", dtype_name="float32", merge_base="original")
    reference, exact = reference_and_merged_logits(llama_run, tmp_path / "fp32", batch)
    _, half = reference_and_merged_logits(llama_run, tmp_path / "fp16", batch)
    _, original = reference_and_merged_logits(llama_run, tmp_path / "orig", batch)
    exact_error = (exact - reference).abs().max().item()
    half_error = (half - reference).abs().max().item()
    original_error = (original - reference).abs().max().item()
    print(
        f"max |Δlogit| vs adapter-on-NF4: dequantized fp32 {exact_error:.2e}, fp16 {half_error:.2e}, "
        f"original fp32 {original_error:.2e}"
    )
    assert exact_error < 1e-4
    assert half_error < 1e-2
    assert original_error > 10 * half_error  # merging into weights the adapter never saw costs fidelity


def test_dora_merge_matches_the_trained_model(tmp_path_factory, pretrained_qwen2, alpaca_file):
    from qtune.cli import main

    folder = tmp_path_factory.mktemp("dora")
    raw = recipe_dict(pretrained_qwen2, alpaca_file, folder / "run", lora={"use_dora": True}, train={"max_steps": 4})
    assert main(["train", str(write_recipe(folder / "r.yaml", raw))]) == 0
    trained = open_run(folder / "run")
    write_merged(trained, folder / "fp32", dtype_name="float32", merge_base="dequantized")
    batch = torch.randint(5, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    reference, merged = reference_and_merged_logits(folder / "run", folder / "fp32", batch)
    assert (merged - reference).abs().max().item() < 1e-4


def test_gguf_reads_back(llama_run, tmp_path):
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from qtune.export.formats.gguf.families import permute_for_llama_rotary

    export(
        llama_run,
        ["merged_fp16", "gguf_f16", "gguf_q8_0", "gguf_q4_0"],
        out_dir=tmp_path,
        eval_samples=4,
    )
    hf = AutoTokenizer.from_pretrained(tmp_path / "merged-fp16")
    merged = load_file(str(tmp_path / "merged-fp16" / "model.safetensors"))
    text = "Add the two numbers.\n12 + 7 = 19 <|im_start|>user hello<|im_end|>"
    for quant, tolerance in (("f16", 1e-3), ("q8_0", 0.02), ("q4_0", 0.2)):
        path = tmp_path / f"model-{quant}.gguf"
        from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        assert from_gguf(text).input_ids == hf(text).input_ids
        reader = gguf.GGUFReader(path)
        template = reader.fields["tokenizer.chat_template"]
        assert "<|im_start|>" in bytes(template.parts[template.data[0]]).decode()
        tensors = {t.name: t for t in reader.tensors}
        for hf_name, gguf_name in (
            ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
            ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
            ("model.embed_tokens.weight", "token_embd.weight"),
        ):
            tensor = tensors[gguf_name]
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(merged[hf_name].shape)
            expected = merged[hf_name].float().numpy()
            if "q_proj" in hf_name:
                expected = permute_for_llama_rotary(expected, 2, 2)
            relative = np.linalg.norm(values - expected) / np.linalg.norm(expected)
            assert relative < tolerance, (quant, hf_name, relative)


def test_sentencepiece_vocabulary_in_gguf(spm_llama_run, tmp_path):
    """Llama 2 / Mistral v0.1 tokenizers: scores, byte tokens, the '▁' space marker."""
    import gguf
    from transformers import AutoTokenizer

    report = export(spm_llama_run, ["gguf_f16", "gguf_q8_0"], out_dir=tmp_path, eval_samples=8)
    assert report["artifacts"]["gguf_f16"]["top1_agreement"] >= 0.999
    reader = gguf.GGUFReader(tmp_path / "model-f16.gguf")
    model_field = reader.fields["tokenizer.ggml.model"]
    assert bytes(model_field.parts[model_field.data[0]]).decode() == "llama"
    types = reader.fields["tokenizer.ggml.token_type"]
    assert sum(int(types.parts[i][0]) == gguf.TokenType.BYTE for i in types.data) == 256
    hf = AutoTokenizer.from_pretrained(spm_llama_run / "adapter")
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model-f16.gguf")
    for text in ("Add the two numbers.\n12 + 7", "ünïcödé 🙂  two  spaces", "Reverse the word."):
        assert from_gguf(text).input_ids == hf(text).input_ids, text


def test_unsupported_architecture_is_refused_before_writing(llama_run, tmp_path, run_cli):
    trained = open_run(llama_run)
    odd_base = tmp_path / "odd-base"
    shutil.copytree(trained.recipe.model.name, odd_base)
    config = json.loads((odd_base / "config.json").read_text())
    config["model_type"] = "gemma"
    (odd_base / "config.json").write_text(json.dumps(config))
    run_copy = tmp_path / "run"
    shutil.copytree(llama_run, run_copy)
    recipe_text = (run_copy / "recipe.yaml").read_text().replace(trained.recipe.model.name, str(odd_base))
    (run_copy / "recipe.yaml").write_text(recipe_text)
    code, _, err = run_cli("export", run_copy, "--format", "gguf_q8_0", "--out", tmp_path / "out")
    assert code == EXIT_ENVIRONMENT
    assert err.startswith("qtune: error: GGUF export does not support the 'gemma' architecture")
    assert "so not gguf_q8_0" in err
    assert "for this model: adapter, merged_fp16, merged_bf16, nf4" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage, formats", [("merged", ["merged_fp16"]), ("nf4", ["nf4"]), ("gguf", ["gguf_q8_0"])])
def test_failed_export_leaves_nothing_and_keeps_the_earlier_one(llama_run, tmp_path, monkeypatch, stage, formats):
    out = tmp_path / "export"
    export(llama_run, formats, out_dir=out, eval_samples=2)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setenv("QTUNE_FAIL_EXPORT_AT", stage)
    with pytest.raises(RuntimeError, match="injected"):
        export(llama_run, formats, out_dir=out, eval_samples=2)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == sorted([MARKER, LOCK])  # no staging left


def test_not_enough_disk_is_refused_with_the_numbers(llama_run, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(QtuneError, match=r"needs about .* GiB, 0.00 GiB free") as info:
        export(llama_run, ["merged_fp16"], out_dir=tmp_path / "out")
    assert info.value.code == EXIT_ENVIRONMENT
    assert not (tmp_path / "out").exists()


def test_sharded_merge_has_an_index_and_loads(llama_run, tmp_path):
    from transformers import AutoModelForCausalLM

    trained = open_run(llama_run)
    write_merged(
        trained,
        tmp_path / "m",
        dtype_name="float16",
        merge_base="dequantized",
        shard_bytes=200_000,
    )
    shards = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.float16


def test_unknown_format_suggests(llama_run, run_cli, tmp_path):
    code, _, err = run_cli("export", llama_run, "--format", "gguf_q8", "--out", tmp_path / "o")
    assert code == 2 and "did you mean 'gguf_q8_0'" in err


def test_recipe_export_section_runs_after_training(tmp_path, tiny_llama, alpaca_file, run_cli):
    raw = recipe_dict(
        tiny_llama, alpaca_file, tmp_path / "run", train={"max_steps": 2}, export={"formats": ["gguf_f16"]}
    )
    code, _, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "export" / "export_report.json").read_text())
    assert report["artifacts"]["gguf_f16"]["top1_agreement"] >= 0.999


def floor_of(monkeypatch, fmt: str, floor: float) -> None:
    """Gives format `fmt` another fidelity floor for one test."""
    import dataclasses

    from qtune.export.formats import FORMATS

    monkeypatch.setitem(FORMATS, fmt, dataclasses.replace(FORMATS[fmt], fidelity_floor=floor))


def test_an_artifact_under_its_fidelity_floor_fails_the_export_and_is_kept_aside(
    llama_run, tmp_path, monkeypatch, capsys
):
    from qtune.core.errors import EXIT_FIDELITY

    floor_of(monkeypatch, "nf4", 1.01)  # no 4-bit artifact reaches it
    out = tmp_path / "export"
    with pytest.raises(QtuneError) as failure:
        export(llama_run, ["merged_fp16", "nf4"], out_dir=out, eval_samples=4)
    assert failure.value.code == EXIT_FIDELITY
    assert "nf4 top-1" in failure.value.line() and "kept aside as nf4.bad" in failure.value.line()
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("merged_fp16") for line in printed) and any(line.startswith("nf4") for line in printed)
    assert (out / "nf4.bad" / "config.json").is_file() and not (out / "nf4").exists()
    assert (out / "merged-fp16" / "config.json").is_file()  # the artifact that passed is where it belongs
    report = json.loads((out / "export_report.json").read_text())["artifacts"]
    assert report["nf4"]["rejected"] and report["nf4"]["path"].endswith("nf4.bad")
    assert "rejected" not in report["merged_fp16"]
    # a later export that passes replaces the rejected copy
    floor_of(monkeypatch, "nf4", 0.0)
    export(llama_run, ["nf4"], out_dir=out, eval_samples=4)
    assert (out / "nf4" / "config.json").is_file() and not (out / "nf4.bad").exists()


def test_a_nan_artifact_fails_the_gate_whatever_its_agreement(tmp_path):
    from qtune.evaluation.fidelity import fidelity_gate

    artifact = tmp_path / "nf4"
    artifact.mkdir()
    row = {"perplexity": float("nan"), "mean_kl": float("nan"), "top1_agreement": 1.0}
    failed = fidelity_gate({"artifacts": {"nf4": row}}, {"nf4": artifact})
    assert len(failed) == 1 and "perplexity nan" in failed[0]
    assert (tmp_path / "nf4.bad").is_dir() and row["rejected"]


def test_llama3_rope_scaling_reaches_the_gguf(llama3_run, tmp_path):
    """llama.cpp reads Llama 3's rope scaling from a `rope_freqs` tensor (its converter writes one): without it the
    GGUF runs plain rope. The factors must be the ones transformers computes for the merged model."""
    import gguf
    from transformers import AutoConfig

    from qtune.export.formats.gguf.families import extra_tensors

    export(llama3_run, ["gguf_f16"], out_dir=tmp_path, eval_samples=4)
    reader = gguf.GGUFReader(tmp_path / "model-f16.gguf")
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    expected = extra_tensors(AutoConfig.from_pretrained(open_run(llama3_run).recipe.model.name))
    factors = tensors["rope_freqs.weight"]
    assert factors.shape == (32 // 2,) and factors[0] == 1.0 and factors[-1] == 8.0  # head_dim 32: 16 frequencies
    assert np.array_equal(factors, expected["rope_freqs.weight"])


def test_a_mistral_gguf_has_no_sliding_window_and_the_gate_says_so(tmp_path_factory, alpaca_file, tmp_path):
    """llama.cpp runs Mistral as llama, without a sliding window (its converter does the same): past the window the
    GGUF attends further than the model. With a 48-token window the fidelity samples cross it and the gate rejects
    the GGUF (measured: top-1 97.9%); with Mistral v0.1's 4,096 they do not (test_every_format_round_trips...)."""
    from helpers import SHORT_WINDOW, TINY_SHAPE, train_run

    from qtune.core.errors import EXIT_FIDELITY
    from qtune.demo.tiny_models import write_tiny_model

    base = write_tiny_model(
        tmp_path / "mistral-48", "mistral", pretrain_steps=60, config_extra=SHORT_WINDOW, **TINY_SHAPE
    )
    run = train_run(tmp_path_factory, base, alpaca_file, "mistral-48-run")
    with pytest.raises(QtuneError) as failure:
        export(run, ["merged_fp16", "gguf_f16"], out_dir=tmp_path / "out", eval_samples=8)
    assert failure.value.code == EXIT_FIDELITY and "gguf_f16 top-1" in failure.value.line()
    assert (tmp_path / "out" / "merged-fp16" / "config.json").is_file()  # the merged model is the model: it passes


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3"])
def test_gemma_and_phi3_gguf_files_read_back_as_the_model(family, tmp_path):
    """Gemma's norms (llama.cpp multiplies by w, Gemma by 1 + w), soft-capping and sliding window, Phi-3's fused
    projections: the GGUF read back is the model. The loader builds the model from the merged model's config:
    transformers' reader's own guess misses Gemma's query scale (this tiny Gemma's logits then differ by 0.8)."""
    import gguf

    from qtune.demo.tiny_models import write_tiny_model
    from qtune.export.formats.gguf.writer import write_gguf

    model_dir = write_tiny_model(tmp_path / "model", family, hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1)
    path = write_gguf(model_dir, tmp_path / "model-f16.gguf", "F16")
    reader = gguf.GGUFReader(path)
    arch = {"gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3"}[family]
    assert reader.fields["general.architecture"].contents() == arch
    names = {t.name for t in reader.tensors}
    if family == "phi3":
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= names and "blk.0.ffn_gate.weight" not in names
    else:
        assert reader.fields[f"{arch}.attention.sliding_window"].contents() == 64
    model, difference = gguf_read_back(model_dir, path)
    assert difference < 0.01, difference
    if family != "phi3":  # the norm weights as llama.cpp wants them: 1 + Gemma's
        norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
        original = model.model.layers[0].input_layernorm.weight.detach().numpy()
        assert np.allclose(np.asarray(norm.data), original + 1, atol=1e-6)


def test_merged_into_the_original_weights_every_artifact_is_judged_as_4_bit(tmp_path):
    """Merged into the original weights, an exact merge differs from the trained model by the NF4 rounding the
    adapter was trained on (94% top-1 on the demo model): the gate must not reject it as a broken fp16 merge."""
    from qtune.evaluation.fidelity import fidelity_gate
    from qtune.export.formats import FOUR_BIT_FLOOR

    artifact = tmp_path / "merged-fp16"
    artifact.mkdir()
    row = {"perplexity": 3.66, "mean_kl": 0.0185, "top1_agreement": 0.94}
    assert (
        fidelity_gate({"merge_base": "original", "artifacts": {"merged_fp16": dict(row)}}, {"merged_fp16": artifact})
        == []
    )
    low = {**row, "top1_agreement": FOUR_BIT_FLOOR - 0.01}
    assert (
        len(fidelity_gate({"merge_base": "original", "artifacts": {"merged_fp16": low}}, {"merged_fp16": artifact}))
        == 1
    )
    artifact.mkdir()
    assert (
        len(
            fidelity_gate(
                {"merge_base": "dequantized", "artifacts": {"merged_fp16": dict(row)}}, {"merged_fp16": artifact}
            )
        )
        == 1
    )


def test_phi3_longrope_writes_its_factors_and_other_rope_scalings_are_refused(tmp_path):
    """Phi-4-mini and Phi-3-128k: llama.cpp reads longrope from two factor tensors, the original context and the
    attention factor (as its converter writes them). YaRN and dynamic scaling are refused from config.json."""
    import math

    import gguf

    from qtune.demo.tiny_models import write_tiny_model
    from qtune.export.formats.gguf.support import gguf_problem
    from qtune.export.formats.gguf.writer import write_gguf

    longrope = {"type": "longrope", "long_factor": [1.0 + i / 2 for i in range(16)], "short_factor": [1.0] * 16}
    extra = dict(max_position_embeddings=128, original_max_position_embeddings=32, rope_scaling=longrope)
    shape = dict(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1)
    model_dir = write_tiny_model(tmp_path / "model", "phi3", config_extra=extra, **shape)
    reader = gguf.GGUFReader(write_gguf(model_dir, tmp_path / "m.gguf", "F16"))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert np.allclose(tensors["rope_factors_long.weight"], longrope["long_factor"])
    assert np.allclose(tensors["rope_factors_short.weight"], 1.0)
    assert reader.fields["phi3.rope.scaling.original_context_length"].contents() == 32
    expected = math.sqrt(1 + math.log(128 / 32) / math.log(32))
    assert abs(reader.fields["phi3.rope.scaling.attn_factor"].contents() - expected) < 1e-6
    assert gguf_problem({"model_type": "phi3", "rope_scaling": longrope}) is None
    # transformers' reader drops the factors (0.027 off on this model); the merged model's config has them
    from transformers import AutoModelForCausalLM

    from qtune.evaluation.fidelity import load_artifact

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = merged_config(load_config(model_dir))
    read_back = load_artifact("gguf_f16", tmp_path / "m.gguf", config=config, on_gpu=False).eval()
    for length in (20, 100):  # short and long factors
        ids = torch.tensor([list(range(3, 3 + length))])
        with torch.no_grad():
            assert (model(input_ids=ids).logits - read_back(input_ids=ids).logits).abs().max() < 0.005
    yarn = {"model_type": "qwen2", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    assert "yarn rope scaling" in gguf_problem(yarn)
    older = {"model_type": "qwen2", "rope_scaling": {"type": "yarn", "factor": 4.0}}  # a config.json before 4.45
    assert "yarn rope scaling" in gguf_problem(older)


def test_a_second_export_keeps_the_figures_of_the_artifacts_still_there(llama_run, tmp_path):
    """Before: exporting f16 after q8_0 left export_report.json and the page with the new artifact only, while the
    folder held both. The first export runs as a user runs it: no library lines, no internal work-folder name."""
    import os
    import subprocess
    import sys

    from qtune.core.folders import EXPORT_REPORT, REPORT_PAGE

    run = shutil.copytree(llama_run, tmp_path / "run")
    first = subprocess.run(
        [sys.executable, "-m", "qtune", "export", str(run), "--format", "gguf_q8_0", "--eval-samples", "2"],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=600,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    said = first.stdout + first.stderr
    noise = ("Unknown separator token", "TemplateProcessing", "Converting and de-quantizing", ".merged-fp16-work")
    assert [line for line in noise if line in said] == [], said[-3000:]
    assert "export: fp16 merge (the step the 4-bit and GGUF files start from; not kept)" in said
    report = export(run, ["merged_fp16"], eval_samples=2)
    rows = report["artifacts"]
    assert list(rows) == ["merged_fp16", "gguf_q8_0"]  # the registry's order
    assert rows["gguf_q8_0"]["kept"] is True and "kept" not in rows["merged_fp16"]
    assert rows["gguf_q8_0"]["measured"]["reference"]["samples"] == 2
    assert json.loads((run / "export" / EXPORT_REPORT).read_text())["artifacts"].keys() == rows.keys()
    page = (run / REPORT_PAGE).read_text()
    assert "<td>gguf_q8_0</td>" in page and "<td>merged_fp16</td>" in page and "earlier export (" in page
    (run / "export" / "model-q8_0.gguf").unlink()  # deleted by the user: no longer reported
    assert list(export(run, ["merged_fp16"], eval_samples=2)["artifacts"]) == ["merged_fp16"]
