"""RMSNorm and the SwiGLU product with the backward pass written out, so they keep less for it.

What autograd keeps per token and layer decides how long a row fits on a small GPU (qtune/plan.py counts it):

- transformers' RMSNorm computes in fp32, and autograd keeps that fp32 copy of the input (4 bytes per value)
  for `pow` and the multiply. Here the input itself (2 bytes in bf16/fp16) and one fp32 number per token are kept;
  the backward pass redoes the cheap part.
- the MLP's `act_fn(gate) * up` keeps gate, SiLU(gate) and up. Here gate and up are kept and SiLU is redone in
  the backward pass, which also writes the two input gradients over gate and up (nothing else reads them), so
  the backward adds no intermediate-sized buffers of its own.

For Llama-3.1-8B at 40k tokens that is 2.3 GiB less on the GPU. The forward pass is the same arithmetic, in the
same order, as transformers'; the gradients agree to fp32 rounding (tests/test_long_context.py). Only for the
module classes whose forward is known to be exactly this (LEAN_NORMS, LEAN_MLPS); others keep their own.
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
    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x.float() * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
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
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
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
    """Switch the RMSNorms and MLPs of known classes to the lean functions; returns how many modules changed."""
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
