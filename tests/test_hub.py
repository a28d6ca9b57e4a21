"""Push to a local stand-in of the Hub: files byte-identical, card metadata, private by default,
checkpoints pushed and resumed from, the token never written anywhere."""

import json
import shutil

import pytest
import yaml
from helpers import CANARY, assert_canary_absent, recipe_dict, write_recipe
from hub_server import READ_ONLY_TOKEN


def card_metadata(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_push_adapter_and_gguf(hub, llama_run, tmp_path, run_cli):
    run = tmp_path / "run"
    shutil.copytree(llama_run, run)
    code, _, err = run_cli("export", run, "--format", "gguf_q8_0", "--eval-samples", "2")
    assert code == 0, err
    code, out, err = run_cli("push", run, "--repo", "someone/tiny-qlora", "--what", "adapter", "--what", "gguf")
    assert code == 0, err
    repo = hub.repos["someone/tiny-qlora"]
    assert repo["private"] is True
    files = repo["files"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert files[name] == (run / "adapter" / name).read_bytes()
    assert files["model-q8_0.gguf"] == (run / "export" / "model-q8_0.gguf").read_bytes()
    assert "model-q8_0.gguf.Modelfile" in files
    card = files["README.md"].decode()
    meta = card_metadata(card)
    assert meta["base_model"] == export_base(run)
    assert meta["library_name"] == "peft" and "qlora" in meta["tags"] and meta["pipeline_tag"] == "text-generation"
    assert "PeftModel.from_pretrained" in card and "ollama create" in card and "Export fidelity" in card
    assert "eval loss before -> after" in card
    assert "| environment | qtune " in card and " cores, no GPU; " in card  # the record of metrics.json, quoted
    # the run's page goes along, and the card links it
    assert files["report.html"] == (run / "report.html").read_bytes() and "[report.html](report.html)" in card
    assert_canary_absent(hub, [run])


def export_base(run):
    return yaml.safe_load((run / "recipe.yaml").read_text())["model"]["name"]


def test_public_only_when_asked(hub, llama_run, run_cli):
    code, _, err = run_cli("push", llama_run, "--repo", "someone/open", "--public")
    assert code == 0, err
    assert hub.repos["someone/open"]["private"] is False


@pytest.mark.parametrize("token, message", [(None, "no Hugging Face token"), (READ_ONLY_TOKEN, "may not write to")])
def test_token_problems_exit_4_and_keep_local_files(hub, llama_run, monkeypatch, run_cli, token, message):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", "/nonexistent/token")
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    before = sorted(p.relative_to(llama_run) for p in llama_run.rglob("*"))
    code, _, err = run_cli("push", llama_run, "--repo", "someone/x")
    assert code == 4 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(llama_run) for p in llama_run.rglob("*")) == before


def test_network_down_exits_4(llama_run, monkeypatch, run_cli):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    code, _, err = run_cli("push", llama_run, "--repo", "someone/x")
    assert code == 4 and "cannot reach the Hub" in err


def test_push_what_needs_the_export(hub, llama_run, run_cli):
    code, _, err = run_cli("push", llama_run, "--repo", "someone/x", "--what", "nf4")
    assert code == 4 and "qtune export" in err


def test_checkpoints_on_the_hub_resume_a_lost_run(hub, tmp_path, pretrained_llama, alpaca_file, run_cli, monkeypatch):
    """Colab: train with checkpoints pushed, lose the machine, resume on a new one from the Hub alone."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    raw = recipe_dict(
        pretrained_llama,
        alpaca_file,
        tmp_path / "full",
        lora={"dropout": 0.1},
        log={"report_to": ["wandb", "tensorboard"]},
        hub={"repo_id": "someone/colab-run", "push_checkpoints": True},
    )
    code, _, err = run_cli("train", write_recipe(tmp_path / "full.yaml", raw))
    assert code == 0, err
    files = hub.repos["someone/colab-run"]["files"]
    assert {
        "checkpoints/checkpoint-3/adapter_model.safetensors",
        "checkpoints/checkpoint-6/optimizer.pt",
        "checkpoints/recipe.yaml",
        "adapter_model.safetensors",
        "README.md",
    } <= set(files)

    # The new machine has nothing but the recipe; the hub holds checkpoint-6 as newest, so roll it back to
    # what it held after step 3 to have steps left to run.
    for path in [p for p in files if p.startswith("checkpoints/checkpoint-6/")]:
        del files[path]
    raw["train"]["output_dir"] = str(tmp_path / "fresh-machine")
    code, _, err = run_cli("train", write_recipe(tmp_path / "fresh.yaml", raw), "--resume")
    assert code == 0, err
    metrics = json.loads((tmp_path / "fresh-machine" / "metrics.json").read_text())
    assert metrics["resumed_from"] == "checkpoint-3" and metrics["global_step"] == 6

    def losses(run):
        state = json.loads((run / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
        return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h and h["step"] > 3]

    assert losses(tmp_path / "fresh-machine") == losses(tmp_path / "full")
    assert_canary_absent(hub, [tmp_path / "full", tmp_path / "fresh-machine", tmp_path / "wandb-home"])
