"""Small models and tokenizers built here, from nothing: the offline demo and the tests use them.

Nothing is downloaded. The tokenizer is a byte-level BPE trained in memory on generated
text; the model is a Llama- or Qwen2-shaped network initialised from a seed. Widths are
multiples of 64 because bitsandbytes' 4-bit blocks are 64 values long.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# <|endoftext|> is there because transformers loads a qwen2 folder's tokenizer as Qwen2Tokenizer,
# which adds it (as unk and pad) when missing and so outgrows the model's embeddings.
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|endoftext|>"]

WORDS = (
    "the a an model data train learn token adapter weight layer quantize memory small large fast slow "
    "apple river stone cloud green blue red number answer question reverse sort count letter word "
    "one two three four five six seven eight nine ten is are was of to in and or not with for"
).split()


def demo_rows(count: int, seed: int = 0) -> list[dict]:
    """Alpaca-format tasks with checkable answers: arithmetic, reversal, counting, upper-casing."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        task = rng.randrange(4)
        if task == 0:
            a, b = rng.randrange(100), rng.randrange(100)
            rows.append({"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)})
        elif task == 1:
            word = rng.choice(WORDS)
            rows.append({"instruction": "Reverse the word.", "input": word, "output": word[::-1]})
        elif task == 2:
            words = [rng.choice(WORDS) for _ in range(rng.randrange(2, 9))]
            rows.append(
                {"instruction": "How many words are there?", "input": " ".join(words), "output": str(len(words))}
            )
        else:
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 6)))
            rows.append({"instruction": "Write the text in capital letters.", "input": words, "output": words.upper()})
    return rows


def preference_rows(count: int, seed: int = 0) -> list[dict]:
    """Preference pairs on the demo tasks: the right answer is chosen, a typical wrong one rejected (a sum off by
    one or ten, the word not reversed, a count off by one, the text left in lower case). The prompt is the alpaca
    prompt the demo's SFT stage trained on."""
    from qtune.data.templates import alpaca_prompt

    rng = random.Random(seed)
    rows = []
    for row in demo_rows(count, seed):
        answer, given = row["output"], row["input"]
        if row["instruction"].startswith("Add"):
            wrong = str(int(answer) + rng.choice([-10, -1, 1, 10]))
        elif row["instruction"].startswith("Reverse"):
            wrong = given if given != answer else given + given[-1]
        elif row["instruction"].startswith("How many"):
            wrong = str(int(answer) + (1 if int(answer) == 2 else rng.choice([-1, 1])))
        else:
            wrong = given
        rows.append({"prompt": alpaca_prompt(row["instruction"], given), "chosen": answer, "rejected": wrong})
    return rows


def prompt_answer_rows(count: int, seed: int = 0) -> list[dict]:
    """The demo's tasks as prompts with reference answers (GRPO's data): the alpaca prompt the demo's SFT stage
    trained on, and the exact answer a reward checks."""
    from qtune.data.templates import alpaca_prompt

    return [
        {"prompt": alpaca_prompt(row["instruction"], row["input"]), "answer": row["output"]}
        for row in demo_rows(count, seed)
    ]


def corpus(seed: int = 0, lines: int = 3000) -> list[str]:
    """The text the tiny tokenizers are trained on: random words and the demo tasks in the alpaca layout."""
    rng = random.Random(seed)
    text = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 15))) for _ in range(lines)]
    for row in demo_rows(lines // 3, seed):
        text.append(
            f"### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n{row['output']}"
        )
    text.append(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    )
    text.append(
        "0 1 2 3 4 5 6 7 8 9 10 100 ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz user assistant system"
    )
    return text


def build_tokenizer(vocab_size: int = 512, seed: int = 0):
    """A byte-level BPE tokenizer with BOS/EOS, ChatML turn markers and no pad token set.

    No pad token on purpose: real base tokenizers (Llama, Mistral) lack one and qtune must pick one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(seed), trainer=trainer)
    bos = bpe.token_to_id("<|begin_of_text|>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        additional_special_tokens=SPECIAL_TOKENS[2:],
        model_max_length=4096,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_sentencepiece_tokenizer(vocab_size: int = 600, seed: int = 0):
    """A Llama-2-style tokenizer: SentencePiece BPE with byte fallback (<0x00>..<0xFF>), '▁' for spaces,
    <unk>/<s>/</s>, laid out the way transformers converts Llama 2's tokenizer.model. No chat template
    and no pad token, like the real base model."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    probe = Tokenizer(models.BPE(unk_token="<unk>"))
    # Pieces never span a space, as with SentencePiece's split_by_whitespace; the final tokenizer has no
    # pre-tokenizer, exactly like transformers' conversion of Llama 2.
    probe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 259, special_tokens=[], show_progress=False)
    probe.train_from_iterator(corpus(seed), trainer=trainer)
    learned = json.loads(probe.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    for piece, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in learned["merges"]]
    spm = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    spm.normalizer = normalizer
    spm.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    spm.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=4096
    )


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
# Mixtures of experts: 4 experts, 2 per token, each half the dense width (qtune.modeling.moe)
MOE_FAMILIES = ("qwen3_moe", "mixtral", "olmoe", "gpt_oss")


def build_model(
    family: str,
    tokenizer,
    *,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 512,
    seed: int = 0,
    tie_embeddings: bool = False,
    config_extra: dict | None = None,
):
    """A randomly initialised (seeded) model of `family` sized for `tokenizer`; config_extra overrides config keys."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        Gemma3TextConfig,
        GptOssConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        OlmoeConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    vocab = len(tokenizer)
    common = dict(
        max_position_embeddings=4096,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[t for t in (tokenizer.eos_token_id, tokenizer.get_vocab().get("<|im_end|>")) if t is not None],
        tie_word_embeddings=tie_embeddings,
        torch_dtype="float32",
    )
    # what each family has of its own; config_extra (Llama 3's rope scaling, a shorter window, another head size)
    # overrides any of it
    if family == "mistral":  # Mistral v0.1's sliding window
        common["sliding_window"] = 4096
    elif family == "qwen3":
        # q/k norms, tied embeddings, and head_dim 128 whatever hidden / heads is, as every published Qwen3 has
        common.update(tie_word_embeddings=True, head_dim=128)
    elif family in ("gemma2", "gemma3"):
        # Gemma 2: logit soft-capping, alternating sliding window; Gemma 3: q/k norms, 5 sliding layers to 1 global.
        # Both scale queries by query_pre_attn_scalar, which is the head size in every Gemma llama.cpp runs (it
        # keys a different scale to the 27B model only).
        common.update(tie_word_embeddings=True, head_dim=hidden // heads, query_pre_attn_scalar=hidden // heads)
        common["sliding_window"] = 64
    elif family == "phi3":  # fused qkv_proj and gate_up_proj
        common["pad_token_id"] = tokenizer.pad_token_id
    elif family in MOE_FAMILIES:
        experts = {"num_local_experts" if family in ("mixtral", "gpt_oss") else "num_experts": 4}
        common.update(experts, num_experts_per_tok=2, router_aux_loss_coef=0.01, output_router_logits=True)
        if family == "qwen3_moe":
            # renormalized top-k weights, as every published Qwen3-MoE has (and llama.cpp computes)
            common.update(
                moe_intermediate_size=intermediate // 2, head_dim=128, tie_word_embeddings=True, norm_topk_prob=True
            )
        else:
            common["intermediate_size"] = intermediate // 2
        if family == "olmoe":  # no grouped KV heads, as the published OLMoE (its k norm spans all heads)
            common["num_key_value_heads"] = heads
        if family == "gpt_oss":  # attention sinks, biases, alternating sliding window, clamped SwiGLU
            common.update(head_dim=hidden // heads, sliding_window=64, layer_types=None)
    common.update(config_extra or {})
    classes = {
        "llama": LlamaConfig,
        "qwen2": Qwen2Config,
        "mistral": MistralConfig,
        "qwen3": Qwen3Config,
        "gemma2": Gemma2Config,
        "gemma3": Gemma3TextConfig,
        "phi3": Phi3Config,
        "qwen3_moe": Qwen3MoeConfig,
        "mixtral": MixtralConfig,
        "olmoe": OlmoeConfig,
        "gpt_oss": GptOssConfig,
    }
    if family not in classes:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES + MOE_FAMILIES}")
    config = classes[family](**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def pretraining_text(seed: int = 0, lines: int = 4000) -> list[str]:
    """Plain text with the facts the demo tasks need, never in the demo's instruction format:
    sums, reversed and upper-cased words, counted lists. Fine-tuning then teaches the format."""
    rng = random.Random(seed + 1000)
    text = []
    for _ in range(lines):
        kind = rng.randrange(5)
        if kind == 0:
            a, b = rng.randrange(100), rng.randrange(100)
            text.append(f"{a} plus {b} makes {a + b}.")
        elif kind == 1:
            word = rng.choice(WORDS)
            text.append(f"{word} backwards is {word[::-1]}.")
        elif kind == 2:
            words = [rng.choice(WORDS) for _ in range(rng.randrange(2, 9))]
            text.append(f"the list {' '.join(words)} has {len(words)} words.")
        elif kind == 3:
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 6)))
            text.append(f"{words} in capitals is {words.upper()}.")
        else:
            text.append(" ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 15))) + ".")
    return text


def pretrain(
    model,
    tokenizer,
    *,
    steps: int,
    seed: int = 0,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 3e-3,
    progress: bool = False,
) -> list[float]:
    """A short full-precision language-model run so the base has real (not random) weights.

    Quantization error, and what fine-tuning adds, only mean something on a model that knows something.
    Returns the loss of every step.
    """
    import torch

    torch.manual_seed(seed)
    ids = [t for line in pretraining_text(seed) for t in tokenizer(line).input_ids + [tokenizer.eos_token_id]]
    stream = torch.tensor(ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc="pretraining", disable=not progress, dynamic_ncols=True)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([stream[s : s + seq_len] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        bar.update()
    bar.close()
    model.eval()
    return losses


def write_tiny_model(
    out_dir: str | Path,
    family: str = "llama",
    *,
    seed: int = 0,
    pretrain_steps: int = 0,
    tokenizer_kind: str = "bpe",
    progress: bool = False,
    **shape,
) -> Path:
    """Build a tokenizer (byte-level BPE, or Llama-2-style SentencePiece) and a model (optionally pretrained
    a little) and save both (safetensors) into `out_dir`."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(seed=seed) if tokenizer_kind == "bpe" else build_sentencepiece_tokenizer(seed=seed)
    model = build_model(family, tokenizer, seed=seed, **shape)
    losses = pretrain(model, tokenizer, steps=pretrain_steps, seed=seed, progress=progress) if pretrain_steps else []
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"family": family, "seed": seed, "pretrain_steps": pretrain_steps, **shape}
    if losses:
        info["pretrain_loss_first_last"] = [losses[0], losses[-1]]
    (out / "qtune-tiny.json").write_text(json.dumps(info))
    return out


def write_demo_data(
    path: str | Path, count: int = 2000, seed: int = 0, *, preference: bool = False, prompt_answer: bool = False
) -> Path:
    """The demo's alpaca rows (or preference pairs, or prompts with answers) as JSON lines at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = preference_rows if preference else prompt_answer_rows if prompt_answer else demo_rows
    with path.open("w", encoding="utf-8") as f:
        for row in rows(count, seed):
            f.write(json.dumps(row) + "\n")
    return path
