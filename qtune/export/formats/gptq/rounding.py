"""The GPTQ rounding of one linear layer's weight (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", Algorithm 1 with lazy batch updates), in compressed-tensors' integer grid
(its qparams and its rounding, so that the file holds exactly the numbers computed here)."""

from __future__ import annotations

from copy import copy

import torch


def accumulate_hessian(hessian: torch.Tensor, count: int, inputs: torch.Tensor) -> int:
    """Adds a batch of a layer's inputs (..., in_features) to the running mean of 2 X^T X in `hessian` (fp32, in
    place); returns the new number of rows seen."""
    rows = inputs.reshape(-1, inputs.shape[-1]).to(hessian.dtype)
    total = count + rows.shape[0]
    hessian.mul_(count / total)
    hessian.addmm_(rows.t(), rows, alpha=2.0 / total)
    return total


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """The upper Cholesky factor of the dampened Hessian's inverse, which GPTQ's updates read row by row. Dampening
    adds `dampening` x the mean diagonal to the diagonal, so that a Hessian from few samples stays invertible."""
    damped = hessian.clone()
    diagonal = torch.arange(damped.shape[0], device=damped.device)
    damped[diagonal, diagonal] += dampening * torch.mean(torch.diag(damped))
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
    return torch.linalg.cholesky(inverse, upper=True)


def group_qparams(columns: torch.Tensor, args, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) per row of `columns` (rows x group), rounded to the dtype the file stores scales in so that
    the rounding here uses the scales the file will hold."""
    from compressed_tensors.quantization.utils import calculate_qparams

    scale, zero_point = calculate_qparams(columns.amin(dim=1), columns.amax(dim=1), args)
    return scale.to(scale_dtype).to(columns.dtype), zero_point


def gptq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args,
    *,
    desc_act: bool,
    dampening: float,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Rounds `weight` (out x in) to the integer grid of compressed-tensors QuantizationArgs `args` (group or channel
    strategy) with the inputs' Hessian (in x in); returns (the rounded weight as floats, scales (out x groups), zero
    points (out x groups), the Hessian-weighted squared error).

    Each column is rounded in turn and its error, scaled by the inverse Hessian, is subtracted from the columns not yet
    rounded. A group's scale is taken from its columns when its first column is reached (after the earlier groups'
    error has moved into them). With `desc_act` the columns are rounded in order of decreasing Hessian diagonal (the
    inputs with the most energy first); the groups then stay the contiguous ones the file and the kernels expect
    (compressed-tensors' actorder "weight"), so their scales are fixed from the weight before rounding."""
    from compressed_tensors.quantization import fake_quantize

    rows, columns = weight.shape
    work = weight.detach().to(torch.float32).clone()
    hessian = hessian.to(torch.float32).clone()
    group = columns if args.group_size in (None, -1) else args.group_size
    groups = columns // group
    dead = torch.diag(hessian) == 0  # an input that was always zero: its weights do nothing, round them to zero
    hessian[dead, dead] = 1
    work[:, dead] = 0
    group_of_column = torch.arange(columns, device=work.device) // group
    scales = torch.empty(rows, groups, dtype=torch.float32, device=work.device)
    zero_points = None
    if desc_act:
        for g in range(groups):
            scale, zero = group_qparams(work[:, g * group : (g + 1) * group], args, scale_dtype)
            scales[:, g] = scale.reshape(-1)
            zero_points = zero_points if zero_points is not None else zero.new_zeros(rows, groups)
            zero_points[:, g] = zero.reshape(-1)
        order = torch.argsort(torch.diag(hessian), descending=True)
        work, hessian, group_of_column = work[:, order], hessian[order][:, order], group_of_column[order]
    inverse = inverse_hessian_factor(hessian, dampening)
    per_column = copy(args)  # one column at a time: one scale per row
    per_column.strategy = "channel"
    per_column.group_size = None
    block = group if not desc_act and group <= 128 else 128  # a group starts a block: its qparams see every update
    error_total = torch.zeros((), dtype=torch.float64)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        chunk = work[:, start:end].clone()
        errors = torch.zeros_like(chunk)
        chunk_inverse = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            g = int(group_of_column[column])
            if not desc_act and column % group == 0:  # a block's first column: work holds every earlier update
                scale, zero = group_qparams(work[:, column : column + group], args, scale_dtype)
                scales[:, g] = scale.reshape(-1)
                zero_points = zero_points if zero_points is not None else zero.new_zeros(rows, groups)
                zero_points[:, g] = zero.reshape(-1)
            w = chunk[:, i]
            q = fake_quantize(w, scales[:, g], zero_points[:, g], per_column)
            d = chunk_inverse[i, i]
            error = (w - q) / d
            error_total += torch.sum((w - q) ** 2 / d**2).double() / 2
            chunk[:, i:] -= error.unsqueeze(1) @ chunk_inverse[i, i:].unsqueeze(0)
            chunk[:, i] = q
            errors[:, i] = error
        work[:, start:end] = chunk
        work[:, end:] -= errors @ inverse[start:end, end:]
    if desc_act:
        work = work[:, torch.argsort(order)]
    return work, scales, zero_points, float(error_total)
