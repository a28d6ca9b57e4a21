"""What is found before anything heavy loads: a typo'd folder said at once with a did-you-mean, a Hub that cannot be
reached said at once (not after a minute of retries), and `qtune validate` checking paths, config.json and data
files, saying what it skipped."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import recipe_dict, write_jsonl, write_recipe

from qtune.core.errors import EXIT_DATA, EXIT_ENVIRONMENT

HEAVY = ("torch", "transformers", "trl", "peft", "bitsandbytes", "numpy")


def demo_like_project(folder: Path, tiny_llama: Path, alpaca_file: Path) -> Path:
    """A project laid out as the demo lays it out: runs/tiny-llama, runs/demo-data.jsonl, recipes/r.yaml with relative
    paths."""
    shutil.copytree(tiny_llama, folder / "runs" / "tiny-llama")
    shutil.copy(alpaca_file, folder / "runs" / "demo-data.jsonl")
    (folder / "recipes").mkdir()
    raw = recipe_dict("runs/tiny-llama", "runs/demo-data.jsonl", "runs/demo")
    return write_recipe(folder / "recipes" / "r.yaml", raw)


def qtune_in(folder: Path, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qtune", *map(str, args)],
        cwd=folder,
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})},
        timeout=300,
    )


def unreachable_hub(monkeypatch) -> None:
    """An endpoint nothing listens on (the discard port), with the tests' offline mode lifted."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


@pytest.mark.parametrize(
    "name, local",
    [("runs/tiny-lama", True), ("runs/x/y", True), ("someone/model", False), ("runs", False)],
)
def test_a_name_whose_folder_exists_here_is_a_path(tmp_path, monkeypatch, name, local):
    """`runs/tiny-lama` is a path when a `runs` folder is here (the demo's layout), a Hub id when it is not."""
    from qtune.core.fs import names_a_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert names_a_local_path(name) is local


def test_a_typo_in_the_model_folder_is_said_at_once_with_the_closest_names(tmp_path, tiny_llama, alpaca_file):
    """Before: `loading model 'runs/tiny-lama' failed: We couldn't connect to 'https://huggingface.co'` after 56 s."""
    recipe = demo_like_project(tmp_path, tiny_llama, alpaca_file)
    text = recipe.read_text().replace("runs/tiny-llama", "runs/tiny-lama")
    recipe.write_text(text)
    probe = (
        "import sys; from qtune.cli import main; codes = [main(['validate', sys.argv[1]]), main(['train', sys.argv[1]])];"
        f" print(codes, sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe, "recipes/r.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert done.stdout.strip() == f"[{EXIT_ENVIRONMENT}, {EXIT_ENVIRONMENT}] []", done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert (
        lines == ["qtune: error: no such folder: runs/tiny-lama — did you mean runs/tiny-llama? (check model.name)"] * 2
    )
    assert not (tmp_path / "runs" / "demo").exists()


def test_a_typo_in_a_data_path_or_adapter_is_said_with_the_closest_names(
    tmp_path, tiny_llama, alpaca_file, monkeypatch, run_cli
):
    recipe = demo_like_project(tmp_path, tiny_llama, alpaca_file)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("validate", recipe, "--set", "data.datasets=[{path: runs/demo-dta.jsonl, format: alpaca}]")
    assert code == EXIT_DATA and "did you mean runs/demo-data.jsonl?" in err, err
    code, _, err = run_cli("validate", recipe, "--set", "model.adapter=runs/dmo")
    assert code == EXIT_ENVIRONMENT and "no such folder: runs/dmo" in err, err
    code, _, err = run_cli("validate", recipe, "--set", "model.name=./models/llama")
    assert code == EXIT_ENVIRONMENT and "its folder models does not exist either" in err, err


def test_an_unreachable_hub_is_said_at_once_and_a_cached_model_still_loads(tmp_path, monkeypatch, tiny_llama):
    """Offline, a Hub id is read from the local cache only (no retries), or refused with one line when not there."""
    from qtune.core.errors import QtuneError
    from qtune.core.network import hub_unreachable
    from qtune.modeling.config import load_config

    unreachable_hub(monkeypatch)
    assert "127.0.0.1:9" in hub_unreachable()
    with pytest.raises(QtuneError, match=r"cannot reach the Hub \(127.0.0.1:9: .*\) and 'someone/not-here'") as info:
        load_config("someone/not-here")
    assert info.value.code == EXIT_ENVIRONMENT
    # the same model in huggingface_hub's cache layout: read from there, no request made
    cache = tmp_path / "hub-cache"
    snapshot = cache / "models--someone--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_llama / "config.json", snapshot / "config.json")
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("0" * 40)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert (
        load_config("someone/tiny").hidden_size == json.loads((tiny_llama / "config.json").read_text())["hidden_size"]
    )


def test_train_and_plan_on_an_unreachable_hub_id_fail_in_one_line(tmp_path, tiny_llama, alpaca_file):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict("someone/not-here", alpaca_file, tmp_path / "run"))
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": ""}
    for args in (("train", recipe), ("plan", recipe), ("memory", "someone/not-here")):
        done = qtune_in(tmp_path, *args, env=env)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == EXIT_ENVIRONMENT, done.stderr[-2000:]
        assert lines[-1].startswith("qtune: error: cannot reach the Hub (127.0.0.1:9: "), lines
        assert "Traceback" not in done.stderr and "Retrying" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_validate_says_what_it_checked_and_what_it_skipped(tmp_path, tiny_llama, alpaca_file, monkeypatch, run_cli):
    recipe = demo_like_project(tmp_path, tiny_llama, alpaca_file)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("validate", recipe)
    rows = sum(1 for line in alpaca_file.read_text().splitlines() if line.strip())
    assert code == 0, err
    assert out.splitlines()[:2] == [
        "checked: model folder runs/tiny-llama (config.json: llama)",
        f"checked: dataset runs/demo-data.jsonl: {rows} rows in the alpaca format",
    ]
    assert out.splitlines()[-1].startswith("ok: ")
    unreachable_hub(monkeypatch)
    code, out, err = run_cli("validate", recipe, "--set", "model.name=someone/model")
    assert code == 0, err
    assert "skipped: model someone/model is a Hub id and the Hub cannot be reached (127.0.0.1:9: " in out
    assert "it is NOT in the local cache" in out


@pytest.mark.parametrize(
    "damage, code, message",
    [
        ("data_line", EXIT_DATA, "invalid JSON on line 7"),
        ("data_column", EXIT_DATA, "row 3 (line 3)"),
        ("config", EXIT_ENVIRONMENT, "the model's config.json does not read as JSON"),
        ("no_config", EXIT_ENVIRONMENT, "model folder has no config.json: runs/tiny-llama"),
        ("adapter", EXIT_ENVIRONMENT, "model.adapter has no adapter_model.safetensors"),
    ],
)
def test_validate_refuses_what_training_would_refuse(
    tmp_path, tiny_llama, alpaca_file, monkeypatch, run_cli, damage, code, message
):
    """Before: `ok` for each of these; training then failed at its start (or later)."""
    recipe = demo_like_project(tmp_path, tiny_llama, alpaca_file)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "runs" / "demo-data.jsonl"
    lines = data.read_text().splitlines()
    overrides = []
    if damage == "data_line":
        lines[6] = lines[6][:-5]
        data.write_text("\n".join(lines) + "\n")
    elif damage == "data_column":
        row = json.loads(lines[2])
        row["output"] = 42
        lines[2] = json.dumps(row)
        data.write_text("\n".join(lines) + "\n")
    elif damage == "config":
        (tmp_path / "runs" / "tiny-llama" / "config.json").write_text('{"model_type": "llama",')
    elif damage == "no_config":
        (tmp_path / "runs" / "tiny-llama" / "config.json").unlink()
    else:
        adapter = tmp_path / "runs" / "old" / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text("{}")
        overrides = ["--set", "model.adapter=runs/old"]
    got, out, err = run_cli("validate", recipe, *overrides)
    assert got == code and message in err, err
    assert len(err.strip().splitlines()) == 1 and "ok:" not in out


def test_data_checks_of_every_kind_need_no_tokenizer(tmp_path):
    """Each data kind's check_rows is what validate runs: the column checks of training, without a tokenizer."""
    from qtune.config.recipe import DatasetSpec
    from qtune.core.errors import DataError
    from qtune.data import DATA_KINDS, kind_of
    from qtune.data.readers import read_rows

    assert all(callable(kind.check_rows) for kind in DATA_KINDS)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q"}])
    spec = DatasetSpec(path=str(pairs), format="preference")
    with pytest.raises(DataError, match="line 2"):
        kind_of("preference").check_rows(read_rows(spec), spec)
