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
    """Talks to the model line by line from `stdin` until /exit or the end of input; /reset clears the history."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty()
    alpaca_input = ""
    if interactive:
        extra = "; /input TEXT gives the next instruction an input" if style == "alpaca" else ""
        print(f"qtune chat: type a message; /reset clears the history{extra}, /exit (or Ctrl-D) quits.", file=stdout)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = history[:1] if system else []
            continue
        if line.startswith("/input"):
            if style != "alpaca":
                print("[/input is for runs trained on alpaca data; type the whole message instead]", file=stdout)
            else:
                alpaca_input = line.removeprefix("/input").strip()
                print(f"[input for the next instruction: {alpaca_input!r}]", file=stdout)
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
