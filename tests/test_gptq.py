"""GPTQ exports: the rounding against round-to-nearest, the file vLLM and transformers load, calibration on the run's
own samples, the fidelity gate, the push, and every bad setting refused in one line before anything is written."""

import json
import shutil

import pytest
import torch
import yaml
from helpers import assert_canary_absent

from qtune.config.runs import open_run
from qtune.export.formats import FORMATS, formats_problem

# the tiny test models are 64 wide: groups of 32, and few calibration samples
SMALL = ["--set", "export.gptq.group_size=32", "--set", "export.gptq.calibration_samples=8"]


def rounding_args(bits=4, group_size=128, symmetric=True):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        strategy="group" if group_size > 0 else "channel",
        group_size=group_size if group_size > 0 else None,
    )


@pytest.mark.parametrize(
    "bits,group_size,desc_act,symmetric",
    [(4, 128, False, True), (4, 128, True, True), (4, -1, False, True), (8, 128, False, True), (4, 32, False, False)],
)
def test_gptq_rounding_halves_the_output_error_of_round_to_nearest(bits, group_size, desc_act, symmetric):
    from compressed_tensors.quantization import fake_quantize

    from qtune.export.formats.gptq.rounding import accumulate_hessian, gptq_round, group_qparams

    torch.manual_seed(0)
    inputs = torch.randn(2048, 256) @ (0.2 * torch.randn(256, 256) + torch.eye(256))  # correlated, as a layer's are
    weight = 0.05 * torch.randn(128, 256)
    hessian = torch.zeros(256, 256)
    seen = accumulate_hessian(hessian, 0, inputs[:1000])
    assert accumulate_hessian(hessian, seen, inputs[1000:]) == 2048
    assert torch.allclose(hessian, 2 * inputs.T @ inputs / 2048, rtol=1e-4, atol=1e-3)
    args = rounding_args(bits, group_size, symmetric)
    rounded, scales, zero_points, _ = gptq_round(
        weight, hessian, args, desc_act=desc_act, dampening=0.01, scale_dtype=torch.float16
    )
    group = 256 if group_size == -1 else group_size
    nearest = torch.empty_like(weight)
    per_row = rounding_args(bits, -1, symmetric)
    for g in range(256 // group):
        columns = weight[:, g * group : (g + 1) * group]
        scale, zero = group_qparams(columns, args, torch.float16)
        nearest[:, g * group : (g + 1) * group] = fake_quantize(
            columns, scale.reshape(-1, 1), zero.reshape(-1, 1), per_row
        )
    error = ((inputs @ (rounded - weight).T) ** 2).mean()
    error_nearest = ((inputs @ (nearest - weight).T) ** 2).mean()
    print(f"{bits}-bit group {group_size} act-order {desc_act}: GPTQ / round-to-nearest {error / error_nearest:.3f}")
    assert error < 0.6 * error_nearest
    # every weight is on its group's grid, with the scales the file holds (fp16)
    assert scales.shape == (128, 256 // group) and torch.equal(scales, scales.half().float())
    levels = (rounded - 0).reshape(128, -1, group) / scales.unsqueeze(-1)
    if symmetric:
        assert torch.allclose(levels, levels.round(), atol=1e-3)
        assert levels.round().abs().max() <= 2 ** (bits - 1)


def test_gptq_exports_load_in_transformers_pass_the_gate_and_push_with_their_config(hub, llama_run, tmp_path, run_cli):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    shutil.copytree(llama_run, run)
    formats = ["gptq_int4", "gptq_int8", "nf4"]
    code, out, err = run_cli(
        "export", run, *[x for f in formats for x in ("--format", f)], "--eval-samples", "8", *SMALL
    )
    assert code == 0, err
    assert "gptq: layer 2/2" in out + err and "calibrating on 8 training samples" in out + err
    rows = json.loads((run / "export" / "export_report.json").read_text())["artifacts"]
    print({name: f"KL {row['mean_kl']:.2e} top-1 {100 * row['top1_agreement']:.1f}%" for name, row in rows.items()})
    assert rows["gptq_int4"]["top1_agreement"] >= FORMATS["gptq_int4"].fidelity_floor
    assert rows["gptq_int8"]["top1_agreement"] >= 0.99
    assert rows["gptq_int8"]["mean_kl"] < rows["gptq_int4"]["mean_kl"]
    folder = run / "export" / "gptq-int4"
    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors" and quantization["format"] == "pack-quantized"
    weights = quantization["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, True)
    assert quantization["ignore"] == ["lm_head"]
    with safe_open(folder / "model.safetensors", "pt") as f:
        packed = f.get_tensor("model.layers.0.self_attn.q_proj.weight_packed")
        scale = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
        assert packed.dtype == torch.int32 and packed.shape == (64, 64 // 8)  # eight 4-bit integers per int32
        assert scale.dtype == torch.float16 and scale.shape == (64, 2)
        assert not any(name.endswith("q_proj.weight") for name in f.keys())
    # transformers loads it with no extra arguments; its weights are integers times the file's scales
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    assert torch.isfinite(model(ids).logits).all()
    weight = model.model.layers[0].self_attn.q_proj.weight.float()
    levels = weight.reshape(64, 2, 32) / scale.float().unsqueeze(-1)
    assert torch.allclose(levels, levels.round(), atol=1e-2) and levels.round().abs().max() <= 8
    # pushed with a card that says the scheme, the fidelity, and the Hub's "quantized" relation
    code, _, err = run_cli("push", run, "--repo", "someone/tiny-gptq", "--what", "gptq")
    assert code == 0, err
    files = hub.repos["someone/tiny-gptq"]["files"]
    assert files["gptq-int4/model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert "gptq-int8/config.json" in files and "adapter_model.safetensors" not in files
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model_relation"] == "quantized" and "gptq" in meta["tags"]
    assert "4-bit integers, group size 32, symmetric" in card and "pack-quantized" in card
    assert f"top-1 {100 * rows['gptq_int4']['top1_agreement']:.1f}%" in card and "vllm serve" in card
    assert_canary_absent(hub, [run])


def test_calibration_is_the_runs_training_samples_tokenized_as_training_saw_them(llama_run):
    from transformers import AutoTokenizer

    from qtune.data import kind_of
    from qtune.export.formats.gptq.calibration import calibration_rows

    trained = open_run(llama_run)
    rows = calibration_rows(trained, 6, 10_000)
    assert rows == calibration_rows(trained, 6, 10_000)  # the recipe's seed: the same draw every time
    assert calibration_rows(trained, 6, 24) == [ids[:24] for ids in rows]  # cut to calibration_length
    section = trained.recipe.data
    kind = kind_of(section.datasets[0].format)
    tokenizer = AutoTokenizer.from_pretrained(trained.adapter_dir)
    training = kind.as_lm_samples(kind.build(section, tokenizer, seed=trained.recipe.train.seed).train)
    samples = {tuple(sample["input_ids"]) for sample in training}
    assert len(rows) == 6 and len({tuple(ids) for ids in rows}) == 6
    assert all(tuple(ids) in samples for ids in rows)  # whole training samples, template and all


@pytest.mark.parametrize(
    "override,code,message",
    [
        ("export.gptq.group_size=100", 2, "export.gptq.group_size"),
        ("export.gptq.dampening=0", 2, "export.gptq.dampening"),
        ("export.gptq.calibration_samples=0", 2, "export.gptq.calibration_samples"),
        ("export.gptq.calibration_length=8", 2, "export.gptq.calibration_length"),
        ("export.gptq.bits=3", 2, "bits"),
        ("export.gptq.group_size=128", 2, "does not divide the model's hidden_size (64): choose -1 or 32 or 64"),
        ("train.lr=1", 2, "only the export section can change after training"),
    ],
)
def test_a_bad_gptq_setting_is_one_line_and_writes_nothing(llama_run, tmp_path, run_cli, override, code, message):
    out = tmp_path / "export"
    got, _, err = run_cli("export", llama_run, "--format", "gptq_int4", "--out", out, "--set", override)
    assert got == code and message in err, err
    assert err.startswith("qtune: error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (out / "gptq-int4").exists()


def test_an_export_the_ram_cannot_hold_is_refused_before_any_weight_is_read(llama_run, tmp_path, run_cli, monkeypatch):
    import psutil

    class Little:
        available = 2**20

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Little())
    out = tmp_path / "export"
    code, _, err = run_cli("export", llama_run, "--format", "gptq_int4", "--out", out, *SMALL)
    assert code == 4 and "the GPTQ export needs about" in err and "GiB of RAM" in err, err
    assert "calibration_samples" in err and len(err.strip().splitlines()) == 1
    assert not (out / "gptq-int4").exists() and not list(out.glob(".*gptq*"))


def test_a_hub_dataset_offline_cannot_calibrate_and_is_one_line(llama_run, tmp_path, run_cli, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(llama_run, run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["data"]["datasets"][0]["path"] = "nobody/no-such-dataset"
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli("export", run, "--format", "gptq_int4", *SMALL)
    assert code != 0 and "nobody/no-such-dataset" in err and len(err.strip().splitlines()) == 1, err
    assert not (run / "export" / "gptq-int4").exists()


def test_mixtures_of_experts_are_refused_in_one_line():
    config = json.loads(open("tests/model_configs/qwen3-30b-a3b/config.json").read())
    problem = formats_problem(["gptq_int4"], config)
    assert "GPTQ export of mixtures of experts ('qwen3_moe') is not written yet" in problem and "nf4" in problem
    assert formats_problem(["nf4"], config) is None


def test_the_plan_states_the_gptq_exports_peak(pretrained_llama, alpaca_file, tmp_path, run_cli):
    from helpers import recipe_dict, write_recipe

    raw = recipe_dict(pretrained_llama, alpaca_file, tmp_path / "run", export={"formats": ["gptq_int4"]})
    code, out, err = run_cli("plan", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    assert "GPTQ export (128 samples x 512 tokens): peak" in out and "GiB of RAM on a CPU" in out
