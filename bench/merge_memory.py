"""Peak memory and wall time of `qtune export --format merged_fp16` on a ~1B-parameter model.

Builds a TinyLlama-1.1B-shaped model with random fp16 weights and a random rank-16 LoRA adapter on
every linear layer (nothing downloaded), then runs the merge in a fresh process and reports its
peak RSS against the size of the fp16 output. Goal: peak RSS <= 1.5x the output.

    python bench/merge_memory.py [--work DIR] [--layers 22] [--keep]

Writes bench/results/merge_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MERGE_SCRIPT = """
import json, resource, sys, time
from qtune.export.formats.merged import write_merged
from qtune.core.folders import open_run
started = time.perf_counter()
run = open_run(sys.argv[1])
write_merged(run, __import__("pathlib").Path(sys.argv[2]), dtype_name="float16", merge_base="dequantized")
print(json.dumps({"seconds": time.perf_counter() - started,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def save_random_llama(folder: Path, shape: dict, *, unit_norms: bool = False) -> int:
    """A Llama of this LlamaConfig shape with random fp16 weights (std 0.02; norms at 1 if asked) and qtune's
    tiny tokenizer, saved to `folder`; returns the parameter count. Nothing is downloaded."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qtune.demo.tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if unit_norms and "norm" in name else param.normal_(0, 0.02)
    model.save_pretrained(folder, max_shard_size="1GB")
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def build_base(folder: Path, layers: int, *, unit_norms: bool = False) -> int:
    """A Llama of TinyLlama-1.1B's shape (32k vocabulary), `layers` deep, random weights."""
    return save_random_llama(
        folder,
        dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=layers,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        ),
        unit_norms=unit_norms,
    )


def build_run(run_dir: Path, base: Path, layers: int, rank: int = 16) -> None:
    import torch
    import yaml
    from safetensors.torch import save_file

    shapes = {
        "q_proj": (2048, 2048),
        "k_proj": (256, 2048),
        "v_proj": (256, 2048),
        "o_proj": (2048, 2048),
        "gate_proj": (5632, 2048),
        "up_proj": (5632, 2048),
        "down_proj": (2048, 5632),
    }
    tensors = {}
    generator = torch.Generator().manual_seed(1)
    for layer in range(layers):
        for name, (out_features, in_features) in shapes.items():
            group = "mlp" if name.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    adapter = run_dir / "adapter"
    adapter.mkdir(parents=True)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": 2 * rank,
                "use_rslora": False,
                "target_modules": list(shapes),
            }
        )
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (base / name).exists():
            shutil.copy(base / name, adapter / name)
    recipe = {
        "model": {"name": str(base)},
        "data": {"datasets": [{"path": "unused.jsonl", "format": "alpaca"}]},
        "train": {"output_dir": str(run_dir)},
    }
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--layers", type=int, default=22, help="22 = TinyLlama-1.1B")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="qtune-merge-bench-"))
    try:
        base, run_dir, out = work / "base", work / "run", work / "merged"
        started = time.perf_counter()
        params = build_base(base, args.layers)
        build_run(run_dir, base, args.layers)
        print(
            f"built a {params / 1e9:.2f}B-parameter base and a rank-16 adapter in {time.perf_counter() - started:.0f} s"
        )
        env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count()))
        result = subprocess.run(
            [sys.executable, "-c", MERGE_SCRIPT, str(run_dir), str(out)], capture_output=True, text=True, env=env
        )
        if result.returncode != 0:
            sys.exit(result.stderr[-3000:])
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        output_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        figures = {
            "parameters": params,
            "output_bytes": output_bytes,
            "peak_rss_bytes": measured["peak_rss_bytes"],
            "peak_rss_over_output": measured["peak_rss_bytes"] / output_bytes,
            "merge_seconds": measured["seconds"],
            "machine": f"{os.cpu_count()} CPU cores, no GPU",
        }
        print(
            f"merge: {measured['seconds']:.1f} s, peak RSS {measured['peak_rss_bytes'] / 2**30:.2f} GiB, "
            f"fp16 output {output_bytes / 2**30:.2f} GiB -> ratio {figures['peak_rss_over_output']:.2f} (goal <= 1.5)"
        )
        results = Path(__file__).parent / "results"
        results.mkdir(exist_ok=True)
        (results / "merge_memory.json").write_text(json.dumps(figures, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
