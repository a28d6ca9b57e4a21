"""Try the model: one-shot generation (`qtune generate`) and an interactive chat (`qtune chat`), on the adapter or on
any export.

The prompt is built the way the run trained: the chat template for messages/sharegpt data, Stanford's alpaca prompt
for alpaca data, the raw prompt otherwise. Generation stops at EOS or the template's end-of-turn token
(qtune.modeling.generation).
"""

from __future__ import annotations

import sys
from pathlib import Path

from qtune.config.runs import open_run
from qtune.core.errors import EnvironmentProblem
from qtune.data.templates import alpaca_prompt
from qtune.modeling.generation import generate


def prompt_style(recipe, data_report: dict | None = None) -> str:
    """How prompts were written in training: chat (a template), alpaca, or raw text. Preference data says in its
    report (metrics.json), since its prompts are text or conversations row by row."""
    if data_report and data_report.get("prompt_style"):
        return data_report["prompt_style"]
    formats = {d.format for d in recipe.data.datasets}
    if formats & {"messages", "sharegpt"}:
        return "chat"
    if formats == {"alpaca"}:
        return "alpaca"
    return "raw"


def load_for_generation(run_dir: str | Path, artifact: str | None = None):
    """(model, tokenizer, style). Default: the adapter on the 4-bit base, as trained; `artifact`: an export of the
    run, loaded by its format's loader as `qtune eval` loads it."""
    import torch
    from transformers import AutoTokenizer

    from qtune.evaluation.fidelity import artifact_config, load_artifact
    from qtune.export.formats import format_of_artifact
    from qtune.modeling.load import load_adapter_model
    from qtune.modeling.precision import resolve_compute_dtype

    trained = open_run(run_dir)
    style = prompt_style(trained.recipe, trained.metrics().get("data"))
    if artifact is None:
        model = load_adapter_model(trained, resolve_compute_dtype(trained.recipe.quant.compute_dtype))
        tokenizer = AutoTokenizer.from_pretrained(trained.adapter_dir)
    else:
        path = Path(artifact)
        if not path.exists():
            raise EnvironmentProblem(f"artifact not found: {artifact}", fix="give an export folder or .gguf file")
        fmt = format_of_artifact(path).name
        model = load_artifact(fmt, path, config=artifact_config(trained), on_gpu=torch.cuda.is_available())
        if path.suffix == ".gguf":
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer, style


def build_prompt(tokenizer, style: str, messages: list[dict], *, alpaca_input: str = "") -> list[int]:
    """The prompt as the run trained on it. Alpaca runs take the last message as the instruction and
    `alpaca_input` as its '### Input:' section, the template the data stage used for rows with an input."""
    if style == "chat":
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    last = messages[-1]["content"]
    return tokenizer(alpaca_prompt(last, alpaca_input) if style == "alpaca" else last).input_ids


# The chat's commands, as /help lists them. A line starting with "/" is always a command, on a terminal or piped;
# "//text" sends "/text" to the model.
CHAT_COMMANDS = {
    "/help": "list these commands",
    "/reset": "clear the conversation",
    "/input TEXT": "give the next instruction an input (alpaca runs)",
    "/exit": "quit (also /quit, or Ctrl-D)",
}


def chat_help(style: str) -> str:
    """The commands in one line, /input only where the run can use it."""
    shown = {name: what for name, what in CHAT_COMMANDS.items() if style == "alpaca" or not name.startswith("/input")}
    return "commands: " + "; ".join(f"{name} {what}" for name, what in shown.items()) + '; "//text" sends "/text"'


def chat_loop(
    model,
    tokenizer,
    style: str,
    *,
    stdin=None,
    stdout=None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    system: str | None = None,
) -> None:
    """Talks to the model line by line from `stdin` until /exit, /quit or the end of input. Lines starting with "/"
    are commands (CHAT_COMMANDS), on a terminal and piped alike; an unknown one is answered with the list."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty()
    alpaca_input = ""
    if interactive:
        print(f"qtune chat: type a message. {chat_help(style)}", file=stdout)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if line.startswith("//"):
            line = line[1:]
        elif command in ("/exit", "/quit"):
            break
        elif command == "/reset":
            history = history[:1] if system else []
            print("[conversation cleared]", file=stdout)
            continue
        elif command == "/help":
            print(f"[{chat_help(style)}]", file=stdout)
            continue
        elif command == "/input":
            if style != "alpaca":
                print("[/input is for runs trained on alpaca data; type the whole message instead]", file=stdout)
            else:
                alpaca_input = argument.strip()
                print(f"[input for the next instruction: {alpaca_input!r}]", file=stdout)
            continue
        elif command.startswith("/"):
            print(f"[unknown command {command}; {chat_help(style)}]", file=stdout)
            continue
        history.append({"role": "user", "content": line})
        prompt = build_prompt(tokenizer, style, history, alpaca_input=alpaca_input)
        alpaca_input = ""  # one input per instruction, as in the training rows
        reply = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature)
        history.append({"role": "assistant", "content": reply.text})
        print(f"model> {reply.text}", file=stdout)
        if reply.finish_reason == "length":
            print(f"[stopped at max_new_tokens={max_new_tokens}]", file=stdout)
        stdout.flush()
