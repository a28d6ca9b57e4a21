"""The recipe schema: defaults, validation, did-you-mean, overrides. No torch needed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from qtune.config.recipe import Recipe, load_recipe, validate_recipe
from qtune.core.errors import EXIT_RECIPE, RecipeError

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {
    "model": {"name": "org/model"},
    "data": {"datasets": [{"path": "d.jsonl", "format": "alpaca"}]},
    "train": {"output_dir": "runs/x"},
}


def with_change(path: str, value):
    """MINIMAL with one dotted key set (creating sections on the way)."""
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    node = raw
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    node[keys[-1]] = value
    return raw


@pytest.mark.parametrize("recipe_path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe_path):
    recipe = load_recipe(recipe_path)
    assert isinstance(recipe, Recipe)
    assert recipe.quant.double_quant


def test_minimal_recipe_gets_qlora_defaults():
    recipe = validate_recipe(MINIMAL)
    assert (recipe.quant.type, recipe.quant.double_quant, recipe.quant.compute_dtype) == ("nf4", True, "auto")
    assert recipe.lora.target_modules == "all-linear"
    assert recipe.train.optimizer == "paged_adamw_8bit"
    assert recipe.data.train_on_inputs is False
    assert recipe.model.trust_remote_code is False


def test_recipe_is_frozen():
    recipe = validate_recipe(MINIMAL)
    with pytest.raises(ValidationError, match="frozen"):
        recipe.lora.r = 4


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("lora.rr", 8, "unknown key 'lora.rr' (recipe) — did you mean 'lora.r'?"),
        ("train.learning_rate", 1e-4, "unknown key 'train.learning_rate'"),
        ("train.lrr", 1e-4, "did you mean 'train.lr'?"),
        ("quant.double_quantization", True, "did you mean 'quant.double_quant'?"),
        ("modle.name", "x", "unknown section 'modle' (recipe) — did you mean 'model'?"),
        ("data.datasets.0.fromat", "alpaca", "did you mean 'data.datasets.0.format'?"),
        ("data.max_len", 10, "did you mean 'data.max_length'?"),
        ("log.report", ["wandb"], "did you mean 'log.report_to'?"),
    ],
)
def test_unknown_keys_suggest_the_right_one(key, value, expected):
    with pytest.raises(RecipeError) as info:
        validate_recipe(with_change(key, value))
    assert expected in info.value.line()
    assert info.value.code == EXIT_RECIPE


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("train.lr", 0, "train.lr"),
        ("train.lr", -1e-4, "train.lr"),
        ("lora.r", 0, "lora.r"),
        ("lora.r", "sixteen", "lora.r"),
        ("lora.dropout", 1.0, "lora.dropout"),
        ("data.val_size", 1.5, "data.val_size"),
        ("data.val_size", -0.1, "data.val_size"),
        ("data.max_length", 0, "data.max_length"),
        ("train.micro_batch_size", 0, "train.micro_batch_size"),
        ("train.grad_accum", 1.5, "train.grad_accum"),
        ("train.epochs", 0, "train.epochs"),
        ("train.max_steps", -1, "train.max_steps"),
        ("quant.type", "int4", "quant.type"),
        ("quant.compute_dtype", "float16", "quant.compute_dtype"),
        ("data.datasets", [], "data.datasets"),
        ("data.datasets.0.format", "alpacca", "did you mean 'alpaca'"),
        ("train.optimizer", "paged_adamw8bit", "did you mean 'paged_adamw_8bit'"),
        ("lora.target_modules", [], "lora.target_modules"),
        ("train.seed", "x", "train.seed"),
        ("model", "llama", "model"),
    ],
)
def test_bad_values_name_the_key(key, value, named):
    with pytest.raises(RecipeError) as info:
        validate_recipe(with_change(key, value))
    assert named in info.value.line()
    assert "\n" not in info.value.line()


@pytest.mark.parametrize("missing", ["model", "data", "train", "model.name", "train.output_dir"])
def test_missing_required_keys(missing):
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    section, _, key = missing.partition(".")
    if key:
        del raw[section][key]
    else:
        del raw[section]
    with pytest.raises(RecipeError, match=f"missing required key '{missing}'"):
        validate_recipe(raw)


def test_trust_remote_code_needs_a_pinned_commit():
    with pytest.raises(RecipeError, match="40-hex commit"):
        validate_recipe(with_change("model.trust_remote_code", True))
    pinned = with_change("model.trust_remote_code", True)
    pinned["model"]["revision"] = "a" * 40
    assert validate_recipe(pinned).model.trust_remote_code


def test_val_size_and_val_datasets_are_exclusive():
    raw = with_change("data.val_datasets", [{"path": "v.jsonl", "format": "alpaca"}])
    assert validate_recipe(raw).data.val_datasets[0].path == "v.jsonl"  # val_size unset: the explicit set is it
    raw["data"]["val_size"] = 0.05
    with pytest.raises(RecipeError, match="val_size"):
        validate_recipe(raw)
    raw["data"]["val_size"] = 0
    assert validate_recipe(raw).data.val_datasets[0].path == "v.jsonl"


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    recipe = load_recipe(
        path,
        [
            "train.lr=1e-4",
            "lora.r=4",
            "data.train_on_inputs=true",
            "lora.target_modules=[q_proj, v_proj]",
            "log.report_to=[tensorboard]",
            "train.extra.warmup_steps=3",
        ],
    )
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.lora.r == 4
    assert recipe.data.train_on_inputs is True
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.log.report_to == ["tensorboard"]
    assert recipe.train.extra == {"warmup_steps": 3}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr", "bad --set"),
        ("=3", "bad --set"),
        ("lora.rr=3", "did you mean 'lora.r'"),
        ("model.name.x=1", "is not a section"),
    ],
)
def test_bad_overrides(tmp_path, override, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(RecipeError, match=message):
        load_recipe(path, [override])


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "recipe is empty"),
        ("# only a comment\n", "recipe is empty"),
        ("model: {name: x\n", "not valid YAML"),
        ("model:\n  name: x\n bad-indent: 1\n", "not valid YAML"),
        ("!!python/object/apply:os.system ['echo hacked']\n", "not valid YAML"),
        ("model: !!python/name:os.system\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("just a string\n", "must be a mapping"),
    ],
)
def test_broken_recipe_files(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_yaml_error_gives_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: x\ndata: [unclosed\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "line " in info.value.line()


def test_missing_and_non_utf8_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="folder"):
        load_recipe(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"model: {name: caf\xe9}\n")
    with pytest.raises(RecipeError, match="UTF-8"):
        load_recipe(bad)


def test_cli_validate_is_fast_and_imports_no_torch(tmp_path):
    """`qtune validate` must answer in under 2 s: it may not import torch or transformers."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')  # validate reads the data too
    code = (
        "import sys, qtune.cli; rc = qtune.cli.main(['validate', sys.argv[1]]); "
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'trl') if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout  # what "answers at once" stands for: nothing heavy is imported
    assert "ok:" in result.stdout


def test_cli_recipe_error_is_one_line_with_exit_2(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(with_change("lora.rr", 8)))
    result = subprocess.run([sys.executable, "-m", "qtune", "validate", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qtune: error: unknown key 'lora.rr'")
    assert str(path) in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_usage_errors_exit_2(run_cli):
    code, _, err = run_cli("train")
    assert code == 2 and err.startswith("qtune: error:") and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("tarin", "x.yaml")
    assert code == 2 and "invalid choice" in err


MODEL_CONFIGS = REPO / "tests" / "model_configs"  # the shape fields of each model's published config.json


@pytest.mark.parametrize(
    "recipe_name, config_name, parameters",
    [
        ("llama-3.1-8b-instruct", "llama-3.1-8b", 8_030_261_248),
        ("llama-3-8b-dpo", "llama-3.1-8b", 8_030_261_248),  # the same shape; the plan counts both sequences of a pair
        ("qwen2.5-7b-alpaca", "qwen2.5-7b", 7_615_616_512),
        ("gemma-2-9b-chat", "gemma-2-9b", 9_241_705_984),
        ("phi-4-mini-alpaca", "phi-4-mini", 3_836_021_760),
        ("qwen3-4b-grpo-gsm8k", "qwen3-4b", 4_022_468_096),  # the plan counts generation's KV cache and log-probs
    ],
)
def test_the_family_recipes_fit_a_16_gb_card_by_the_plan(recipe_name, config_name, parameters):
    """Each family's recipe, planned from its model's config on a T4 (15 GiB), with the headroom `auto` keeps; and
    its exports are ones its architecture can have."""
    from qtune.export.formats import formats_problem as export_formats_problem
    from qtune.modeling.config import load_config
    from qtune.planning.memory import inventory
    from qtune.planning.plan import plan_training
    from qtune.training.arguments import AUTO_GPU_SHARE

    folder = MODEL_CONFIGS / config_name
    assert inventory(load_config(str(folder), "main")).total == parameters  # the published parameter count
    recipe = load_recipe(REPO / "recipes" / f"{recipe_name}.yaml", [f"model.name={folder}"])
    plan = plan_training(recipe, budget_bytes=int(15 * 2**30 * AUTO_GPU_SHARE), compute_bytes=2)
    assert plan["fits"], (recipe_name, plan["total_bytes"] / 2**30)
    assert export_formats_problem(recipe.export.formats, json.loads((folder / "config.json").read_text())) is None


@pytest.mark.parametrize(
    "key, qtune_name",
    [
        ("train.learning_rate", "train.lr"),
        ("train.per_device_train_batch_size", "train.micro_batch_size"),
        ("train.gradient_accumulation_steps", "train.grad_accum"),
        ("train.num_train_epochs", "train.epochs"),
        ("train.max_seq_length", "data.max_length"),
        ("lora.lora_alpha", "lora.alpha"),
        ("learning_rate", "train.lr"),
        ("grpo.generation_batch_size", "train.micro_batch_size"),
        ("grpo.max_prompt_length", "data.max_length"),
    ],
)
def test_names_from_trl_and_axolotl_get_a_did_you_mean_to_qtunes(key, qtune_name):
    """Before: `train.learning_rate` got the list of known keys, but no "did you mean 'lr'"."""
    with pytest.raises(RecipeError) as error:
        validate_recipe(with_change(key, 1))
    assert f"unknown {'key' if '.' in key else 'section'} '{key}'" in error.value.what
    assert error.value.fix.startswith(f"did you mean '{qtune_name}'?")


def test_every_synonym_names_a_real_key():
    from qtune.config.recipe import SYNONYMS, known_keys

    assert [name for name in SYNONYMS.values() if name.split(".")[1] not in known_keys([name.split(".")[0]])] == []
    assert [name for name in SYNONYMS if name in known_keys([])] == []  # never a section's own name
