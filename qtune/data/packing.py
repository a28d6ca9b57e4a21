"""Micro-batches without padding: the samples of one micro-batch laid end to end in a few rows.

The plain recipe pads every micro-batch to its longest sample; with alpaca-like length skew most of the
compute goes to padding. Here the same samples (the sampler is untouched, so every step sees exactly the
samples it would have) are packed first-fit into rows of at most `row_tokens` tokens, and each sample gets
position ids that restart at 0. With no attention mask, transformers derives a block-diagonal causal mask
from those position ids (masking_utils.find_packed_sequence_indices), so no sample attends to another one:
tests/test_speed.py checks the loss and the gradients against a per-sample, unpadded computation.

Two things keep that true: the first label of every sample is ignored (else the last token of one sample
would learn to predict the first of the next), and the model must run without a KV cache, since
transformers only looks for packed sequences when there is none (qtune.modeling.loss passes use_cache=False).
The tail of a row is padding with its own restarting position ids: a segment nothing else attends to.
"""

from __future__ import annotations

IGNORE = -100


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, each row at most `row_tokens` tokens (a longer sample
    gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(row_tokens - lengths[index])
    return rows


class PackedCollator:
    """input_ids, labels and position_ids for one micro-batch, packed; no attention_mask on purpose."""

    def __init__(self, pad_token_id: int, row_tokens: int):
        self.pad_token_id = pad_token_id
        self.row_tokens = row_tokens

    def __call__(self, features: list[dict]) -> dict:
        """Packs one micro-batch's samples into rows: tensors of input_ids, labels and restarting position_ids."""
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        rows = pack_rows(lengths, self.row_tokens)
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for index in row:
                ids, sample_labels = features[index]["input_ids"], features[index]["labels"]
                end = start + len(ids)
                input_ids[r, start:end] = torch.as_tensor(ids)
                labels[r, start:end] = torch.as_tensor(sample_labels)
                labels[r, start] = IGNORE  # never a target: it has no previous token within its sample
                position_ids[r, start:end] = torch.arange(len(ids))
                start = end
            position_ids[r, start:] = torch.arange(width - start)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
