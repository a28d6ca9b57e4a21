"""qtune chat / generate: the prompt as trained, stopping at the end-of-turn token."""

import json
import subprocess
import sys

import pytest
from helpers import recipe_dict, write_recipe

from qtune.demo.tiny_models import demo_rows


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, pretrained_llama):
    """Trained long enough (400 short steps) on one-turn chats that it ends its replies itself."""
    from qtune.cli import main

    folder = tmp_path_factory.mktemp("chat")
    data = folder / "chats.jsonl"
    with data.open("w") as f:
        for row in demo_rows(300, seed=1):
            turns = [
                {"role": "user", "content": f"{row['instruction']} {row['input']}"},
                {"role": "assistant", "content": row["output"]},
            ]
            f.write(json.dumps({"messages": turns}) + "\n")
    raw = recipe_dict(
        pretrained_llama,
        data,
        folder / "run",
        fmt="messages",
        train={"max_steps": 400, "lr": 3e-3, "eval_steps": 400, "save_steps": 400, "logging_steps": 50},
    )
    assert main(["train", str(write_recipe(folder / "r.yaml", raw))]) == 0
    return folder / "run"


def test_generate_stops_at_end_of_turn(chat_run):
    from qtune.modeling.generation import generate, stop_token_ids
    from qtune.publish.chat import build_prompt, load_for_generation

    model, tokenizer, style = load_for_generation(chat_run)
    assert style == "chat"
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in stop_token_ids(model, tokenizer)
    prompt = build_prompt(tokenizer, style, [{"role": "user", "content": "Reverse the word. stone"}])
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    reply = generate(model, tokenizer, prompt, max_new_tokens=24)
    assert reply.finish_reason == "stop" and reply.new_tokens < 24
    assert "<|im_end|>" not in reply.text and reply.text


def test_chat_through_stdin(chat_run):
    session = "Reverse the word. stone\nAdd the two numbers. 3 + 4\n/reset\nHow many words are there? red blue\n/exit\n"
    result = subprocess.run(
        [sys.executable, "-m", "qtune", "chat", str(chat_run), "--max-new-tokens", "24"],
        input=session,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.splitlines() if line.startswith("model> ")]
    assert len(replies) == 3
    assert "[stopped at max_new_tokens" not in result.stdout  # every reply ended at <|im_end|>


def test_generate_cli_on_an_export(chat_run, tmp_path, run_cli):
    code, _, err = run_cli("export", chat_run, "--format", "merged_fp16", "--out", tmp_path, "--eval-samples", "2")
    assert code == 0, err
    code, out, err = run_cli(
        "generate",
        chat_run,
        "--artifact",
        tmp_path / "merged-fp16",
        "--prompt",
        "Reverse the word. stone",
        "--max-new-tokens",
        "24",
    )
    assert code == 0, err
    code2, out_adapter, _ = run_cli(
        "generate", chat_run, "--prompt", "Reverse the word. stone", "--max-new-tokens", "24"
    )
    assert out.strip() and out == out_adapter  # the merged export answers as the adapter does (greedy)


def test_missing_artifact(chat_run, run_cli):
    code, _, err = run_cli("generate", chat_run, "--artifact", "/nope", "--prompt", "x")
    assert code == 4 and "artifact not found" in err


def test_chat_commands_work_piped_and_an_unknown_one_lists_them(monkeypatch):
    """Before: piped into `qtune chat`, /quit, /help and /foo were sent to the model as messages."""
    import io
    from types import SimpleNamespace

    from qtune.publish import chat

    sent = []

    def fake_generate(model, tokenizer, prompt, **_):
        sent.append(prompt)
        return SimpleNamespace(text=f"reply {len(sent)}", finish_reason="stop")

    monkeypatch.setattr(chat, "generate", fake_generate)
    tokenizer = lambda text: SimpleNamespace(input_ids=text)  # noqa: E731 (the raw style passes the text through)
    out = io.StringIO()
    session = "/help\n/foo bar\n//etc is a folder\nhello\n/reset\n/quit\nnever sent\n"
    chat.chat_loop(None, tokenizer, "raw", stdin=io.StringIO(session), stdout=out)
    lines = out.getvalue().splitlines()
    assert sent == ["/etc is a folder", "hello"]
    assert lines[0].startswith("[commands: /help ") and "/quit" in lines[0] and "/input" not in lines[0]
    assert lines[1].startswith("[unknown command /foo; commands: /help ")
    assert lines[2:] == ["model> reply 1", "model> reply 2", "[conversation cleared]"]
    out = io.StringIO()
    chat.chat_loop(None, tokenizer, "alpaca", stdin=io.StringIO("/help\n/exit\n"), stdout=out)
    assert "/input TEXT" in out.getvalue()


def test_chat_help_names_every_command():
    from qtune.publish.chat import CHAT_COMMANDS

    done = subprocess.run([sys.executable, "-m", "qtune", "chat", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert all(name in done.stdout for name in CHAT_COMMANDS) and "/quit" in done.stdout
