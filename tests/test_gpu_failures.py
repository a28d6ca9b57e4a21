"""What a run on a GPU meets, made to happen on a CPU: a loss that turns NaN, an out-of-memory error mid-run, a base
saved already in 4-bit, frozen weights kept in the compute dtype, a source tree that is not pip-installed."""

import json

import pytest
import torch
from helpers import recipe_dict, write_recipe

from qtune.core.checkpoints import MANIFEST
from qtune.core.errors import EXIT_DIVERGED, EXIT_ENVIRONMENT, EXIT_RECIPE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def short_run(tmp_path, model, data, **train):
    raw = recipe_dict(model, data, tmp_path / "run", train={"max_steps": 8, "save_steps": 2, "eval_steps": 8, **train})
    return write_recipe(tmp_path / "r.yaml", raw), tmp_path / "run"


def test_a_loss_that_stays_nan_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_llama, alpaca_file, run_cli, monkeypatch
):
    recipe, run = short_run(tmp_path, tiny_llama, alpaca_file, max_nonfinite_steps=3)
    monkeypatch.setenv("QTUNE_INJECT", "nan:5")  # steps 5, 6, 7 ... have a NaN loss (and NaN gradients)
    code, _out, err = run_cli("train", recipe)
    assert code == EXIT_DIVERGED, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("qtune: error: the loss was NaN or infinite for 3 steps in a row (steps 5-7)")
    assert "--resume" in last and "Traceback" not in err
    checkpoints = run / "checkpoints"
    assert (checkpoints / "checkpoint-4" / MANIFEST).is_file()
    assert not (checkpoints / "checkpoint-6").exists()  # a step with a NaN loss saves nothing
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()
    from safetensors.torch import load_file

    weights = load_file(checkpoints / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    # the last good checkpoint resumes to the end once the cause is gone
    monkeypatch.delenv("QTUNE_INJECT")
    code, _out, err = run_cli("train", recipe, "--resume")
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from"] == "checkpoint-4" and metrics["global_step"] == 8
    assert metrics["skipped_steps"] == 0


def test_one_nan_step_is_not_a_stop(tmp_path, tiny_llama, alpaca_file, run_cli, monkeypatch):
    """The control: fewer NaN steps than max_nonfinite_steps in a row, and the run goes on."""
    recipe, run = short_run(tmp_path, tiny_llama, alpaca_file, max_nonfinite_steps=20, max_steps=6)
    monkeypatch.setenv("QTUNE_INJECT", "nan:6")
    code, _out, err = run_cli("train", recipe)
    assert code == 0, err
    assert (run / "adapter").is_dir()
    assert not (run / "checkpoints" / "checkpoint-6").exists()  # not saved with a NaN loss


def test_out_of_memory_mid_run_is_one_line_with_the_plans_advice(
    tmp_path, tiny_llama, alpaca_file, run_cli, monkeypatch
):
    recipe, run = short_run(tmp_path, tiny_llama, alpaca_file)
    monkeypatch.setenv("QTUNE_INJECT", "oom:4")
    code, _out, err = run_cli("train", recipe)
    assert code == EXIT_ENVIRONMENT, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("qtune: error: out of CPU memory in step 4")
    assert "data.max_length <=" in last and "checkpoint-2 is intact" in last and "--resume" in last
    assert "Traceback" not in err
    assert (run / "checkpoints" / "checkpoint-2" / MANIFEST).is_file()
    assert not (run / "adapter").exists()


@pytest.fixture(scope="module")
def prequantized_base(tmp_path_factory, pretrained_llama):
    """The pretrained tiny Llama saved in bitsandbytes 4-bit, as the `*-bnb-4bit` Hub repos are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    folder = tmp_path_factory.mktemp("models") / "llama-bnb-4bit"
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(pretrained_llama, quantization_config=quantization, device_map="cpu")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(pretrained_llama).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    return folder


def test_a_base_saved_in_4bit_trains_and_merges_into_its_own_weights(tmp_path, prequantized_base, alpaca_file, run_cli):
    from qtune.config.recipe import ModelSection, QuantSection
    from qtune.modeling import load as model_stage

    base = model_stage.load_base(ModelSection(name=str(prequantized_base)), QuantSection(), torch.float32)
    import bitsandbytes as bnb

    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.compute_dtype == torch.float32 for m in layers)  # the recipe's, not the saved bf16
    raw = recipe_dict(prequantized_base, alpaca_file, tmp_path / "run", train={"max_steps": 6})
    code, _out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    assert "quantization_config" not in err  # transformers' warning about a second config: none is passed
    # the dtype it trained in is the recipe's (the export re-creates the weights in it), not the uploader's bf16
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["compute_dtype"] == "fp32"
    code, _out, err = run_cli("export", tmp_path / "run", "--format", "merged_fp16", "--format", "gguf_q8_0")
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "export" / "export_report.json").read_text())["artifacts"]
    # merged into the dequantized 4-bit weights the adapter trained on: the same model
    assert report["merged_fp16"]["top1_agreement"] >= 0.999 and report["merged_fp16"]["mean_kl"] <= 1e-5
    assert report["gguf_q8_0"]["top1_agreement"] >= 0.99
    merged = json.loads((tmp_path / "run" / "export" / "merged-fp16" / "config.json").read_text())
    assert "quantization_config" not in merged
    code, _out, err = run_cli("export", tmp_path / "run", "--format", "merged_fp16", "--merge-base", "original")
    assert code == EXIT_RECIPE and "no original weights" in err


def test_a_base_saved_in_another_4bit_type_is_named(tmp_path, prequantized_base, alpaca_file, run_cli):
    raw = recipe_dict(prequantized_base, alpaca_file, tmp_path / "run", quant={"type": "fp4"})
    code, _out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == EXIT_RECIPE
    assert "saved in 4-bit nf4" in err and "set quant.type: nf4" in err
    assert not (tmp_path / "run").exists()


def test_frozen_weights_stay_in_the_compute_dtype(pretrained_llama):
    """peft's prepare_model_for_kbit_training upcasts embeddings, lm_head and norms to fp32; qtune does not."""
    from qtune.config.recipe import LoraSection, ModelSection, QuantSection
    from qtune.modeling import load as model_stage

    base = model_stage.load_base(ModelSection(name=str(pretrained_llama)), QuantSection(), torch.bfloat16)
    model = model_stage.attach_lora(base, LoraSection(r=4, alpha=8), gradient_checkpointing=True)
    model_stage.keep_trainable_in_fp32(model)
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in frozen) and any("lm_head" in n for n in frozen)
    assert set(frozen.values()) == {torch.bfloat16}, frozen
    assert trainable and set(trainable.values()) == {torch.float32}
    assert model.base_model.model.is_gradient_checkpointing


def test_a_source_tree_that_is_not_installed_still_marks_its_folders(tmp_path, monkeypatch):
    import importlib.metadata

    from qtune.core.folders import MARKER, write_marker

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    write_marker(tmp_path, "run")
    assert json.loads((tmp_path / MARKER).read_text()) == {"kind": "run", "qtune": "source"}
