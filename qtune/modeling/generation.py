"""Generating with a loaded model: greedy or sampled, stopping at EOS or the chat template's end-of-turn token. The
run's page (answers before and after), `qtune generate` and `qtune chat` use it."""

from __future__ import annotations

from dataclasses import dataclass

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class Reply:
    """One generated answer and why it ended."""

    text: str
    finish_reason: str  # "stop": an EOS / end-of-turn token; "length": max_new_tokens reached
    new_tokens: int


def stop_token_ids(model, tokenizer) -> list[int]:
    """The token ids that end an answer: EOS, the generation config's, and the end-of-turn tokens the vocabulary has."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and t != tokenizer.pad_token)
    return sorted(i for i in ids if i is not None)


def generate(model, tokenizer, prompt_ids: list[int], *, max_new_tokens: int = 128, temperature: float = 0.0) -> Reply:
    """One answer to one tokenized prompt (greedy when temperature is 0)."""
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
    if getattr(model.config.get_text_config(), "output_router_logits", False):
        # a mixture of experts whose config asks for the load-balancing loss: transformers would compute it on every
        # generated token against the whole left-padded mask, and fail on the size mismatch (tests/test_moe.py)
        sampling["output_router_logits"] = False
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
