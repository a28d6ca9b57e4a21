"""GGUF k-quants written in-process: the blocks (read back by gguf's own dequantizer), llama.cpp's rules for which
tensor gets which type, and the files end to end. The comparison with llama.cpp's own quantizer is in the slow set
(it needs llama-cpp-python)."""

import json

import gguf
import numpy as np
import pytest
from helpers import train_run

from qtune.export.formats.gguf.kquants import BLOCK_BYTES, quantize_k
from qtune.export.formats.gguf.tensor_types import more_bits, tensor_types

K_TYPES = ("Q4_K", "Q5_K", "Q6_K")


def round_trip(values: np.ndarray, kind: str) -> np.ndarray:
    packed = quantize_k(values, kind)
    assert packed.dtype == np.uint8 and packed.shape == (
        *values.shape[:-1],
        values.shape[-1] // 256 * BLOCK_BYTES[kind],
    )
    return gguf.quants.dequantize(packed, getattr(gguf.GGMLQuantizationType, kind))


def rms(a, b) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


def test_more_bits_should_reconstruct_better_and_every_kind_beats_q4_0():
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((32, 1024)) * rng.uniform(0.01, 0.05, (32, 1))).astype(np.float32)
    errors = {kind: rms(round_trip(weights, kind), weights) for kind in K_TYPES}
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    errors["Q4_0"] = rms(gguf.quants.dequantize(gguf.quants.quantize(weights, q4_0), q4_0), weights)
    print(errors)
    assert errors["Q6_K"] < errors["Q5_K"] / 1.8 < errors["Q4_K"] / 3.2
    assert errors["Q4_K"] < 0.9 * errors["Q4_0"]


@pytest.mark.parametrize("kind", K_TYPES)
def test_all_zero_constant_and_outlier_blocks(kind):
    blocks = np.zeros((6, 256), dtype=np.float32)
    blocks[1] = 0.25  # constant, positive
    blocks[2] = -0.5  # constant, negative
    blocks[3] = blocks[4] = np.linspace(-1, 1, 256)
    blocks[3, 17] = 40.0  # an outlier
    blocks[5, :32] = 1e-20  # below the reference's all-zero threshold in one sub-block
    back = round_trip(blocks, kind)
    assert (quantize_k(blocks[:1], kind) == 0).all()  # an all-zero block is all zero bytes, as llama.cpp writes it
    assert np.abs(back[0]).max() == 0
    assert np.abs(back[1] - 0.25).max() < 1e-3 and np.abs(back[2] + 0.5).max() < 1e-3
    assert abs(back[3, 17] - 40.0) < 0.5
    # the outlier coarsens its own super-block only: the same values beside it stay within half a step of a grid
    # spanning their whole range (2), and several times closer than in the outlier's super-block
    levels = {"Q4_K": 15, "Q5_K": 31, "Q6_K": 63}[kind]
    assert np.abs(back[4] - blocks[4]).max() <= 1 / levels
    assert np.abs(back[3] - blocks[3]).max() > 5 * np.abs(back[4] - blocks[4]).max()
    assert np.isfinite(back).all() and np.abs(back[5]).max() < 1e-6


@pytest.mark.parametrize("kind", K_TYPES)
def test_a_block_already_on_the_grid_comes_back_almost_exactly(kind):
    """Values that are themselves a dequantized block of this type: quantizing them again must find (nearly) the
    same grid. A wrong bit layout, scale packing or sign would scramble them instead."""
    rng = np.random.default_rng(1)
    first = round_trip((rng.standard_normal((16, 256)) * 0.02).astype(np.float32), kind)
    second = round_trip(first.astype(np.float32), kind)
    once = rms(first, (rng.standard_normal((16, 256)) * 0.02).astype(np.float32))
    assert rms(second, first) < 0.05 * once


def test_rows_that_do_not_split_into_super_blocks_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(np.zeros((2, 64), dtype=np.float32), "Q4_K")


# --------------------------------------------------------------------------- which tensor gets which type


def llama_layout(layers: int, hidden: int, tied: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    tensors = [("token_embd.weight", (512, hidden))]
    for i in range(layers):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (hidden,)),
            (f"blk.{i}.attn_q.weight", (hidden, hidden)),
            (f"blk.{i}.attn_k.weight", (hidden // 2, hidden)),
            (f"blk.{i}.attn_v.weight", (hidden // 2, hidden)),
            (f"blk.{i}.attn_output.weight", (hidden, hidden)),
            (f"blk.{i}.ffn_gate.weight", (2 * hidden, hidden)),
            (f"blk.{i}.ffn_up.weight", (2 * hidden, hidden)),
            (f"blk.{i}.ffn_down.weight", (hidden, 2 * hidden)),
        ]
    tensors.append(("output_norm.weight", (hidden,)))
    if not tied:
        tensors.append(("output.weight", (512, hidden)))
    return tensors


def test_q4_k_m_follows_llama_cpp_rules():
    layout = llama_layout(8, 256)
    types = dict(zip([n for n, _ in layout], tensor_types(layout, "Q4_K_M")))
    richer = [i for i in range(8) if more_bits(i, 8)]
    assert richer == [0, 3, 6, 7]  # the first and last eighth, and every third layer between
    for i in range(8):
        expected = "Q6_K" if i in richer else "Q4_K"
        assert types[f"blk.{i}.attn_v.weight"] == types[f"blk.{i}.ffn_down.weight"] == expected
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_up.weight"] == "Q4_K"
        assert types[f"blk.{i}.attn_norm.weight"] == "F32"
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    tied = dict(
        zip([n for n, _ in llama_layout(8, 256, tied=True)], tensor_types(llama_layout(8, 256, True), "Q4_K_M"))
    )
    assert tied["token_embd.weight"] == "Q6_K"  # tied embeddings serve as the output matrix


def test_formats_and_fallbacks_for_rows_that_do_not_fit():
    layout = llama_layout(2, 64)  # 64 columns: no 256-value super-block fits
    for mix, expected_q, expected_down, expected_output in (
        ("Q4_K_M", "Q5_0", "Q8_0", "Q8_0"),  # Q4_K falls back to Q5_0; the Q6_K layers to Q8_0
        ("Q5_K_M", "Q5_1", "Q8_0", "Q8_0"),
        ("Q6_K", "Q8_0", "Q8_0", "Q8_0"),
        ("Q4_0", "Q4_0", "Q4_0", "Q8_0"),  # llama.cpp gives the output Q6_K, which falls back to Q8_0 here
        ("Q8_0", "Q8_0", "Q8_0", "Q8_0"),
        ("F16", "F16", "F16", "F16"),
    ):
        types = dict(zip([n for n, _ in layout], tensor_types(layout, mix)))
        assert types["blk.1.attn_q.weight"] == expected_q, mix
        assert types["blk.1.ffn_down.weight"] == expected_down, mix  # layer 1 of 2 is a last eighth
        assert types["output.weight"] == expected_output, mix
    odd = [("blk.0.attn_q.weight", (48, 48)), ("output.weight", (512, 48))]
    assert tensor_types(odd, "Q4_K_M") == ["F16", "F16"]  # nothing fits 48 columns but F16


# --------------------------------------------------------------------------- files end to end


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory, alpaca_file):
    """A run on a pretrained Llama 256 wide, so every matrix takes the k-quant itself rather than a fallback."""
    from qtune.demo.tiny_models import write_tiny_model

    base = write_tiny_model(
        tmp_path_factory.mktemp("models") / "wide", "llama", pretrain_steps=40, hidden=256, intermediate=512, layers=4
    )
    return train_run(tmp_path_factory, base, alpaca_file, "wide-run")


def test_k_quant_files_are_read_back_and_rank_as_their_bits(wide_run, tmp_path, run_cli):
    formats = ["merged_fp16", "gguf_q8_0", "gguf_q6_k", "gguf_q5_k_m", "gguf_q4_k_m", "gguf_q4_0"]
    code, _, stderr = run_cli("export", wide_run, "--out", tmp_path, *[x for f in formats for x in ("--format", f)])
    assert code == 0, stderr
    rows = json.loads((tmp_path / "export_report.json").read_text())["artifacts"]
    kl = {name: rows[name]["mean_kl"] for name in rows}
    print({name: (f"{kl[name]:.2e}", rows[name]["top1_agreement"]) for name in rows})
    assert kl["gguf_q8_0"] < kl["gguf_q6_k"] < kl["gguf_q5_k_m"] < min(kl["gguf_q4_k_m"], kl["gguf_q4_0"])
    # Not asserted here: Q4_K_M against Q4_0. On this tiny model Q4_K_M's weights are closer (relative RMS 0.069
    # against 0.089) but its KL is larger (8.8e-3 against 5.0e-3), for a reason not found yet. On the real Gemma 3
    # 270M (the slow test in tests/test_families.py) Q4_K_M is far closer than Q4_0 (KL 0.40 against 1.30).
    assert kl["gguf_q6_k"] < 0.1 * kl["gguf_q4_k_m"]  # Q6_K is near Q8_0, far from the 4-bit formats
    assert rows["gguf_q6_k"]["top1_agreement"] >= 0.97
    sizes = {name: rows[name]["size_bytes"] for name in rows}
    assert sizes["gguf_q8_0"] > sizes["gguf_q6_k"] > sizes["gguf_q5_k_m"] > sizes["gguf_q4_k_m"]

    reader = gguf.GGUFReader(tmp_path / "model-q4_k_m.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.3.attn_v.weight"] == "Q6_K" and types["blk.1.attn_v.weight"] == "Q4_K"  # 4 layers: 2, 3 get more
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_norm.weight"] == "F32"
    assert int(reader.fields["general.file_type"].parts[-1][0]) == gguf.LlamaFileType.MOSTLY_Q4_K_M
    token_types = reader.fields["tokenizer.ggml.token_type"]  # llama.cpp refuses a file whose token types are not ints
    assert token_types.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert (tmp_path / "model-q4_k_m.gguf.Modelfile").is_file()
