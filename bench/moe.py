"""Mixtures of experts in 4 bits, measured on this machine (qtune.modeling.moe), each part in its own process:

bytes    the bytes a loaded MoE's experts hold per weight (packed NF4, absmax, double quantization's constants)
load     the load's peak anonymous memory: experts quantized while loading (qtune) against loading them in 16 bits
         and quantizing after (what quantizing after transformers' load costs), and the plan's figure for each
step     a training step of a tiny Qwen3-MoE (8 experts, 2 per token) against a dense Qwen3 with the same active
         MLP width, through `qtune train`: seconds per step and tokens/s
llama    llama.cpp (llama-cpp-python) against transformers on pretrained tiny Qwen3-MoE, Mixtral and OLMoE models
         written by qtune's GGUF writer: max |Δlogit| and top-1 agreement per quantization

  python bench/moe.py [--parts bytes,load,step,llama] [--out bench/results/moe.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def anon_rss() -> int:
    """This process's anonymous resident memory (file-backed pages, such as a mapped checkpoint, left out)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """The largest anon_rss() seen, sampled every 5 ms on a thread."""

    def __init__(self):
        self.peak, self.running = anon_rss(), True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        """Samples until stopped."""
        while self.running:
            self.peak = max(self.peak, anon_rss())
            time.sleep(0.005)

    def stop(self) -> int:
        """The peak seen."""
        self.running = False
        self.thread.join()
        return max(self.peak, anon_rss())


def recipe_for(model: Path, data: Path, out: Path, **train) -> Path:
    """A small recipe on `model` at `out`/recipe.yaml."""
    from helpers import recipe_dict, write_recipe

    raw = recipe_dict(model, data, out / "run", train={"save_steps": 1000, "eval_steps": 1000, **train})
    raw["data"]["val_size"] = 0
    return write_recipe(out / "recipe.yaml", raw)


def part_bytes(work: Path) -> dict:
    """Bits per expert weight of a loaded Qwen3-MoE with 512 x 512 experts."""
    import torch
    from helpers import recipe_dict
    from test_moe import expert_layers, held_bytes

    from qtune.config.recipe import validate_recipe
    from qtune.demo.tiny_models import build_model, build_tokenizer
    from qtune.modeling.load import load_base

    model = build_model("qwen3_moe", build_tokenizer(), hidden=512, intermediate=1024, layers=2, heads=4, kv_heads=2)
    model.save_pretrained(work / "bytes")
    recipe = validate_recipe(recipe_dict(work / "bytes", work / "d.jsonl", work / "run"))
    layers = expert_layers(load_base(recipe.model, recipe.quant, torch.float32))
    weights = sum(layer.in_features * layer.out_features for layer in layers)
    return {
        "expert_weights": weights,
        "held_bytes": held_bytes(layers),
        "bits_per_weight": 8 * held_bytes(layers) / weights,
    }


def load_once(folder: str, streamed: bool) -> None:
    """(in a child process) Loads `folder` with its experts quantized while loading or after; prints the peak."""
    import torch
    from helpers import recipe_dict
    from transformers import AutoModelForCausalLM

    from qtune.config.recipe import validate_recipe
    from qtune.modeling.load import load_base
    from qtune.modeling.moe.experts import quantize_experts
    from qtune.modeling.precision import bnb_config

    baseline = anon_rss()
    sampler = PeakSampler()
    if streamed:
        recipe = validate_recipe(recipe_dict(folder, "d.jsonl", "run"))
        load_base(recipe.model, recipe.quant, torch.float32)
    else:
        quantization = bnb_config("nf4", double_quant=True, compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.float32)
        quantize_experts(model, quantization, torch.float32)
    print(json.dumps({"peak_bytes": sampler.stop() - baseline}))


def part_load(work: Path) -> dict:
    """The load's peak anonymous memory of an MoE whose experts are 400 MB in fp32, both ways, and the plan's."""
    from qtune.demo.tiny_models import build_model, build_tokenizer
    from qtune.modeling.config import load_config
    from qtune.planning.memory import inventory, weight_memory

    folder = work / "load"
    model = build_model("qwen3_moe", build_tokenizer(), hidden=512, intermediate=1024, layers=8, heads=4, kv_heads=2,
                        config_extra={"num_experts": 16})  # fmt: skip
    model.save_pretrained(folder)
    del model
    inv = inventory(load_config(folder))
    result = {
        "experts_fp32_bytes": inv.expert_parameters * 4,
        "planned_nf4_dq_bytes": weight_memory(inv, "nf4_dq", unquantized_bytes_per_param=4).total_bytes,
        "fp32_bytes": inv.total * 4,
    }
    for label, streamed in (("streamed", True), ("quantized_after", False)):
        done = subprocess.run(
            [sys.executable, __file__, "--load-once", str(folder), "--streamed", str(int(streamed))],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        result[f"{label}_peak_bytes"] = json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]
    return result


def part_step(work: Path) -> dict:
    """`qtune train` 20 steps on a tiny Qwen3-MoE and on a dense Qwen3 of the same active width."""
    from qtune.demo.tiny_models import build_model, build_tokenizer, write_demo_data

    tokenizer = build_tokenizer()
    data = write_demo_data(work / "step-data.jsonl", count=400)
    shapes = {
        "moe": ("qwen3_moe", {"config_extra": {"num_experts": 8, "moe_intermediate_size": 256}}),
        "dense": ("qwen3", {"intermediate": 512}),
    }
    result = {}
    for label, (family, extra) in shapes.items():
        model = build_model(family, tokenizer, hidden=256, layers=4, heads=4, kv_heads=2,
                            **{"intermediate": 512, **extra})  # fmt: skip
        model.save_pretrained(work / label)
        tokenizer.save_pretrained(work / label)
        parameters = sum(p.numel() for p in model.parameters())
        out = work / f"{label}-out"
        out.mkdir()
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "qtune", "train", str(recipe_for(work / label, data, out,
                               max_steps=20, micro_batch_size=4))], capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        metrics = json.loads((out / "run" / "metrics.json").read_text())
        result[label] = {
            "parameters": parameters,
            "seconds_per_step": metrics["train_seconds"] / 20,
            "tokens_per_second": metrics["tokens_per_second"],
            "wall_seconds": round(time.perf_counter() - started, 1),
            "router_aux_loss": metrics.get("router_aux_loss"),
        }
    result["moe_over_dense_step_time"] = result["moe"]["seconds_per_step"] / result["dense"]["seconds_per_step"]
    return result


def part_llama(work: Path) -> dict:
    """llama.cpp against transformers, per family and quantization, on pretrained tiny models."""
    import llama_cpp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.demo.tiny_models import write_tiny_model
    from qtune.evaluation.metrics import DECISIVE_MARGIN
    from qtune.export.formats.gguf.writer import write_gguf

    text = "Below is an instruction that describes a task.\n\n### Instruction:\nReverse the word.\n\n### Input:\napple"
    rows = {}
    for family in ("qwen3_moe", "mixtral", "olmoe", "gpt_oss"):
        folder = write_tiny_model(work / family, family, pretrain_steps=60, hidden=64, intermediate=128, layers=2,
                                  heads=2, kv_heads=1)  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer(text).input_ids
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            reference = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        top2 = np.sort(reference, axis=-1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > DECISIVE_MARGIN
        for quant in ("F16", "Q8_0", "Q4_K_M"):
            path = write_gguf(folder, work / f"{family}-{quant}.gguf", quant)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)
            llm.eval(ids)
            logits = np.array(llm.eval_logits)
            rows[f"{family} {quant}"] = {
                "max_abs_logit_diff": float(np.abs(logits - reference).max()),
                "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1))[decisive].mean()),
                "positions": int(decisive.sum()),
                "file_bytes": path.stat().st_size,
            }
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="bytes,load,step,llama")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "moe.json")
    parser.add_argument("--load-once", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--streamed", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_once:
        load_once(args.load_once, bool(args.streamed))
        return 0
    import torch

    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["environment"] = {
        "cpu": next(
            (
                x.split(":", 1)[1].strip()
                for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")
            ),
            platform.processor(),
        ),  # fmt: skip
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    parts = {"bytes": part_bytes, "load": part_load, "step": part_step, "llama": part_llama}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.parts.split(","):
            started = time.perf_counter()
            results[name] = parts[name](Path(folder))
            print(f"{name} ({time.perf_counter() - started:.0f} s): {json.dumps(results[name], indent=1)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
