"""The GGUF formats: files for llama.cpp and Ollama, written in-process with the `gguf` package, and read back as
transformers reads them.

Streams from a merged safetensors folder one tensor at a time: the tensor table is written first, then each tensor is
converted (renamed, q/k rows permuted for llama-style rotary, quantized) and appended, so memory stays at one tensor
whatever the model size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qtune.core.errors import EXIT_ENVIRONMENT, QtuneError
from qtune.core.fs import staged, write_text_atomically
from qtune.core.log import get_logger
from qtune.core.noise import no_gguf_dequantize_bar
from qtune.core.testhooks import fault_point
from qtune.export.formats.gguf.experts import add_expert_hyperparameters, gguf_sources, read_gguf_moe
from qtune.export.formats.gguf.families import (
    add_hyperparameters,
    as_llama_cpp_expects,
    extra_tensors,
    tensor_name_map,
)
from qtune.export.formats.gguf.kquants import BLOCK_BYTES, quantize_k
from qtune.export.formats.gguf.ollama import ollama_modelfile
from qtune.export.formats.gguf.support import GGUF_ARCHITECTURES, READ_BACK_AS, gguf_problem
from qtune.export.formats.gguf.tensor_types import MIXES, layer_order, tensor_types

if TYPE_CHECKING:
    from qtune.export.formats import ExportJob

log = get_logger(__name__)


def read_tensor(location: dict[str, Path], name: str) -> np.ndarray:
    """One tensor of a safetensors folder as float32 numpy."""
    from safetensors import safe_open

    with safe_open(str(location[name]), framework="pt") as handle:
        return handle.get_tensor(name).float().numpy()


def vocabulary(merged_dir: Path, tokenizer):
    """(tokenizer model, tokens, scores, token types, merges) for the GGUF tokenizer keys."""
    import gguf

    spec = json.loads((merged_dir / "tokenizer.json").read_text())
    model = spec["model"]
    decoder = (spec.get("decoder") or {}).get("type")
    size = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    if model["type"] == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
        tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
        types = []
        for index in range(size):
            if index in special or (index in added and added[index].get("special")):
                types.append(gguf.TokenType.CONTROL)
            elif index in added:
                types.append(gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        return "gpt2", tokens, None, types, merges
    if model["type"] == "BPE" and model.get("byte_fallback"):
        # SentencePiece-style vocabulary (Llama 2, Mistral v0.1). llama.cpp merges the adjacent pair whose joined
        # piece has the highest score; gguf-py's LlamaHfVocab gives every piece the same placeholder score
        # (-1000), which makes that order arbitrary and the tokenization wrong. A piece made by BPE merge i
        # gets score -i, so the merge order is kept (tests/test_export.py::test_sentencepiece_vocabulary_in_gguf).
        rank = {
            "".join(m if not isinstance(m, str) else m.split(" ")): i for i, m in enumerate(model.get("merges", []))
        }
        tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
        scores, types = [], []
        for index, token in enumerate(tokens):
            scores.append(-float(rank[token]) if token in rank else 0.0)
            if index in special or (index in added and added[index].get("special")):
                types.append(gguf.TokenType.UNKNOWN if token == tokenizer.unk_token else gguf.TokenType.CONTROL)
            elif index in added:
                types.append(gguf.TokenType.USER_DEFINED)
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types.append(gguf.TokenType.BYTE)
            else:
                types.append(gguf.TokenType.NORMAL)
        return "llama", tokens, scores, types, None
    raise QtuneError(
        f"GGUF export does not support this tokenizer ({model['type']}, decoder {decoder})",
        fix="export merged_fp16 and convert with llama.cpp's convert_hf_to_gguf.py",
        code=EXIT_ENVIRONMENT,
    )


def adds_space_prefix(merged_dir: Path) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama 2 does, Gemma does not). llama.cpp assumes it does for
    SentencePiece-style vocabularies unless the file says otherwise, and would then tokenize Gemma differently."""
    spec = json.loads((merged_dir / "tokenizer.json").read_text())

    def steps(node):
        if not node:
            return []
        return [x for child in node.get("normalizers") or node.get("pretokenizers") or [] for x in steps(child)] or [
            node
        ]

    for step in steps(spec.get("normalizer")) + steps(spec.get("pre_tokenizer")):
        if step.get("type") == "Prepend" or (step.get("type") == "Metaspace" and step.get("prepend_scheme") != "never"):
            return True
    return False


def pre_tokenizer_name(model_type: str, tokenizer) -> str:
    """llama.cpp's name for the pre-tokenizer regex (it picks the splitting rules by this name)."""
    vocab = tokenizer.get_vocab()
    if model_type == "qwen2":
        return "qwen2"
    if "<|begin_of_text|>" in vocab and len(vocab) >= 128000:
        return "llama-bpe"
    return "gpt-2"


def write_gguf(merged_dir: Path, target: Path, quant: str) -> Path:
    """Writes the merged model in `merged_dir` as a GGUF file of llama.cpp file type `quant` at `target`."""
    import gguf
    from transformers import AutoTokenizer

    from qtune.modeling.config import load_config
    from qtune.modeling.moe.families import moe_family
    from qtune.modeling.weights import checkpoint_tensors

    config = load_config(merged_dir)
    model_type = config.model_type
    problem = gguf_problem(config.to_dict())
    if problem:
        raise QtuneError(problem, fix="export merged_fp16 and convert it with llama.cpp", code=EXIT_ENVIRONMENT)
    arch = GGUF_ARCHITECTURES[model_type]
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    tokenizer_model, tokens, scores, token_types, merges = vocabulary(merged_dir, tokenizer)
    rows = config.get_text_config().vocab_size
    if rows > len(tokens):
        # Embedding rows past the tokenizer (vocabularies padded to a round size, a model built wider than its
        # tokenizer): the GGUF loaders take the vocabulary size from the token list, so it must cover every row.
        # llama.cpp's converter fills them the same way.
        tokens = tokens + [f"[PAD{index}]" for index in range(len(tokens), rows)]
        token_types = token_types + [gguf.TokenType.UNUSED] * (rows - len(token_types))
        scores = None if scores is None else scores + [-1000.0] * (rows - len(scores))
    mix = MIXES[quant]

    names = tensor_name_map(arch, config.num_hidden_layers)
    location = checkpoint_tensors(merged_dir)
    if config.tie_word_embeddings:
        location.pop("lm_head.weight", None)
    # each tensor as llama.cpp holds it (a mixture of experts' experts stacked per layer), read when written
    sources = gguf_sources(
        location, config, lambda name: read_tensor(location, name), lambda name: tensor_shape(location, name)
    )
    named = []  # (gguf name, hf name), laid out layer by layer as llama.cpp's type rules count them
    for hf_name in sources:
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise QtuneError(
                f"no GGUF name for tensor '{hf_name}'",
                fix="this model layout is not supported for GGUF",
                code=EXIT_ENVIRONMENT,
            )
        named.append((gguf_name, hf_name))
    named.sort(key=lambda pair: layer_order(pair[0]))
    shapes = {hf_name: sources[hf_name][0] for _, hf_name in named}
    family = moe_family(config)
    experts = family.expert_count(config) if family else 0
    types = tensor_types([(gguf_name, shapes[hf_name]) for gguf_name, hf_name in named], quant, experts=experts)
    plan = [
        (gguf_name, hf_name, getattr(gguf.GGMLQuantizationType, kind))
        for (gguf_name, hf_name), kind in zip(named, types)
    ]

    with staged(target, folder=False) as staging:
        writer = gguf.GGUFWriter(None, arch)
        try:
            writer.add_name(Path(merged_dir).name)
            add_hyperparameters(writer, arch, config)
            add_expert_hyperparameters(writer, config)
            writer.add_vocab_size(len(tokens))
            writer.add_file_type(getattr(gguf.LlamaFileType, mix.file_type))
            writer.add_tokenizer_model(tokenizer_model)
            writer.add_tokenizer_pre(pre_tokenizer_name(model_type, tokenizer))
            writer.add_token_list(tokens)
            writer.add_token_types(token_types)
            if scores is not None:
                writer.add_token_scores(scores)
                writer.add_add_space_prefix(adds_space_prefix(merged_dir))
            add_special_tokens(writer, merged_dir, tokenizer, merges)

            extra = extra_tensors(config)
            for gguf_name, data in extra.items():
                writer.add_tensor_info(gguf_name, data.shape, data.dtype, data.nbytes)
            for gguf_name, hf_name, ggml_type in plan:
                shape = shapes[hf_name]
                if ggml_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                    dtype = np.dtype(np.float32 if ggml_type == gguf.GGMLQuantizationType.F32 else np.float16)
                    writer.add_tensor_info(gguf_name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
                else:
                    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, ggml_type)
                    writer.add_tensor_info(
                        gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=ggml_type
                    )
            writer.write_header_to_file(path=staging)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for data in extra.values():
                writer.write_tensor_data(data)
            for index, (_, hf_name, ggml_type) in enumerate(plan):
                data = as_llama_cpp_expects(arch, config, hf_name, sources[hf_name][1]())
                if ggml_type == gguf.GGMLQuantizationType.F32:
                    data = data.astype(np.float32)
                elif ggml_type == gguf.GGMLQuantizationType.F16:
                    data = data.astype(np.float16)
                else:
                    data = quantize(data, ggml_type)
                writer.write_tensor_data(data)
                if index == len(plan) // 2:
                    fault_point("gguf")
        finally:
            writer.close()
    log.info(f"export: {target.name}: {target.stat().st_size / 2**20:.1f} MiB ({quant})")
    return target


def write_gguf_artifact(job: ExportJob, target: Path, quant: str, modelfile_suffix: str) -> None:
    """A GGUF format: the file, from the fp16 merge, and the Ollama Modelfile beside it."""
    from transformers import AutoTokenizer

    merged_dir = job.merged_fp16()
    write_gguf(merged_dir, target, quant)
    trained_on_alpaca = all(d.format == "alpaca" for d in job.trained.recipe.data.datasets)
    modelfile = ollama_modelfile(target.name, AutoTokenizer.from_pretrained(merged_dir), trained_on_alpaca)
    write_text_atomically(target.with_name(target.name + modelfile_suffix), modelfile)


def load_gguf(path: Path, *, config, dtype, on_gpu: bool):
    """A GGUF file as transformers' GGUF reader loads it, into a model built from `config`, the merged model's own
    config (as llama.cpp runs the architecture it is written as). The reader's own guess of the architecture from the
    file's keys is wrong where it ignores a key qtune writes (Qwen3's key_length: a head size other than 128 ends in
    a size mismatch; Gemma's query scale; Phi-3's longrope factors), so it is not used (tests/test_formats.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtune.modeling.load import device_map
    from qtune.modeling.moe.families import moe_family

    if moe_family(config) is not None:  # transformers' GGUF reader knows few of these: qtune's own reads them
        model = read_gguf_moe(path, config, dtype)
        return model.to(device_map()[""]) if on_gpu else model
    read_back_as = READ_BACK_AS[GGUF_ARCHITECTURES[config.model_type]]
    if read_back_as != config.model_type:
        # Mistral is written as llama, as llama.cpp's converter does: it runs as llama, without the sliding window
        dropped = ("model_type", "architectures", "sliding_window")
        config = AutoConfig.for_model(read_back_as, **{k: v for k, v in config.to_dict().items() if k not in dropped})
    placement = {"device_map": device_map()} if on_gpu else {}
    with no_gguf_dequantize_bar():
        return AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=config, dtype=dtype, **placement
        )


def tensor_shape(location: dict[str, Path], name: str) -> tuple[int, ...]:
    """A tensor's shape, read from its safetensors header."""
    from safetensors import safe_open

    with safe_open(str(location[name]), framework="pt") as handle:
        return tuple(handle.get_slice(name).get_shape())


def quantize(data: np.ndarray, ggml_type) -> np.ndarray:
    """Blocks of `ggml_type`: gguf-py's quantizers, and qtune's for the k-quants gguf-py cannot write."""
    import gguf

    if ggml_type.name in BLOCK_BYTES:
        return quantize_k(data, ggml_type.name)
    return gguf.quants.quantize(data.astype(np.float32), ggml_type)


def add_special_tokens(writer, merged_dir: Path, tokenizer, merges: list[str] | None) -> None:
    """Merges, special token ids, add-bos/eos flags and the chat template, through gguf-py's own SpecialVocab (as
    llama.cpp's converter does). Where tokenizer_config.json does not say whether BOS / EOS are added (transformers 5
    often leaves add_bos_token out), the tokenizer is asked: what it does to "a" is what llama.cpp must do."""
    import gguf

    special = gguf.SpecialVocab(merged_dir, load_merges=False, n_vocab=len(tokenizer))
    if merges:
        special.merges = merges  # the vocabulary's own merges, already read (gpt2-style vocabularies only)
    for kind in ("bos", "eos", "pad", "unk"):  # a special token that is not an added token is not found by SpecialVocab
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            special.special_token_ids.setdefault(kind, token_id)
    probe = tokenizer("a").input_ids
    special.add_special_token.setdefault("bos", bool(probe) and probe[0] == tokenizer.bos_token_id)
    special.add_special_token.setdefault("eos", bool(probe) and probe[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template and special.chat_template is None:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    for end_of_turn in ("<|im_end|>", "<end_of_turn>", "<|end|>", "<|eot_id|>"):  # chatml, Gemma, Phi-3, Llama 3
        if end_of_turn in tokenizer.get_vocab():
            writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(end_of_turn))
            break
