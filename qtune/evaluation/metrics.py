"""How far a model is from a reference on the same tokens: perplexity, KL, top-1 agreement, max |Δlogit|; and the
mean loss over supervised tokens. Models run one sample at a time; the callers keep only what they compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Top-1 agreement is counted where the reference's two best logits differ by more than this:
# closer than that, rounding alone flips the winner and says nothing about the export.
DECISIVE_MARGIN = 0.05


@dataclass
class Sample:
    """One tokenized sample: its ids and labels (-100 where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


def samples_from(dataset, limit: int | None, max_tokens: int | None = 256) -> list[Sample]:
    """At most `limit` (None: all) samples of at most `max_tokens` tokens. The fidelity report holds the reference
    logits in memory (limit x max_tokens x vocabulary x 4 bytes: 1 GiB for 32 x 256 x 32k)."""
    rows = dataset.select(range(len(dataset) if limit is None else min(limit, len(dataset))))
    return [Sample(r["input_ids"][:max_tokens], r["labels"][:max_tokens]) for r in rows]


@torch.no_grad()
def sample_logits(model, samples: list[Sample]) -> list[torch.Tensor]:
    """The model's logits for each sample (fp32, on the CPU), one sample at a time."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for sample in samples:
        ids = torch.tensor([sample.input_ids], device=device)
        out.append(model(input_ids=ids).logits[0].float().cpu())
    return out


def perplexity(logits: list[torch.Tensor], samples: list[Sample]) -> float:
    """exp of the mean negative log-likelihood of the supervised tokens, from the logits."""
    total, count = 0.0, 0
    for row, sample in zip(logits, samples):
        labels = torch.tensor(sample.labels[1:])
        keep = labels != -100
        if keep.any():
            nll = torch.nn.functional.cross_entropy(row[:-1][keep], labels[keep], reduction="sum")
            total += nll.item()
            count += int(keep.sum())
    return math.exp(total / max(count, 1))


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor], samples: list[Sample]) -> dict:
    """Figures of `candidate` against `reference`, over every position of every sample."""
    kl_sum, positions = 0.0, 0
    agree, decisive, decisive_agree = 0, 0, 0
    max_delta = 0.0
    for ref, cand in zip(reference, candidate):
        ref_logp = torch.log_softmax(ref.double(), dim=-1)
        cand_logp = torch.log_softmax(cand.double(), dim=-1)
        kl_sum += (ref_logp.exp() * (ref_logp - cand_logp)).sum(dim=-1).clamp(min=0).sum().item()
        positions += ref.shape[0]
        ref_top = ref.topk(2, dim=-1)
        same = ref_top.indices[:, 0] == cand.argmax(dim=-1)
        agree += int(same.sum())
        clear = (ref_top.values[:, 0] - ref_top.values[:, 1]) > DECISIVE_MARGIN
        decisive += int(clear.sum())
        decisive_agree += int((same & clear).sum())
        max_delta = max(max_delta, (ref - cand).abs().max().item())
    return {
        "perplexity": perplexity(candidate, samples),
        "mean_kl": kl_sum / max(positions, 1),
        "top1_agreement": decisive_agree / max(decisive, 1),
        "top1_agreement_raw": agree / max(positions, 1),
        "max_abs_logit_diff": max_delta,
        "positions": positions,
        "decisive_positions": decisive,
    }


def unloadable(error: str) -> dict:
    """The row of an artifact that did not load back: every figure NaN, and the error."""
    nan = float("nan")
    return {
        "perplexity": nan,
        "mean_kl": nan,
        "top1_agreement": nan,
        "top1_agreement_raw": nan,
        "max_abs_logit_diff": nan,
        "positions": 0,
        "decisive_positions": 0,
        "load_error": error,
    }


def format_table(rows: dict[str, dict], reference_perplexity: float) -> str:
    """The fidelity table `qtune export` prints and the model card shows: one line per artifact."""
    header = (
        f"{'artifact':<14} {'size MiB':>9} {'ppl':>9} {'mean KL':>10} {'top-1':>8} {'top-1 raw':>9} {'max|Δlogit|':>12}"
    )
    lines = [header, "-" * len(header), f"{'adapter+NF4':<14} {'':>9} {reference_perplexity:>9.4f} {'(reference)':>10}"]
    for name, row in rows.items():
        if "load_error" in row:
            lines.append(f"{name:<14} {row.get('size_bytes', 0) / 2**20:>9.1f} did not load: {row['load_error'][:80]}")
            continue
        kept = f"  (kept from the export of {row['measured'].get('at')})" if row.get("kept") else ""
        lines.append(
            f"{name:<14} {row.get('size_bytes', 0) / 2**20:>9.1f} {row['perplexity']:>9.4f} {row['mean_kl']:>10.2e} "
            f"{100 * row['top1_agreement']:>7.2f}% {100 * row['top1_agreement_raw']:>8.2f}% {row['max_abs_logit_diff']:>12.4f}"
            + kept
        )
    return "\n".join(lines)


@torch.no_grad()
def supervised_loss(model, samples: list[Sample]) -> float:
    """Mean negative log-likelihood over the supervised tokens of every sample (no logits kept)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for sample in samples:
        logits = model(input_ids=torch.tensor([sample.input_ids], device=device)).logits[0, :-1].float()
        labels = torch.tensor(sample.labels[1:], device=device)
        keep = labels != -100
        total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / max(count, 1)
