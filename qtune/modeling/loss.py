"""The causal-LM loss on supervised positions only, in chunks, so the full logits tensor never exists.

The plain recipe runs the lm_head on every position (prompts and padding too) and keeps batch x seq x
vocab logits, their fp32 copy and its gradient: with a 32k vocabulary that is the largest tensor of the
step. Here the decoder's last hidden state is taken with a forward hook (the forward itself still goes
through the trainer's wrapped model, so DDP's gradient hooks fire as usual), the positions whose next
token is supervised are gathered, and a fused linear + cross-entropy runs over them chunk by chunk,
computing d(loss)/d(hidden) on the way (the lm_head is frozen, so that is the only gradient it needs).

Plain heads and heads that soft-cap their logits (Gemma 2: cap * tanh(logits / cap), applied here per chunk);
models that scale their logits, or an lm_head that is trained or wrapped, use the ordinary loss
(`fused_head_weight` returns None for them).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

IGNORE = -100
LOGIT_CHUNK_ELEMENTS = 1 << 23  # 32 MiB of fp32 logits per chunk


def fused_head_weight(model):
    """The lm_head weight when the fused loss computes exactly what the model would, else None."""
    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
        return None
    return head.weight


def head_softcap(model) -> float | None:
    """The cap of the model's final logit soft-capping (Gemma 2), or None."""
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None) or None


def supervised_positions(labels):
    """(row, position) of every position whose next token is a target, and those targets."""
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    rows, positions = (targets != IGNORE).nonzero(as_tuple=True)
    return rows, positions, targets[rows, positions]


class LinearCrossEntropy(torch.autograd.Function):
    """sum over n of CE(hidden[n] @ weight.T, target[n]), and its gradient for `hidden`, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, softcap=None):
        """The summed loss, with the gradient of the hidden states computed chunk by chunk on the way."""
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            logits = (hidden[start:end] @ weight.T).float()
            capped = None
            if softcap:  # as the model computes it: cap * tanh(logits / cap)
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            log_norm = torch.logsumexp(logits, dim=-1)
            picked = targets[start:end]
            loss += (log_norm - logits.gather(1, picked[:, None]).squeeze(1)).sum()
            if grad is not None:
                probabilities = torch.exp_(logits.sub_(log_norm[:, None]))  # softmax, in place
                probabilities[torch.arange(end - start, device=hidden.device), picked] -= 1
                if capped is not None:  # d(cap * tanh(z / cap)) / dz = 1 - tanh^2
                    probabilities.mul_(1 - capped.square_())
                grad[start:end] = probabilities.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        """The saved gradient of the hidden states, scaled by the loss's gradient."""
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None


def supervised_loss_sum(hidden, labels, weight, softcap: float | None = None):
    """(sum of the token losses, number of supervised tokens) for hidden states [rows, seq, h]."""
    rows, positions, targets = supervised_positions(labels)
    # the lm_head stays in the compute dtype (model.prepare_for_kbit_training); the final norm may give fp32
    chosen = hidden[rows, positions].to(weight.dtype)
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // weight.shape[0])
    return LinearCrossEntropy.apply(chosen, weight, targets, chunk, softcap), targets.numel()


@contextmanager
def last_hidden_state(model):
    """Captures the decoder's output (after the final norm) during the forward passes inside the block."""
    captured = {}

    def keep(_module, _args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = model.get_decoder().register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()
