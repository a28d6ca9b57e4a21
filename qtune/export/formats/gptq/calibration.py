"""GPTQ's calibration data and each decoder layer's inputs: the run's own training samples, tokenized exactly as
training saw them (chat template, packing), and what the model hands each decoder layer besides the hidden states
(masks, rotary embeddings), recorded once."""

from __future__ import annotations

import itertools
import random

import torch

from qtune.core.errors import DataError
from qtune.core.log import get_logger

log = get_logger(__name__)


def calibration_rows(trained, samples: int, length: int) -> list[list[int]]:
    """`samples` of the run's training samples (drawn with the recipe's seed), each cut to its first `length` tokens,
    as token ids. A Hub dataset is read through datasets' cache; offline and not cached, it is refused in one line."""
    from transformers import AutoTokenizer

    from qtune.data import kind_of

    tokenizer = AutoTokenizer.from_pretrained(trained.adapter_dir)
    section = trained.recipe.data
    kind = kind_of(section.datasets[0].format)
    prepared = kind.build(section, tokenizer, seed=trained.recipe.train.seed)
    rows = kind.as_lm_samples(prepared.train)
    if hasattr(rows, "__len__"):
        chosen = random.Random(trained.recipe.train.seed).sample(range(len(rows)), min(samples, len(rows)))
        picked = [rows[i]["input_ids"] for i in chosen]
    else:  # a streamed dataset (data.streaming): its first samples, in the stream's seeded order
        picked = [row["input_ids"] for row in itertools.islice(rows, samples)]
    picked = [ids[:length] for ids in picked if len(ids) > 1]
    if not picked:
        raise DataError("no training sample to calibrate GPTQ with", where="data.datasets", fix="check the data")
    tokens = sum(len(ids) for ids in picked)
    log.info(
        f"gptq: calibrating on {len(picked)} training samples, {tokens:,} tokens (at most {length} each; "
        f"export.gptq.calibration_samples / calibration_length)"
    )
    return picked


class LayersRecorded(Exception):
    """Raised by the last decoder layer's recorder: the rest of the forward pass is not needed."""


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's decoder layers, in order."""
    return model.get_decoder().layers


def record_layer_inputs(model, rows: list[list[int]], device) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    """(the first layer's hidden states per sample, per layer and sample the other arguments the model passes it).

    Every layer's forward is swapped for a recorder that returns its input unchanged, so one pass per sample costs
    only the embeddings; the arguments are recorded per layer because families differ between layers (Gemma's
    sliding and global masks and rotary tables)."""
    layers = decoder_layers(model)
    hidden_states: list[torch.Tensor] = []
    arguments: list[list[tuple]] = [[] for _ in layers]

    def recorder(index: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                hidden_states.append(hidden)
            arguments[index].append((args[1:], kwargs))
            if index == len(layers) - 1:
                raise LayersRecorded
            return hidden

        return forward

    for index, layer in enumerate(layers):
        layer.forward = recorder(index)  # an instance attribute: nn.Module.__call__ finds it before the class's
    try:
        with torch.no_grad():
            for ids in rows:
                try:
                    model(input_ids=torch.tensor([ids], device=device), use_cache=False)
                except LayersRecorded:
                    pass
    finally:
        for layer in layers:
            del layer.forward
    return hidden_states, arguments


def place_all_but_layers(model, device) -> None:
    """Moves everything the layers do not hold (embeddings, rotary tables, final norm, head) to `device`."""
    layers = decoder_layers(model)
    held = {id(p) for p in layers.parameters()} | {id(b) for b in layers.buffers()}
    for module in model.modules():
        for tensor in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)):
            if id(tensor) not in held and tensor.device != torch.device(device):
                tensor.data = tensor.data.to(device)
