"""How prompts and conversations are written as text: Stanford's alpaca prompt and chat templates. Training, `qtune
generate` / `qtune chat`, the demo's tasks and the Ollama Modelfile all build their prompts here, so they match."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qtune.config.recipe import DataSection

# Stanford Alpaca's prompt, as axolotl and the alpaca-lora scripts use it.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_OPENING = ALPACA_NO_INPUT.split(".")[0]


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The prompt of one alpaca row: with its '### Input:' section when `input_text` has any text."""
    if input_text.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def prompt_style(prompt) -> str:
    """How a prompt is written: "chat" (turns), "alpaca" (the alpaca prompt) or "raw" text."""
    if isinstance(prompt, list):
        return "chat"
    return "alpaca" if prompt.startswith(ALPACA_OPENING) else "raw"


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def resolve_chat_template(data: DataSection, tokenizer) -> str | None:
    """The chat template a run uses: data.chat_template ("chatml" or a Jinja string), else the tokenizer's own."""
    if data.chat_template == "chatml":
        return CHATML
    return data.chat_template or getattr(tokenizer, "chat_template", None)


def renderer(data: DataSection, tokenizer) -> tuple[str | None, Callable]:
    """(the chat template, render(messages, add_generation_prompt) -> the text it makes of them)."""
    template = resolve_chat_template(data, tokenizer)

    def render(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
        )

    return template, render
