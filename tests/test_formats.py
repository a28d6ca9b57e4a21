"""The export formats' registry, and what each format's writer and loader must get right whatever the model: the merge
scale of every module (peft's rank and alpha patterns), a GGUF read back as the model it holds (a head size of its
own), and an artifact that does not load back (one line, kept for a look)."""

import dataclasses
import json
import typing

import pytest
import torch
import yaml
from helpers import gguf_read_back

from qtune.config.recipe import ExportSection, HubSection, validate_recipe
from qtune.config.runs import TrainedRun
from qtune.export.formats import FORMATS, PUSH_TARGETS, ExportFormat, formats_problem
from qtune.export.formats.merged import write_merged

SHAPE = dict(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1)


# --------------------------------------------------------------------------- the registry


def test_every_format_says_every_field():
    """A missing field is a test failure (the dataclass has no defaults), never a silent default: the disk estimate,
    the gate's floor, the writer, the loader and the push target are all stated per format."""
    required = [field.name for field in dataclasses.fields(ExportFormat)]
    assert all(field.default is dataclasses.MISSING for field in dataclasses.fields(ExportFormat))
    with pytest.raises(TypeError, match="missing"):
        ExportFormat(name="gptq", artifact="gptq")  # a new format that forgot the rest
    artifacts = [entry.artifact for entry in FORMATS.values()]
    assert len(set(artifacts)) == len(artifacts)  # no two formats write to the same name
    for name, entry in FORMATS.items():
        assert entry.name == name and all(
            getattr(entry, field) is not None for field in required if field not in ("fidelity_floor", "load")
        )
        assert (entry.load is None) == (entry.fidelity_floor is None) == (name == "adapter"), name
        assert entry.bytes_per_parameter >= 0 and callable(entry.write) and callable(entry.problem)
        assert entry.push_target in PUSH_TARGETS
        assert entry.fidelity_floor is None or 0 < entry.fidelity_floor <= 1


def test_the_recipe_and_the_hub_push_take_their_choices_from_the_registry():
    formats = typing.get_args(typing.get_args(ExportSection.model_fields["formats"].annotation)[0])
    assert formats == tuple(FORMATS)
    targets = typing.get_args(typing.get_args(HubSection.model_fields["push"].annotation)[0])
    assert targets == PUSH_TARGETS == ("adapter", "merged", "nf4", "gptq", "gguf")


def test_a_format_the_model_cannot_have_is_named_with_the_ones_it_can():
    gemma = {"model_type": "gemma"}
    problem = formats_problem(["merged_fp16", "gguf_q8_0", "gguf_f16"], gemma)
    assert "does not support the 'gemma' architecture" in problem and "so not gguf_q8_0, gguf_f16" in problem
    assert problem.endswith("for this model: adapter, merged_fp16, merged_bf16, nf4, gptq_int8, gptq_int4")
    assert formats_problem(["merged_fp16", "nf4"], gemma) is None


# --------------------------------------------------------------------------- the merge's scale, module by module


def fake_run(tmp_path, model_dir, adapter_dir) -> TrainedRun:
    """A run folder's view of a base and an adapter made outside qtune (as model.adapter continues one)."""
    raw = {
        "model": {"name": str(model_dir)},
        "data": {"datasets": [{"path": "p.jsonl", "format": "alpaca"}]},
        "train": {"output_dir": str(tmp_path / "run")},
    }
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return TrainedRun(tmp_path / "run", validate_recipe(raw), adapter_dir)


def test_a_merge_with_rank_and_alpha_patterns_equals_peft(tmp_path):
    """An adapter whose modules have ranks and alphas of their own (peft's rank_pattern and alpha_pattern, as an
    adapter from the Hub may have) merges at each module's own scale: the merged weights equal peft's merge_and_unload
    of the same adapter on the unquantized base. With one global alpha / r they would not (checked too)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.demo.tiny_models import write_tiny_model
    from qtune.export.formats import merged

    model_dir = write_tiny_model(tmp_path / "base", "llama", **SHAPE)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"q_proj": 4, "layers.1.self_attn.o_proj": 2},
        alpha_pattern={"v_proj": 64, "down_proj": 3},
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), config)
    for module in model.modules():  # lora_B starts at zero: give every delta a size
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path / "adapter")  # as a run's adapter/ has it

    write_merged(fake_run(tmp_path, model_dir, tmp_path / "adapter"), tmp_path / "merged", "float32", "original")
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    assert ours.keys() == peft_merged.keys()
    worst = max((ours[key] - peft_merged[key]).abs().max().item() for key in ours)
    assert worst < 1e-5, worst

    # the control: one scale for every module (what qtune did before) is off where the patterns apply
    scales = {module: delta[2] for module, delta in merged.lora_deltas(tmp_path / "adapter").items()}
    assert scales["model.layers.0.self_attn.q_proj"] == 16 / 4 and scales["model.layers.1.self_attn.o_proj"] == 16 / 2
    assert scales["model.layers.0.self_attn.v_proj"] == 64 / 8 and scales["model.layers.0.mlp.down_proj"] == 3 / 8
    assert scales["model.layers.0.self_attn.k_proj"] == scales["model.layers.0.self_attn.o_proj"] == 16 / 8


# --------------------------------------------------------------------------- GGUF: the model's own architecture


@pytest.mark.parametrize(
    "family, head_dim",
    [("llama", 16), ("mistral", 16), ("qwen2", 16), ("qwen3", 16), ("qwen3", 32), ("gemma2", 16), ("gemma3", 16)],
)
def test_a_gguf_with_a_head_size_of_its_own_reads_back_as_the_model(tmp_path, family, head_dim):
    """The GGUF loader builds the model from the merged model's config, not from what transformers' GGUF reader
    guesses from the file's keys. The reader ignores Qwen3's key_length: a Qwen3 whose head size is not 128 read back
    with 128 and ended in a size mismatch (the control below); the other families are checked with a head size that
    is not hidden / heads."""
    from transformers import AutoModelForCausalLM

    from qtune.demo.tiny_models import write_tiny_model
    from qtune.export.formats.gguf.writer import write_gguf

    extra = {"head_dim": head_dim} | ({"query_pre_attn_scalar": head_dim} if family.startswith("gemma") else {})
    model_dir = write_tiny_model(tmp_path / family, family, config_extra=extra, **SHAPE)
    path = write_gguf(model_dir, tmp_path / "model-f16.gguf", "F16")
    _, difference = gguf_read_back(model_dir, path)
    assert difference < 0.01, difference
    if family == "qwen3":  # the reader's own guess of the architecture: the bug the merged config avoids
        with pytest.raises(RuntimeError, match="size mismatch|ignore_mismatched_sizes"):
            AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)


def test_an_artifact_that_does_not_load_back_is_one_line_and_kept_for_a_look(llama_run, tmp_path, monkeypatch, run_cli):
    """Whatever a loader raises in the fidelity stage becomes one line (exit 7) naming the artifact and the error; the
    file is kept aside as `.bad`, the other artifacts stay, and the report says which did not load."""

    def fails_to_load(path, **_):
        raise RuntimeError("Error(s) in loading state_dict: size mismatch for q_proj.weight")

    monkeypatch.setitem(FORMATS, "gguf_f16", dataclasses.replace(FORMATS["gguf_f16"], load=fails_to_load))
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("export", llama_run, "--format", "merged_fp16", "--format", "gguf_f16", "--out", out)
    assert code == 7, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert "gguf_f16 did not load back (RuntimeError: Error(s) in loading state_dict: size mismatch" in stderr
    assert "kept aside as model-f16.gguf.bad" in stderr
    assert (out / "model-f16.gguf.bad").is_file() and not (out / "model-f16.gguf").exists()
    assert (out / "merged-fp16" / "config.json").is_file()
    report = json.loads((out / "export_report.json").read_text())["artifacts"]
    assert report["gguf_f16"]["rejected"] and "size mismatch" in report["gguf_f16"]["load_error"]
    assert "did not load" in stdout  # the fidelity table says it too
