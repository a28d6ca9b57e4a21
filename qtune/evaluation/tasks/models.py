"""The models `qtune eval --tasks` hands to lm-evaluation-harness: transformers models (the 4-bit base, the adapter,
merged and NF4 exports) through its own HFLM wrapper, and GGUF files through llama.cpp itself, as Ollama and
llama.cpp run them. lm-evaluation-harness ships no in-process llama.cpp model (its `gguf` model talks to a server),
so LlamaCppLM is one: a TemplateLM, which splits context and continuation exactly as HFLM does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.models.huggingface import HFLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

# logits_all keeps a row of vocabulary-sized logits per position: 2,048 positions of a 128k vocabulary is 1 GiB.
GGUF_CONTEXT = 2048


def transformers_lm(model, tokenizer, batch_size: int | str) -> HFLM:
    """An already loaded model (PeftModel included) as lm-evaluation-harness scores it."""
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def llama_cpp_missing() -> str | None:
    """Why GGUF files cannot be scored here, or None when they can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install llama-cpp-python: it builds llama.cpp, ~11 minutes)"
    return None


class LlamaCppLM(TemplateLM):
    """A GGUF file in llama.cpp: its own tokenizer, its own kernels, greedy generation."""

    def __init__(self, path: Path):
        import gguf
        import llama_cpp

        super().__init__()
        reader = gguf.GGUFReader(path)
        architecture = reader.fields["general.architecture"].contents()
        trained_context = int(reader.fields[f"{architecture}.context_length"].contents())
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=min(trained_context, GGUF_CONTEXT), logits_all=True, verbose=False
        )
        self.max_length = self.llm.n_ctx()
        bos = self.llm.token_bos()
        self.bos_text = self.llm.detokenize([bos], special=True).decode("utf-8", "replace") if bos >= 0 else None

    @property
    def eot_token_id(self) -> int:
        """The file's end-of-sequence token."""
        return self.llm.token_eos()

    @property
    def prefix_token_id(self) -> int:
        """The token a rolling window starts with: BOS, or EOS where the file has none."""
        bos = self.llm.token_bos()
        return bos if bos >= 0 else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # As HFLM: the tokenizer's own BOS rule (the file's add_bos flag) unless told, and none when the text already
        # starts with the BOS token
        """The text's token ids, with BOS added as the file's tokenizer adds it."""
        if add_special_tokens is None:
            add_special_tokens = not (self.bos_text and string.startswith(self.bos_text))
        return self.llm.tokenize(string.encode("utf-8"), add_bos=add_special_tokens, special=True)

    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Log-likelihood of the continuation after the context, and whether greedy decoding would give it. Every
        request is evaluated from an empty cache: reusing a shared prompt is unsafe with sliding-window caches
        (Gemma, Mistral), which drop the positions a rewind would need."""
        tokens = (context + continuation)[-(self.max_length + 1) :]
        inputs = tokens[:-1]
        self.llm.reset()
        self.llm.eval(inputs)
        logits = np.asarray(self.llm.scores[len(inputs) - len(continuation) : len(inputs)], dtype=np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        targets = np.asarray(continuation)
        chosen = logprobs[np.arange(len(targets)), targets]
        return float(chosen.sum()), bool((logprobs.argmax(axis=-1) == targets).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return [
            self.score(context, continuation)
            for _, context, continuation in tqdm(requests, desc="Running loglikelihood requests", disable=disable_tqdm)
        ]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of whole texts, in windows of the context length (perplexity tasks)."""
        totals = []
        for (text,) in tqdm([r.args for r in requests], desc="Running rolling requests", disable=disable_tqdm):
            windows = map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            totals.append(sum(self.score(list(context), list(continuation))[0] for context, continuation in windows))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy answers to the requests, stopped at their stop strings."""
        answers = []
        for context, settings in tqdm([r.args for r in requests], desc="Generating", disable=disable_tqdm):
            until = settings.get("until") or []
            prompt = self.tok_encode(context)[-(self.max_length - 1) :]
            room = self.max_length - len(prompt)
            self.llm.reset()
            completion = self.llm.create_completion(
                prompt,
                max_tokens=min(int(settings.get("max_gen_toks", 256)), room),
                temperature=0.0,  # greedy: the same rule HFLM applies without do_sample
                stop=[until] if isinstance(until, str) else list(until) or None,
            )
            answers.append(completion["choices"][0]["text"])
        return answers
