"""Library messages a user cannot act on, silenced; the ones that matter are said once in qtune's own words where
they happen (the paged optimizer on CPU, a busy machine). tests/test_first_run.py lists the lines that must not show.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial


def quiet_library_noise() -> None:
    """Silences what users cannot act on (library log lines, deprecation notices, per-tensor progress bars); real
    warnings still show."""
    import warnings

    # bitsandbytes looks for an optional hub-hosted CPU kernel on every import and logs its absence.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # ...and `kernels` (a transformers dependency since 5.25) warns that it cannot check that hub kernel offline.
    logging.getLogger("kernels").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*kernels-community.*")
    # Deprecation notices between the libraries (peft calling transformers' old names) are not the user's.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # huggingface_hub logs each "Retrying in Ns" before it raises the error qtune turns into one line. Set through its
    # own call: importing it (transformers does, below) resets its logger's level, so a level set earlier is lost.
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()
    # Per-tensor "Loading weights" / "Writing model shards" bars; the training bar (plain tqdm) stays.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    # trl's "Truncating train dataset" / "Dropping fully masked examples" passes over data qtune already tokenized,
    # truncated and checked (its own one-line data report says what they found).
    import datasets

    datasets.disable_progress_bars()
    # lm-evaluation-harness warns that a loaded model "is not of type str" and logs each seed and task it sets up;
    # `qtune eval --tasks` states the tasks, seeds and cost itself. Its request progress bars stay.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    # gguf-py's SpecialVocab notes a sentence-pair template it cannot map ("Unknown separator token
    # '<|begin_of_text|>' in TemplateProcessing<pair>", Llama 3 tokenizers): pairs are never used by a causal LM.
    logging.getLogger("gguf.vocab").addFilter(not_a_pair_template_note)


def not_a_pair_template_note(record: logging.LogRecord) -> bool:
    """A logging filter: False for gguf-py's notes about a tokenizer's sentence-pair template."""
    return "TemplateProcessing<pair>" not in record.getMessage()


@contextmanager
def no_gguf_dequantize_bar() -> Iterator[None]:
    """Loading a GGUF file in transformers draws a bar per tensor ("Converting and de-quantizing GGUF tensors") with
    plain tqdm, which transformers' own disable_progress_bar() does not reach: switched off for the block."""
    import transformers.modeling_gguf_pytorch_utils as gguf_loading

    drawn_with = gguf_loading.tqdm
    gguf_loading.tqdm = partial(drawn_with, disable=True)
    try:
        yield
    finally:
        gguf_loading.tqdm = drawn_with
