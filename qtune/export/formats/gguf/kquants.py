"""GGUF k-quant blocks (Q4_K, Q5_K, Q6_K) written in-process, vectorized with torch and numpy.

The gguf package (0.19) reads k-quants but cannot write them, and llama.cpp's quantizer needs a build. These follow
llama.cpp's reference quantizers (`quantize_row_q{4,5,6}_K_ref` in ggml-quants.c, the path llama-quantize takes
without an importance matrix): the same search over scales, the same 6-bit scale packing and the same byte layout,
so llama.cpp and gguf's own dequantizer read the blocks back. They are evaluated for every sub-block of a tensor at
once instead of one sub-block at a time; float32 sums in a different order can pick a different candidate on a near
tie, so a block may differ from llama.cpp's in a last rounding, never in format (tests/test_llama_cpp.py compares
blocks, files and reconstruction error with llama.cpp's own quantizer).

Block layouts (ggml-common.h), 256 weights per super-block:
  Q4_K: d f16, dmin f16, scales[12] (8 six-bit scales and mins), qs[128]                          = 144 bytes
  Q5_K: d f16, dmin f16, scales[12], qh[32] (fifth bits), qs[128]                                = 176 bytes
  Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d f16                      = 210 bytes
"""

from __future__ import annotations

import numpy as np

SUPER_BLOCK = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
GROUP_MAX_EPS = 1e-15
# Super-blocks quantized together: numpy's per-call cost spread over many rows, the chunk (4 MiB of float32) still
# in cache for the ~20 passes torch makes over it (bench/README.md, "GGUF k-quants")
SUPER_BLOCKS_PER_CHUNK = 4096


def quantize_k(data: np.ndarray, kind: str) -> np.ndarray:
    """`data` (..., n) with n a multiple of 256 -> uint8 (..., n / 256 * block bytes), as gguf.quants.quantize."""
    import torch

    data = np.asarray(data, dtype=np.float32)
    if data.shape[-1] % SUPER_BLOCK:
        raise ValueError(f"{kind} needs rows that are a multiple of {SUPER_BLOCK} values, got {data.shape[-1]}")
    blocks = torch.from_numpy(np.ascontiguousarray(data.reshape(-1, SUPER_BLOCK)))
    encode = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}[kind]
    out = np.empty((blocks.shape[0], BLOCK_BYTES[kind]), dtype=np.uint8)
    with torch.no_grad():
        for start in range(0, blocks.shape[0], SUPER_BLOCKS_PER_CHUNK):
            out[start : start + SUPER_BLOCKS_PER_CHUNK] = encode(blocks[start : start + SUPER_BLOCKS_PER_CHUNK])
    return out.reshape(*data.shape[:-1], data.shape[-1] // SUPER_BLOCK * BLOCK_BYTES[kind])


def _f16_bytes(values) -> np.ndarray:
    return values.numpy().astype(np.float16).reshape(-1, 1).view(np.uint8)


# --------------------------------------------------------------------------- scale search


def _scale_and_min(x, weights, nmax: int, rmin: float, rdelta: float, nstep: int):
    """llama.cpp's make_qkx2_quants for each row of x: the scale and (negated) minimum of an asymmetric nmax-level
    grid that minimise the weighted squared error, trying nstep+1 stretched grids, each refit by least squares.
    Returns (levels, scale, -minimum).

    The passes over the data run in torch (threaded); the per-row arithmetic, a few hundred small operations per
    chunk, runs in numpy on views of the same memory, where a small operation costs less. A try's levels are not
    kept but recomputed once from the winning grid."""
    import torch

    rows = x.shape[0]
    low = x.amin(-1).clamp_(max=0).numpy()
    high = x.amax(-1).numpy()
    flat = high == low
    span = np.where(flat, np.float32(1), high - low)
    weighted_x = weights * x
    totals = torch.stack([weights.sum(-1), weighted_x.sum(-1), (weighted_x * x).sum(-1)]).numpy()
    sum_w, sum_x, sum_x2 = totals
    products = torch.empty((3, rows, x.shape[1]))
    levels = torch.empty_like(x)
    iscale_t = torch.empty(rows)

    def sums(iscale: np.ndarray, origin: np.ndarray) -> np.ndarray:
        iscale_t.copy_(torch.from_numpy(iscale))
        torch.sub(x, torch.from_numpy(origin)[:, None], out=levels)
        levels.mul_(iscale_t[:, None]).round_().clamp_(0, nmax)
        torch.mul(weights, levels, out=products[0])
        torch.mul(products[0], levels, out=products[1])
        torch.mul(weighted_x, levels, out=products[2])
        return products.sum(-1).numpy()

    residual = torch.empty_like(x)
    scale_t, minimum_t = torch.empty(rows), torch.empty(rows)

    def error(scale: np.ndarray, minimum: np.ndarray) -> np.ndarray:
        """sum w (scale*l + min - x)^2 over the grid in `levels`, summed term by term as the reference does: the
        same sum expanded into the fit's sums cancels large terms, and with an outlier in the sub-block (a weight
        40x the others) picked a worse grid than llama.cpp's."""
        scale_t.copy_(torch.from_numpy(scale.astype(np.float32)))
        minimum_t.copy_(torch.from_numpy(minimum.astype(np.float32)))
        torch.mul(levels, scale_t[:, None], out=residual)
        residual.add_(minimum_t[:, None]).sub_(x).square_().mul_(weights)
        return residual.sum(-1).numpy()

    best_iscale = (np.float32(nmax) / span).astype(np.float32)
    best_origin = low.copy()
    scale = (np.float32(1) / best_iscale).astype(np.float32)
    sums(best_iscale, low)
    best = error(scale, low)
    for step in range(nstep + 1):
        # the minimum found so far moves the grid of the next try, as in the reference
        iscale = (np.float32(rmin + rdelta * step + nmax) / np.where(flat, np.float32(1), high - low)).astype(
            np.float32
        )
        sum_l, sum_l2, sum_xl = sums(iscale, low)
        det = sum_w * sum_l2 - sum_l * sum_l
        fits = det > 0
        safe = np.where(fits, det, np.float32(1))
        trial_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        trial_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = trial_min > 0
        if positive.any():
            trial_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, np.float32(1)), trial_scale)
            trial_min = np.where(positive, np.float32(0), trial_min)
        trial_error = error(trial_scale, trial_min)
        better = fits & (trial_error < best) & ~flat
        best = np.where(better, trial_error, best)
        best_iscale = np.where(better, iscale, best_iscale)
        best_origin = np.where(better, low, best_origin)
        scale = np.where(better, trial_scale, scale).astype(np.float32)
        low = np.where(better, trial_min, low).astype(np.float32)
    sums(best_iscale.astype(np.float32), best_origin.astype(np.float32))  # leaves the winning grid in `levels`
    levels.masked_fill_(torch.from_numpy(flat)[:, None], 0)
    return (
        levels,
        torch.from_numpy(np.where(flat, np.float32(0), scale)),
        torch.from_numpy(np.float32(0) - low),
    )  # +0, never -0, as the reference stores it


def _symmetric_scale(x, nmax: int):
    """llama.cpp's make_qx_quants(rmse_type=1) for each row of x: a symmetric grid -nmax..nmax-1 whose scale
    minimises the x^2-weighted squared error over 19 grids around the one that maps the largest |x| to -nmax.
    Returns (levels + nmax, scale). Torch for the passes, numpy for the rows, as in _scale_and_min."""
    import torch

    rows = x.shape[0]
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))[:, 0].numpy()
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, np.float32(1), peak)
    cubed = x * x * x  # the weight x^2 times x
    levels = torch.empty_like(x)
    products = torch.empty((2, rows, x.shape[1]))
    iscale_t = torch.empty(rows)

    def sums(iscale: np.ndarray) -> np.ndarray:
        iscale_t.copy_(torch.from_numpy(iscale))
        torch.mul(x, iscale_t[:, None], out=levels)
        levels.round_().clamp_(-nmax, nmax - 1)
        torch.mul(cubed, levels, out=products[0])
        torch.mul(x, levels, out=products[1]).square_()
        return products.sum(-1).numpy()

    best_iscale = (np.float32(-nmax) / peak).astype(np.float32)
    sum_lx, sum_l2 = sums(best_iscale)
    scale = np.where(sum_l2 > 0, sum_lx / np.where(sum_l2 > 0, sum_l2, np.float32(1)), np.float32(0))
    best = scale * sum_lx
    for step in (*range(-9, 0), *range(1, 10)):
        iscale = (np.float32(-(nmax + 0.1 * step)) / peak).astype(np.float32)
        trial_lx, trial_l2 = sums(iscale)
        better = (trial_l2 > 0) & (trial_lx * trial_lx > best * trial_l2)
        scale = np.where(better, trial_lx / np.where(trial_l2 > 0, trial_l2, np.float32(1)), scale)
        best = np.where(better, scale * trial_lx, best)
        best_iscale = np.where(better, iscale, best_iscale)
    sums(best_iscale.astype(np.float32))  # leaves the winning grid in `levels`
    levels.masked_fill_(torch.from_numpy(zero)[:, None], -nmax)
    return levels + nmax, torch.from_numpy(np.where(zero, np.float32(0), scale).astype(np.float32))


# --------------------------------------------------------------------------- Q4_K / Q5_K


def _asymmetric_blocks(blocks, nmax: int, rmin: float, nstep: int):
    """What Q4_K and Q5_K share: 8 sub-blocks of 32 with a 6-bit scale and min each, under an f16 super-scale."""
    import torch

    count = blocks.shape[0]
    x = blocks.reshape(count * 8, 32)
    average = (x.square().sum(-1) / 32).sqrt()
    weights = average[:, None] + x.abs()
    levels, scales, mins = _scale_and_min(x, weights, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(count, 8), mins.reshape(count, 8)
    max_scale, max_min = scales.amax(-1).clamp(min=0), mins.amax(-1).clamp(min=0)
    inverse_scale = torch.where(max_scale > 0, 63 / torch.where(max_scale > 0, max_scale, 1.0), 0.0)
    inverse_min = torch.where(max_min > 0, 63 / torch.where(max_min > 0, max_min, 1.0), 0.0)
    q_scales = (inverse_scale[:, None] * scales).round().clamp(0, 63)
    q_mins = (inverse_min[:, None] * mins).round().clamp(0, 63)
    d = (max_scale / 63).half()
    dmin = (max_min / 63).half()

    # the levels are re-chosen against the scales as stored (f16 super-scale times 6-bit scale)
    step = (d.float()[:, None] * q_scales).reshape(-1, 1)
    offset = (dmin.float()[:, None] * q_mins).reshape(-1, 1)
    usable = step != 0
    rounded = ((x + offset) / torch.where(usable, step, 1.0)).round_().clamp_(0, nmax)
    levels = torch.where(usable, rounded, levels).to(torch.uint8).reshape(count, SUPER_BLOCK).numpy()

    q_scales = q_scales.to(torch.uint8).numpy()
    q_mins = q_mins.to(torch.uint8).numpy()
    packed_scales = np.empty((count, 12), dtype=np.uint8)
    packed_scales[:, 0:4] = q_scales[:, 0:4] | ((q_scales[:, 4:8] >> 4) << 6)
    packed_scales[:, 4:8] = q_mins[:, 0:4] | ((q_mins[:, 4:8] >> 4) << 6)
    packed_scales[:, 8:12] = (q_scales[:, 4:8] & 0xF) | ((q_mins[:, 4:8] & 0xF) << 4)
    header = np.concatenate([_f16_bytes(d), _f16_bytes(dmin)], axis=-1)
    return header, packed_scales, levels


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    header, scales, levels = _asymmetric_blocks(blocks, 15, -1.0, 20)
    pairs = levels.reshape(-1, 4, 2, 32)  # 64 values per byte row: the first 32 in the low nibbles
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([header, scales, qs], axis=-1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    header, scales, levels = _asymmetric_blocks(blocks, 31, -0.5, 15)
    pairs = levels.reshape(-1, 4, 2, 32)
    qs = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    fifth = (pairs >> 4).astype(np.uint8)  # (count, 4, 2, 32): bit 2*chunk + half of qh[j]
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = np.bitwise_or.reduce((fifth << shifts[None, :, :, None]).reshape(-1, 8, 32), axis=1)
    return np.concatenate([header, scales, qh, qs], axis=-1)


# --------------------------------------------------------------------------- Q6_K


def _q6_k(blocks) -> np.ndarray:
    import torch

    count = blocks.shape[0]
    x = blocks.reshape(count * 16, 16)
    levels, scales = _symmetric_scale(x, 32)
    scales = scales.reshape(count, 16)
    max_scale = scales.gather(-1, scales.abs().argmax(-1, keepdim=True))[:, 0]
    empty = max_scale.abs() < GROUP_MAX_EPS
    iscale = -128 / torch.where(empty, 1.0, max_scale)
    d = torch.where(empty, 0.0, 1 / iscale).half()
    q_scales = torch.where(empty[:, None], 0.0, (iscale[:, None] * scales).round().clamp(max=127))

    step = (d.float()[:, None] * q_scales).reshape(-1, 1)
    usable = step != 0
    rounded = (x / torch.where(usable, step, 1.0)).round_().clamp_(-32, 31) + 32
    levels = torch.where(usable, rounded, levels)
    levels = torch.where(empty.repeat_interleave(16)[:, None], 0.0, levels)  # an all-zero block is all zero bytes
    levels = levels.to(torch.uint8).reshape(count, 2, 4, 32).numpy()
    low = levels & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=-1)
    high = levels >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate(
        [ql.reshape(count, 128), qh.reshape(count, 64), q_scales.to(torch.int8).numpy().view(np.uint8), _f16_bytes(d)],
        axis=-1,
    )
