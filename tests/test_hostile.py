"""Hostile and broken input through `qtune train`: recipes, data, environment.

Every case must give exactly one `qtune: error:` line that names what and where, its documented exit code,
no traceback, and no output folder (or the user's folder untouched).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import recipe_dict, write_recipe

RECIPE, DATA, ENVIRONMENT, INTEGRITY = 2, 3, 4, 5


def nested(raw: dict, dotted: str, value):
    *path, key = dotted.split(".")
    node = raw
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[key] = value


def set_to(dotted, value):
    return lambda raw, tmp: nested(raw, dotted, value)


def data_file(name: str, content: bytes | str, fmt: str | None = None):
    def change(raw, tmp):
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        raw["data"]["datasets"][0]["path"] = str(path)
        if fmt:
            raw["data"]["datasets"][0]["format"] = fmt

    return change


def alpaca_lines(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = {"instruction": "Add.", "input": "1 + 1", "output": "2"}

CASES = {
    # recipes: unknown keys at every level, with a suggestion
    "typo top level": (set_to("modle", {"name": "x"}), RECIPE, "modle"),
    "typo model": (set_to("model.nme", "x"), RECIPE, "model.nme"),
    "typo quant": (set_to("quant.double_quantization", True), RECIPE, "double_quant"),
    "typo lora": (set_to("lora.rank", 8), RECIPE, "lora.rank"),
    "typo data": (set_to("data.max_len", 64), RECIPE, "max_length"),
    "typo dataset": (set_to("data.datasets.0.fromat", "alpaca"), RECIPE, "format"),
    "typo train": (set_to("train.learning_rate", 1e-4), RECIPE, "train.learning_rate"),
    "typo log": (set_to("log.report", ["wandb"]), RECIPE, "log.report"),
    "typo export": (set_to("export.format", ["gguf_q8_0"]), RECIPE, "formats"),
    "typo hub": (set_to("hub.repo", "me/model"), RECIPE, "repo_id"),
    "typo trainer extra": (set_to("train.extra", {"warmup_step": 3}), RECIPE, "warmup_steps"),
    # wrong types and out-of-range values
    "rank not a number": (set_to("lora.r", "eight"), RECIPE, "lora.r"),
    "lr not a number": (set_to("train.lr", "fast"), RECIPE, "train.lr"),
    "datasets not a list": (set_to("data.datasets", "file.jsonl"), RECIPE, "data.datasets"),
    "rank zero": (set_to("lora.r", 0), RECIPE, "lora.r"),
    "negative batch": (set_to("train.micro_batch_size", -1), RECIPE, "micro_batch_size"),
    "val_size above 1": (set_to("data.val_size", 1.5), RECIPE, "val_size"),
    "quant type typo": (set_to("quant.type", "nf5"), RECIPE, "nf4"),
    "format typo": (set_to("data.datasets.0.format", "alpca"), RECIPE, "alpaca"),
    "optimizer typo": (set_to("train.optimizer", "adamw"), RECIPE, "train.optimizer"),
    "remote code unpinned": (
        lambda raw, tmp: raw["model"].update(trust_remote_code=True, revision="main"),
        RECIPE,
        "trust_remote_code",
    ),
    "two validation sources": (
        set_to("data.val_datasets", [{"path": "v.jsonl", "format": "alpaca"}]),
        RECIPE,
        "val_size",
    ),
    "no targets match": (set_to("lora.target_modules", ["qkv"]), RECIPE, "match no layer"),
    # data
    "missing data file": (set_to("data.datasets.0.path", "/nonexistent/train.jsonl"), DATA, "/nonexistent/train.jsonl"),
    "empty data file": (data_file("empty.jsonl", ""), DATA, "empty.jsonl"),
    "bad json line 3": (data_file("bad.jsonl", alpaca_lines(GOOD, GOOD) + "{not json\n"), DATA, "line 3"),
    "missing column": (data_file("cols.jsonl", alpaca_lines({"instruction": "x", "answer": "y"})), DATA, "output"),
    "zero supervised tokens": (
        data_file("zero.jsonl", alpaca_lines(*[{"instruction": "x " * 200, "output": "y"}] * 20)),
        DATA,
        "supervised",
    ),
    "non-utf8 bytes": (
        data_file("latin.jsonl", alpaca_lines(GOOD).encode() + b'{"instruction": "caf\xe9", "output": "x"}\n'),
        DATA,
        "line 2",
    ),
    "one giant line": (data_file("giant.jsonl", "{" + "x" * 5_000_000), DATA, "line 1"),
    "wrong value type": (
        data_file("types.jsonl", alpaca_lines(GOOD, {"instruction": ["a"], "output": "b"})),
        DATA,
        "row 2",
    ),
    "unsupported file type": (data_file("data.docx", "hello"), DATA, "data.docx"),
    "unknown role": (
        data_file("roles.jsonl", json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n", "messages"),
        DATA,
        "wizard",
    ),
    "column map to nothing": (
        lambda raw, tmp: raw["data"]["datasets"][0].update(columns={"output": "reply"}),
        DATA,
        "reply",
    ),
    "text column missing": (data_file("text.jsonl", alpaca_lines(GOOD), "text"), DATA, "text"),
    # environment
    "missing model folder": (set_to("model.name", "/nonexistent/model"), ENVIRONMENT, "/nonexistent/model"),
    "model folder without config": (
        lambda raw, tmp: (tmp / "empty-model").mkdir() or raw["model"].update(name=str(tmp / "empty-model")),
        ENVIRONMENT,
        "empty-model",
    ),
    "fp16 needs a GPU": (set_to("quant.compute_dtype", "fp16"), RECIPE, "needs a GPU"),
    "output dir not writable": (set_to("train.output_dir", "/proc/qtune-run"), ENVIRONMENT, "/proc/qtune-run"),
    "output dir is a file": (
        lambda raw, tmp: ((tmp / "afile").write_text("x"), raw["train"].update(output_dir=str(tmp / "afile"))),
        RECIPE,
        "afile",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_clear_line_exit_code_and_no_output(tmp_path, tiny_llama, alpaca_file, run_cli, case):
    change, code, named = CASES[case]
    out = tmp_path / "run"
    raw = recipe_dict(tiny_llama, alpaca_file, out)
    change(raw, tmp_path)
    got, stdout, stderr = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert got == code, stderr
    assert len(lines) == 1 and lines[0].startswith("qtune: error: "), stderr
    assert named in lines[0]
    assert len(lines[0]) < 600  # one readable line, even for a 5 MB line of data
    assert "Traceback" not in stderr + stdout
    assert not out.exists()


@pytest.mark.parametrize(
    "text, named",
    [
        ("", "empty"),
        ("model: {name: x\n", "line"),
        ("!!python/object/apply:os.system ['touch /tmp/qtune-pwned']\n", "YAML"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_broken_recipe_files_through_the_cli(tmp_path, run_cli, text, named):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    got, _, stderr = run_cli("train", path)
    lines = stderr.strip().splitlines()
    assert got == RECIPE and len(lines) == 1 and lines[0].startswith("qtune: error:") and named in lines[0]
    assert not Path("/tmp/qtune-pwned").exists()


def test_missing_and_non_utf8_recipe_files_through_the_cli(tmp_path, run_cli):
    got, _, stderr = run_cli("train", tmp_path / "nope.yaml")
    assert got == RECIPE and stderr.startswith("qtune: error:") and "nope.yaml" in stderr
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"model: {name: caf\xe9}\n")
    got, _, stderr = run_cli("train", bad)
    assert got == RECIPE and "UTF-8" in stderr and len(stderr.strip().splitlines()) == 1


def test_existing_folder_and_resume_cases(tmp_path, tiny_llama, alpaca_file, run_cli):
    """A folder that is not a qtune run is never written into or deleted without --overwrite; --resume of nothing is exit 5."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_llama, alpaca_file, out))
    for args, code in (((), RECIPE), (("--resume",), INTEGRITY)):
        got, _, stderr = run_cli("train", recipe, *args)
        assert got == code and len(stderr.strip().splitlines()) == 1 and str(out) in stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_recipe_errors_answer_before_any_heavy_import(tmp_path, tiny_llama, alpaca_file):
    """Recipe mistakes are reported before torch (or transformers, trl, datasets) is imported: at once."""
    probe = (
        "import sys; from qtune.cli import main; code = main(['train', sys.argv[1]]); "
        "print(code, any(m in sys.modules for m in ('torch', 'transformers', 'trl', 'datasets')))"
    )
    for case in ("typo lora", "rank zero", "format typo"):
        raw = recipe_dict(tiny_llama, alpaca_file, tmp_path / "run")
        CASES[case][0](raw, tmp_path)
        recipe = write_recipe(tmp_path / f"{case}.yaml", raw)
        done = subprocess.run([sys.executable, "-c", probe, str(recipe)], capture_output=True, text=True)
        code, heavy_loaded = done.stdout.split()
        assert code == "2" and heavy_loaded == "False"
