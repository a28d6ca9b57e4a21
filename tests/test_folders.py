"""qtune deletes or replaces only what it wrote, and one process at a time writes into a run or export folder."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import recipe_dict, write_jsonl, write_recipe

from qtune.core.checkpoints import MANIFEST
from qtune.core.errors import RecipeError
from qtune.core.folders import LOCK, MARKER, PREVIOUS, FolderLock, claimed_run, is_run

RECIPE = 2


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def cli(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qtune", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})},
        timeout=timeout,
    )


def user_project(folder: Path, tiny_llama, alpaca_file, output_dir: str) -> Path:
    """A user's project folder: their notes, their data, their recipe."""
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "thesis.txt").write_text("three years of work")
    (folder / "data.jsonl").write_bytes(Path(alpaca_file).read_bytes())
    raw = recipe_dict(tiny_llama, folder / "data.jsonl", output_dir)
    write_recipe(folder / "r.yaml", raw)
    return folder / "r.yaml"


@pytest.mark.parametrize("where", ["dot", "home", "folder", "symlink", "recipe_yaml"])
def test_overwrite_never_deletes_a_folder_qtune_did_not_create(tmp_path, tiny_llama, alpaca_file, where):
    """`output_dir: .`, `~`, a folder of the user's, a symlink to one, or one that happens to hold a recipe.yaml:
    refused with one line, --overwrite included, and nothing in it touched."""
    project = tmp_path / "project"
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export PATH")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.jpg").write_bytes(b"\xff\xd8")
    if where == "recipe_yaml":
        (mine / "recipe.yaml").write_text("mine: true\n")  # a file name qtune writes, in a folder qtune did not make
    (tmp_path / "link").symlink_to(mine)
    output = {"dot": ".", "home": "~", "folder": str(mine), "symlink": str(tmp_path / "link"), "recipe_yaml": str(mine)}
    recipe = user_project(project, tiny_llama, alpaca_file, output[where])
    before = {p: snapshot(p) for p in (project, home, mine)}
    for flags in ((), ("--overwrite",)):
        done = cli("train", recipe, *flags, cwd=project, env={"HOME": str(home)})
        lines = done.stderr.strip().splitlines()
        assert done.returncode == RECIPE, done.stderr[-2000:]
        assert len(lines) == 1 and lines[0].startswith("qtune: error:") and "did not create" in lines[0]
        assert "--overwrite" not in lines[0].split("—")[-1]  # the fix no longer suggests it
    assert {p: snapshot(p) for p in (project, home, mine)} == before


def test_overwrite_replaces_a_run_but_refuses_when_the_user_added_files(tmp_path, tiny_llama, alpaca_file):
    out = tmp_path / "run"
    with claimed_run(out, resume=False, overwrite=False):
        (out / "metrics.json").write_text("{}")
    assert is_run(out)
    with claimed_run(out, resume=False, overwrite=True) as claim:
        # qtune's own files are set aside until the new run starts, the lock stays
        assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, LOCK, PREVIOUS])
        assert sorted(p.name for p in (out / PREVIOUS).iterdir()) == [MARKER, "metrics.json"]
        claim.started()
        assert sorted(p.name for p in out.iterdir()) == [MARKER, LOCK]
    (out / "my-notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match="did not write.*my-notes.txt") as error:
        with claimed_run(out, resume=False, overwrite=True):
            pass
    assert error.value.code == RECIPE and (out / "my-notes.txt").read_text() == "mine"


def test_a_failed_overwrite_leaves_the_previous_run_as_it_was(tmp_path, tiny_llama, alpaca_file):
    """Before: `--overwrite` deleted the previous run first, so a start that failed (a typo'd model, a bad data line)
    left the folder empty. Now the previous run is set aside and put back; it goes only once training starts."""
    out = tmp_path / "run"
    with claimed_run(out, resume=False, overwrite=False):
        (out / "adapter").mkdir()
        (out / "adapter" / "adapter_model.safetensors").write_bytes(b"weights of last week")
        (out / "metrics.json").write_text('{"eval_loss": 1.2}')
    before = {name: data for name, data in snapshot(out).items() if name != LOCK}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x", "output": 3}])
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_llama, bad, out))
    done = cli("train", recipe, "--overwrite")
    assert done.returncode == 3 and "row 2 (line 2)" in done.stderr, done.stderr[-2000:]
    assert {name: data for name, data in snapshot(out).items() if name != LOCK} == before
    with pytest.raises(RuntimeError):  # the same for any failure inside the claim before started()
        with claimed_run(out, resume=False, overwrite=True):
            (out / "metrics.json").write_text("half")
            raise RuntimeError
    assert {name: data for name, data in snapshot(out).items() if name != LOCK} == before
    # killed between the two (no exception ran): the next claim of the folder puts the previous run back first
    from qtune.core.folders import set_aside

    set_aside(out)
    (out / "metrics.json").write_text("half")
    with claimed_run(out, resume=True, overwrite=False):
        assert {name: data for name, data in snapshot(out).items() if name != LOCK} == before


def test_lock_refuses_a_second_holder_and_a_killed_holder_leaves_nothing_stuck(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from qtune.core.folders import FolderLock; FolderLock(Path(sys.argv[1]), 'x').acquire(); "
            "print('held', flush=True); time.sleep(600)",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RecipeError, match=f"in use by x running as process {holder.pid}"):
        FolderLock(folder, "x").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    FolderLock(folder, "x").acquire().release()  # the kernel dropped the dead holder's lock


def test_two_trainings_into_one_folder_the_second_is_refused_and_nothing_is_lost(tmp_path, tiny_llama, alpaca_file):
    """Two terminals, one recipe: the second start is refused naming the first; kill -9 of the first, then
    --resume, still works (the lock dies with its holder)."""
    raw = recipe_dict(
        tiny_llama, alpaca_file, tmp_path / "run", train={"max_steps": 300, "save_steps": 5, "eval_steps": None}
    )
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "QTUNE_SAMPLE_TRACE": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "qtune", "train", str(recipe)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first_checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-5" / MANIFEST
    deadline = time.time() + 300
    while not first_checkpoint.is_file():
        assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
        time.sleep(0.05)
    second = cli("train", recipe)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == RECIPE and len(lines) == 1 and f"process {first.pid}" in lines[0]
    for flags in (("--resume",), ("--overwrite",)):  # neither may take the folder from under a live run
        assert cli("train", recipe, *flags).returncode == RECIPE
    assert first.poll() is None  # untouched by the refused starts
    first.kill()
    first.wait()
    # the resume ends 5 steps after the newest checkpoint instead of running the remaining ~280 (40 s): the lock
    # question is whether it may start at all; a resumed run's identity is tests/test_survival.py's
    newest = max(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    resumed = cli("train", recipe, "--resume", "--force", "--set", f"train.max_steps={newest + 5}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / f"checkpoint-{newest + 5}" / MANIFEST).is_file()


def test_an_export_into_a_folder_another_export_holds_is_refused(tmp_path, llama_run, run_cli):
    out = tmp_path / "export"
    code, _, err = run_cli("export", llama_run, "--format", "adapter", "--out", out, "--eval-samples", "2")
    assert code == 0, err
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from qtune.core.folders import FolderLock; FolderLock(Path(sys.argv[1]), 'a qtune export')"
            ".acquire(); print('held', flush=True); time.sleep(600)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(out)
        code, _, err = run_cli("export", llama_run, "--format", "adapter", "--out", out, "--eval-samples", "2")
        assert code == RECIPE and f"in use by a qtune export running as process {holder.pid}" in err
        assert {k: v for k, v in snapshot(out).items() if k != LOCK} == {k: v for k, v in before.items() if k != LOCK}
    finally:
        holder.kill()
        holder.wait()


def test_export_never_writes_into_a_folder_qtune_did_not_create(tmp_path, llama_run, run_cli):
    mine = tmp_path / "mine"
    (mine / "adapter").mkdir(parents=True)
    (mine / "adapter" / "my-own-adapter.bin").write_bytes(b"mine")
    before = snapshot(mine)
    code, _, err = run_cli("export", llama_run, "--format", "adapter", "--out", mine)
    assert code == RECIPE and "did not create" in err and snapshot(mine) == before


def test_a_staged_write_replaces_the_target_only_when_whole(tmp_path):
    """core.fs.staged, which every writer of a file or folder uses: a failure leaves the earlier target as it was and
    nothing half-written; a success replaces it; a leftover of a killed attempt is cleared first."""
    from qtune.core.fs import staged, staging_path

    target = tmp_path / "merged"
    target.mkdir()
    (target / "old.safetensors").write_text("old")
    staging_path(target).mkdir()
    (staging_path(target) / "leftover").write_text("x")
    with pytest.raises(RuntimeError), staged(target) as staging:
        assert list(staging.iterdir()) == []  # the leftover is gone before writing starts
        (staging / "new.safetensors").write_text("half")
        raise RuntimeError("killed halfway")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"] and (target / "old.safetensors").is_file()
    with staged(target) as staging:
        (staging / "new.safetensors").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.safetensors"] and sorted(os.listdir(tmp_path)) == ["merged"]
    with staged(tmp_path / "model.gguf", folder=False) as staging:
        staging.write_text("gguf")
    assert (tmp_path / "model.gguf").read_text() == "gguf"


@pytest.mark.parametrize(
    "name, local",
    [
        ("meta-llama/Llama-2-7b-hf", False),
        ("gpt2", False),
        ("Qwen/Qwen2.5-7B-Instruct", False),
        ("./runs/tiny-llama", True),
        ("/data/models/llama", True),
        ("~/models/llama", True),
        ("runs/sft/adapter", True),
        ("data/train.jsonl", True),
        ("chats.parquet", True),
    ],
)
def test_one_rule_tells_a_path_from_a_hub_id(name, local):
    """Models, adapters and datasets use the same rule (it was three, with different counts of '/')."""
    from qtune.core.fs import names_a_local_path

    assert names_a_local_path(name) is local
