"""Try the model: one-shot generation and an interactive chat, on the adapter or on any export.

The prompt is built the way the run trained: the chat template for messages/sharegpt data, Stanford's
alpaca prompt for alpaca data, the raw prompt otherwise. Generation stops at EOS or the template's
end-of-turn token.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from qtune.errors import EnvironmentProblem
from qtune.run_dir import open_run

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop": an EOS / end-of-turn token; "length": max_new_tokens reached
    new_tokens: int


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
    """(model, tokenizer, style). Default: the adapter on the 4-bit base, as trained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.model import keep_cpu_4bit_layout_trainable, load_adapter_model, resolve_compute_dtype

    trained = open_run(run_dir)
    style = prompt_style(trained.recipe, trained.metrics().get("data"))
    if artifact is None:
        model = load_adapter_model(trained, resolve_compute_dtype(trained.recipe.quant.compute_dtype))
        tokenizer = AutoTokenizer.from_pretrained(trained.adapter_dir)
    else:
        path = Path(artifact)
        if not path.exists():
            raise EnvironmentProblem(f"artifact not found: {artifact}", fix="give an export folder or .gguf file")
        dtype = torch.float32 if not torch.cuda.is_available() else torch.float16
        if path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
        keep_cpu_4bit_layout_trainable(model)
    return model.eval(), tokenizer, style


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and t != tokenizer.pad_token)
    return sorted(i for i in ids if i is not None)


def build_prompt(tokenizer, style: str, messages: list[dict], *, alpaca_input: str = "") -> list[int]:
    """The prompt as the run trained on it. Alpaca runs take the last message as the instruction and
    `alpaca_input` as its '### Input:' section, the template the data stage used for rows with an input."""
    from qtune.data import alpaca_prompt

    if style == "chat":
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    last = messages[-1]["content"]
    return tokenizer(alpaca_prompt(last, alpaca_input) if style == "alpaca" else last).input_ids


def generate(model, tokenizer, prompt_ids: list[int], *, max_new_tokens: int = 128, temperature: float = 0.0) -> Reply:
    return generate_batch(model, tokenizer, [prompt_ids], max_new_tokens=max_new_tokens, temperature=temperature)[0]


def generate_batch(
    model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 128, temperature: float = 0.0
) -> list[Reply]:
    """Several prompts in one generate call, left-padded (the report page's answers before and after)."""
    import torch

    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width = max(map(len, prompts))
    device = next(model.parameters()).device
    inputs = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            input_ids=inputs,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=stops,
            pad_token_id=pad,
            **sampling,
        )
    replies = []
    for new in output[:, width:].tolist():
        # a row that stopped early is padded to the longest: it ends at its first stop token
        end = next((i for i, token in enumerate(new) if token in stops), None)
        finished = end is not None
        text = tokenizer.decode(new[:end] if finished else new, skip_special_tokens=True)
        replies.append(
            Reply(
                text=text.strip(),
                finish_reason="stop" if finished else "length",
                new_tokens=end + 1 if finished else len(new),
            )
        )
    return replies


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
