"""qtune's in-process GGUF k-quants against llama.cpp's own quantizer (llama-cpp-python), side by side.

Both start from the same weights: qtune writes each format straight from the merged safetensors folder (what
`qtune export` does), llama.cpp quantizes qtune's F16 GGUF of that folder (what a user would do with
llama-quantize). Both run in this process after a warm-up, so neither pays for imports; llama.cpp gets every
core (`nthread`), qtune uses torch's threads. Nothing is downloaded: the model is a Llama with TinyLlama-1.1B's
layer shape (hidden 2048, FFN 5632, 32 heads, 4 KV heads) and random weights, --layers of them.

    pip install llama-cpp-python   # the real llama.cpp; a source build of ~8 minutes on 2 cores
    python bench/gguf_quantize.py [--layers 4] [--repeats 3] [--formats Q4_K_M,Q5_K_M,Q6_K]

Per format: median seconds of each, the ratio qtune / llama.cpp, and how the two files compare tensor by tensor:
the ggml type of each tensor (must be the same), and qtune's reconstruction error (RMS against the F16 weights)
over llama.cpp's (mean and worst tensor). Writes bench/results/gguf_quantize.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
LLAMA_FILE_TYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "Q4_0": 2}


def build(folder: Path, layers: int) -> int:
    sys.path.insert(0, str(BENCH))
    from merge_memory import build_base

    return build_base(folder, layers, unit_norms=True)


def quantize_with_llama_cpp(source: Path, target: Path, file_type: int, threads: int) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = threads
    start = time.perf_counter()
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    elapsed = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"llama.cpp's quantizer failed ({code}) on {source}")
    return elapsed


def quantize_with_qtune(merged: Path, target: Path, mix: str) -> float:
    from qtune.export.formats.gguf.writer import write_gguf

    start = time.perf_counter()
    write_gguf(merged, target, mix)
    return time.perf_counter() - start


def compare(reference_f16: Path, ours: Path, theirs: Path) -> dict:
    """Per tensor: same ggml type in both files, and the RMS error of each against the F16 weights."""
    import gguf
    import numpy as np

    def tensors(path):
        return {t.name: t for t in gguf.GGUFReader(path).tensors}

    def values(tensor):
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(-1)

    original, mine, llama = tensors(reference_f16), tensors(ours), tensors(theirs)
    mismatched = [n for n in llama if n not in mine or mine[n].tensor_type != llama[n].tensor_type]
    ratios = {}
    for name, tensor in llama.items():
        if tensor.tensor_type.name in ("F32", "F16") or name in mismatched:
            continue
        truth = values(original[name])
        error_ours = float(np.sqrt(np.mean((values(mine[name]) - truth) ** 2)))
        error_theirs = float(np.sqrt(np.mean((values(tensor) - truth) ** 2)))
        ratios[name] = error_ours / error_theirs if error_theirs else 1.0
    types = {}
    for tensor in llama.values():
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return {
        "tensors": len(llama),
        "type_mismatches": mismatched,
        "types": types,
        "error_ratio_mean": statistics.mean(ratios.values()),
        "error_ratio_worst": max(ratios.values()),
        "worst_tensor": max(ratios, key=ratios.get),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", default="Q4_K_M,Q5_K_M,Q6_K")
    parser.add_argument("--work", type=Path, default=None, help="keep the model and files here")
    args = parser.parse_args()
    import torch

    threads = os.cpu_count() or 1
    work = args.work or Path(tempfile.mkdtemp(prefix="qtune-gguf-bench-"))
    merged = work / "merged"
    if not (merged / "config.json").exists():
        print(f"building a {args.layers}-layer TinyLlama-shaped model with random weights in {merged} ...")
        build(merged, args.layers)
    f16 = work / "model-f16.gguf"
    quantize_with_qtune(merged, f16, "F16")  # also the warm-up: imports and the tokenizer are loaded once
    parameters = sum(int(t.n_elements) for t in __import__("gguf").GGUFReader(f16).tensors)
    print(f"{parameters / 1e6:.0f}M parameters; llama.cpp threads {threads}, torch threads {torch.get_num_threads()}")

    results = {"parameters": parameters, "threads": threads, "torch_threads": torch.get_num_threads(), "formats": {}}
    for mix in args.formats.split(","):
        ours, theirs = work / f"qtune-{mix}.gguf", work / f"llama-{mix}.gguf"
        quantize_with_llama_cpp(f16, theirs, LLAMA_FILE_TYPES[mix], threads)  # warm-up of its code path
        qtune_times, llama_times = [], []
        for _ in range(args.repeats):  # alternating, so a slow spell of the machine hits both
            qtune_times.append(quantize_with_qtune(merged, ours, mix))
            llama_times.append(quantize_with_llama_cpp(f16, theirs, LLAMA_FILE_TYPES[mix], threads))
        row = {
            "qtune_s": statistics.median(qtune_times),
            "llama_cpp_s": statistics.median(llama_times),
            "qtune_runs_s": qtune_times,
            "llama_cpp_runs_s": llama_times,
            **compare(f16, ours, theirs),
        }
        row["ratio"] = row["qtune_s"] / row["llama_cpp_s"]
        results["formats"][mix] = row
        print(
            f"{mix:7s} qtune {row['qtune_s']:6.2f} s  llama.cpp {row['llama_cpp_s']:6.2f} s  ratio {row['ratio']:.2f}x  "
            f"types identical: {not row['type_mismatches']} ({row['types']})  error qtune/llama.cpp "
            f"mean {row['error_ratio_mean']:.4f}, worst {row['error_ratio_worst']:.4f}",
            flush=True,
        )
    out = BENCH / "results" / "gguf_quantize.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
