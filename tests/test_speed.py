"""Every speed technique against the plain computation: each sample alone, unpadded, full logits.

Loss and LoRA gradients must agree within fp32 tolerance; the controls show the comparison can fail
(a packed batch that keeps an attention mask lets samples attend to each other).
"""

import pytest
import torch
from helpers import assert_close, lora_grads, per_sample_reference, qtune_trainer

from qtune.data.packing import IGNORE, PackedCollator, pack_rows

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def lora_model(pretrained_qwen2):
    """fp32 (exact comparisons) with LoRA on every linear layer and lm_head frozen, as in training; dropout off."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(pretrained_qwen2, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.train()
    return model


@pytest.fixture(scope="module")
def samples():
    """Lengths with skew; labels ignore a prompt of random length, as completion-only data does."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for length in (37, 5, 64, 12, 23, 2, 50, 9):
        ids = torch.randint(3, 500, (length,), generator=generator).tolist()
        prompt = int(torch.randint(0, max(1, length - 1), (1,), generator=generator))
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def test_pack_rows_respects_the_row_limit_and_keeps_every_sample():
    lengths = [700, 100, 300, 1024, 50, 600, 20]
    rows = pack_rows(lengths, 1024)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 1024 for row in rows)
    assert len(rows) == 3  # 1024 | 700+300+20 | 600+100+50
    assert pack_rows([2000, 10], 1024) == [[0], [1]]  # too long for a row: a row of its own


def test_packed_collator_layout(samples):
    batch = PackedCollator(pad_token_id=0, row_tokens=128)(samples)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: it would disable the packed mask
    real = sum(len(s["input_ids"]) for s in samples)
    assert int((batch["input_ids"] != 0).sum()) == real
    supervised = sum(sum(1 for x in s["labels"][1:] if x != IGNORE) for s in samples)
    assert int((batch["labels"] != IGNORE).sum()) == supervised  # each sample's first label dropped, nothing else
    assert batch["input_ids"].shape[0] < len(samples)


def test_packed_batch_equals_per_sample_computation(lora_model, samples):
    reference = per_sample_reference(lora_model, samples)
    batch = PackedCollator(pad_token_id=0, row_tokens=96)(samples)
    assert batch["input_ids"].shape[0] >= 2  # several rows, padding at the ends
    lora_model.zero_grad()
    logits = lora_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    ) / int((targets != IGNORE).sum())
    loss.backward()
    assert_close(loss.item(), lora_grads(lora_model), reference)


@pytest.mark.parametrize("leak", ["attention_mask", "kv_cache"])
def test_packing_controls_show_cross_sample_attention(lora_model, samples, leak):
    """Why the collator sends no attention mask and the loss runs without a cache: either one and transformers
    falls back to a plain causal mask over the whole row, and samples see each other."""
    batch = PackedCollator(pad_token_id=0, row_tokens=96)(samples)
    extra = (
        {"attention_mask": torch.ones_like(batch["input_ids"]), "use_cache": False}
        if leak == "attention_mask"
        else {"use_cache": True}
    )
    with torch.no_grad():
        right = lora_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        wrong = lora_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **extra).logits
    assert (right - wrong).abs().max().item() > 1e-2


def test_supervised_only_chunked_loss_equals_full_logits(lora_model, samples, monkeypatch):
    from qtune.modeling import loss as loss_stage

    reference = per_sample_reference(lora_model, samples)
    monkeypatch.setattr(loss_stage, "LOGIT_CHUNK_ELEMENTS", 7 * 600)  # several chunks, a ragged last one
    batch = PackedCollator(pad_token_id=0, row_tokens=96)(samples)
    head = loss_stage.fused_head_weight(lora_model)
    assert head is not None
    lora_model.zero_grad()
    with loss_stage.last_hidden_state(lora_model) as captured:
        lora_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, logits_to_keep=1)
    loss_sum, count = loss_stage.supervised_loss_sum(captured["hidden"], batch["labels"], head)
    loss = loss_sum / count
    loss.backward()
    assert_close(loss.item(), lora_grads(lora_model), reference)


def test_fused_loss_is_refused_for_heads_it_would_get_wrong(lora_model):
    from qtune.modeling import loss as loss_stage

    config = lora_model.config
    config.logit_scale = 0.5  # Cohere-style scaled logits: not handled by the fused loss
    try:
        assert loss_stage.fused_head_weight(lora_model) is None
    finally:
        del config.logit_scale
    head = lora_model.get_output_embeddings()
    head.weight.requires_grad_(True)
    try:
        assert loss_stage.fused_head_weight(lora_model) is None  # a trained head needs its weight gradient
    finally:
        head.weight.requires_grad_(False)


def test_trainer_loss_and_gradients_equal_the_plain_computation(lora_model, samples, tiny_tokenizer, tmp_path):
    """The trainer qtune builds, fed one packed micro-batch, against per-sample: same loss and gradients, for
    the per-micro-batch mean and for the token-count normalisation used with gradient accumulation."""
    trainer = qtune_trainer(lora_model, samples, tiny_tokenizer, tmp_path, row_tokens=96)
    for name, param in lora_model.named_parameters():  # trl casts LoRA weights to bf16 on quantized models only
        assert param.dtype == torch.float32, name
    reference = per_sample_reference(lora_model, samples)
    batch = trainer.data_collator(samples)
    supervised = int((batch["labels"] != IGNORE).sum())
    for num_items in (None, torch.tensor(supervised)):
        lora_model.zero_grad()
        loss = trainer.compute_loss(lora_model, dict(batch), num_items_in_batch=num_items)
        loss.backward()
        assert_close(loss.item(), lora_grads(lora_model), reference)
        assert trainer.loss_is_scaled_for_ga == (num_items is not None)


def test_row_by_row_backward_equals_the_plain_computation(lora_model, samples, tiny_tokenizer, tmp_path):
    """training_step runs forward and backward per packed row (one row's activations alive at a time)."""
    trainer = qtune_trainer(lora_model, samples, tiny_tokenizer, tmp_path, row_tokens=64)
    trainer.create_optimizer()
    reference = per_sample_reference(lora_model, samples)
    batch = trainer.data_collator(samples)
    assert batch["input_ids"].shape[0] >= 3
    lora_model.zero_grad()
    loss = trainer.training_step(
        lora_model, dict(batch), num_items_in_batch=torch.tensor(int((batch["labels"] != IGNORE).sum()))
    )
    assert_close(loss.item(), lora_grads(lora_model), reference)


def test_lean_lora_dropout_equals_peft_dropout(pretrained_qwen2):
    """Same seed, same masks: loss and gradients as with peft's nn.Dropout, and the dropped-out copies are gone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qtune.modeling.lean_ops import lean_lora_dropout

    def build():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(pretrained_qwen2, dtype=torch.float32)
        model = get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear", init_lora_weights=False)
        )
        model.train()
        return model

    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(2))

    def run(model, seed=5):
        saved = {}  # storage -> bytes: what autograd keeps for the backward pass

        def keep(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        torch.manual_seed(seed)
        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), lora_grads(model), sum(saved.values())

    plain = run(build())
    replayed_model = build()
    assert lean_lora_dropout(replayed_model) == 7 * 2  # every target layer of both decoder layers
    replayed = run(replayed_model)
    assert replayed[0] == pytest.approx(plain[0], rel=1e-6)
    assert_close(replayed[0], replayed[1], plain[:2])
    assert replayed[2] < plain[2]
    different = run(replayed_model, seed=6)  # another seed, other masks: the comparison can fail
    assert different[0] != pytest.approx(plain[0], rel=1e-6)


def test_lean_lora_dropout_under_autocast_equals_peft_dropout(pretrained_qwen2):
    """On a GPU the forward runs under bf16/fp16 autocast and the backward does not: the lean dropout's backward
    must do autocast's casts itself (it crashed on an H200: Half @ float). Checked here under CPU bf16 autocast,
    with fp32 LoRA weights and bf16 inputs, as qtune trains on a GPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qtune.modeling.lean_ops import lean_lora_dropout, lora_inputs_stay_in_compute_dtype

    def build(lean: bool):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(pretrained_qwen2, dtype=torch.bfloat16)
        model = get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear", init_lora_weights=False)
        )
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        lora_inputs_stay_in_compute_dtype(model)
        if lean:
            assert lean_lora_dropout(model) == 7 * 2
        model.train()
        return model

    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(2))
    results = []
    for lean in (False, True):
        model = build(lean)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = lora_grads(model)
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
        results.append((loss.item(), grads))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-3)
    for name, plain in results[0][1].items():
        lean_grad = results[1][1][name]
        assert torch.allclose(lean_grad, plain, rtol=0.05, atol=0.02 * plain.abs().max().item()), name
