"""RMSNorm, the SwiGLU product and LoRA dropout with the backward pass written out, so they keep less for it.

What autograd keeps per token and layer decides how long a row fits on a small GPU (qtune/planning/plan.py counts it):

- transformers' RMSNorm computes in fp32, and autograd keeps that fp32 copy of the input (4 bytes per value)
  for `pow` and the multiply. Here the input itself (2 bytes in bf16/fp16) and one fp32 number per token are kept;
  the backward pass redoes the cheap part.
- the MLP's `act_fn(gate) * up` keeps gate, SiLU(gate) and up. Here gate and up are kept and SiLU is redone in
  the backward pass, which also writes the two input gradients over gate and up (nothing else reads them), so
  the backward adds no intermediate-sized buffers of its own.

The forward pass is the same arithmetic, in the same order, as transformers'; the gradients agree to fp32 rounding
(tests/test_long_context.py). Only for the module classes whose forward is known to be exactly this (LEAN_NORMS,
LEAN_MLPS); others keep their own. What it saves is in bench/README.md ("Long context").
"""

from __future__ import annotations

import types

import torch

# RMSNorm classes computing weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)
LEAN_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
# gated MLPs computing down_proj(act_fn(gate_proj(x)) * up_proj(x)) with act_fn SiLU
LEAN_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
SILU = ("SiLU", "SiLUActivation")  # torch's, and transformers' (plain F.silu, or a hub kernel for the same)
LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # the plan counts the lean ops for these
BACKWARD_CHUNK_ELEMENTS = 1 << 24  # temporaries of the SwiGLU backward pass: 32 MiB of bf16 at a time


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm keeping its input and one fp32 number per token for the backward pass."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        """weight * normalized x, as transformers' RMSNorm computes it."""
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x.float() * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        """The gradients of x and the weight, the normalization redone from x."""
        x, weight, rstd = ctx.saved_tensors
        x32 = x.float()
        grad_normed = (grad_out * weight).float()
        # d/dx of x * rstd(x), rstd = (mean(x^2) + eps)^-1/2
        grad_x = grad_normed * rstd - x32 * (rstd.pow(3) * (grad_normed * x32).mean(-1, keepdim=True))
        grad_weight = None
        if ctx.needs_input_grad[1]:
            normed = (x32 * rstd).to(x.dtype)
            grad_weight = (grad_out * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_weight, None


class SwiGLUFunction(torch.autograd.Function):
    """SiLU(gate) * up, keeping gate and up only; the backward writes d(gate) and d(up) over them."""

    @staticmethod
    def forward(ctx, gate, up):
        """SiLU(gate) * up, keeping gate and up."""
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        """The gradients of gate and up, written over them in chunks."""
        gate, up = (t.contiguous() for t in ctx.saved_tensors)  # no copy unless a caller passed strided inputs
        width = gate.shape[-1]
        flat_gate, flat_up, flat_grad = gate.view(-1, width), up.view(-1, width), grad_out.reshape(-1, width)
        rows = max(1, BACKWARD_CHUNK_ELEMENTS // width)
        for start in range(0, flat_gate.shape[0], rows):
            g, u, d = flat_gate[start : start + rows], flat_up[start : start + rows], flat_grad[start : start + rows]
            grad_silu = d * u  # the same products, in the same dtype, as autograd's mul backward
            u.copy_(d * torch.nn.functional.silu(g))
            g.copy_(torch.ops.aten.silu_backward(grad_silu, g))
        return gate, up


def _lean_norm_forward(self, hidden_states):
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _lean_mlp_forward(self, x):
    return self.down_proj(SwiGLUFunction.apply(self.gate_proj(x), self.up_proj(x)))


def use_lean_ops(model) -> int:
    """Switches the RMSNorms and MLPs of known classes to the lean functions; returns how many modules changed."""
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if name in LEAN_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_lean_norm_forward, module)
            changed += 1
        elif name in LEAN_MLPS and type(getattr(module, "act_fn", None)).__name__ in SILU:
            module.forward = types.MethodType(_lean_mlp_forward, module)
            changed += 1
    return changed


# --------------------------------------------------------------------------- LoRA dropout without the copies


def lean_lora_dropout(model) -> int:
    """Fuses each LoRA dropout into its lora_A projection, keeping a 1-byte mask instead of the dropped-out input;
    returns the number of layers changed.

    peft computes lora_A(dropout(x)) per target layer: every layer keeps its own 4-byte dropped-out copy of x (for
    lora_A's weight gradient) and its mask, and q, k and v (and gate and up) take the same x. Here autograd keeps x,
    which it keeps anyway, and a bool mask. The mask is kept rather than redrawn in the backward pass from the RNG
    state: on CPU a Bernoulli draw costs as much as the projection. The draw is ATen's own dropout draw, so the
    masks, the loss and the gradients equal peft's (tests/test_speed.py).
    """
    changed = 0
    for module in model.modules():
        lora_a, dropouts = getattr(module, "lora_A", None), getattr(module, "lora_dropout", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            linear = lora_a[name] if name in lora_a else None
            if (
                type(dropout) is not torch.nn.Dropout
                or dropout.p == 0
                or type(linear) is not torch.nn.Linear
                or linear.bias is not None
                or name in getattr(module, "lora_variant", {})
            ):
                continue  # DoRA and other variants apply the dropout themselves
            dropouts[name] = torch.nn.Identity()
            linear.qtune_dropout = dropout.p
            linear.forward = types.MethodType(_dropout_then_linear, linear)
            changed += 1
    return changed


class DropoutLinear(torch.autograd.Function):
    """dropout(x) @ W.T keeping x and a 1-byte mask for the backward pass, instead of the dropped-out copy of x.

    Under autocast the matmul runs in the autocast dtype (bf16/fp16) with the fp32 LoRA weight cast to it, and the
    backward pass, which autocast does not reach, does the same casts itself: the gradients autograd would give.
    """

    @staticmethod
    def forward(ctx, x, weight, p):
        # the ops of ATen's CPU dropout, in its order: the same draw as nn.Dropout
        """dropout(x) @ W.T, keeping x and the 1-byte mask."""
        scale = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
        ctx.p = p
        ctx.save_for_backward(x, weight, scale != 0)
        out = torch.nn.functional.linear(x * scale, weight)
        ctx.compute_dtype = out.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        """The gradients of x and W, with the casts autocast would have done."""
        x, weight, kept = ctx.saved_tensors
        scale = kept.to(x.dtype).div_(1 - ctx.p)
        grad_out = grad_out.to(ctx.compute_dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight.to(ctx.compute_dtype)).to(x.dtype) * scale
        if ctx.needs_input_grad[1]:
            dropped = (x * scale).to(ctx.compute_dtype)
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ dropped.reshape(-1, x.shape[-1])
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None


def _dropout_then_linear(self, x):
    if self.training and torch.is_grad_enabled():
        return DropoutLinear.apply(x, self.weight, self.qtune_dropout)
    return torch.nn.functional.linear(torch.nn.functional.dropout(x, self.qtune_dropout, self.training), self.weight)


def lora_inputs_stay_in_compute_dtype(model) -> int:
    """Stops peft casting each LoRA layer's input to the LoRA weights' dtype (fp32) under mixed precision; returns
    the layers changed.

    Autocast casts it back to bf16/fp16 for the matmul, so each of q, k, v (and gate, up) keeps its own copy of the
    normed input for the backward pass, where one shared bf16 tensor would do. The matmul sees the same values
    either way. Only while training under autocast: an adapter loaded to chat keeps peft's default.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "cast_input_dtype_enabled", None) is True:
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed
