"""The GPU proof kit: what qtune claims about a CUDA GPU, measured in one run, on one machine, with no network.

It builds every model it needs with random weights (a Llama-3.1-8B shape, saved once in bitsandbytes 4-bit as the
`*-bnb-4bit` repos are, and a Llama-3.2-1B shape), qtune's own tokenizer and synthetic data, then drives the real
`qtune` commands (and bench/hf_baseline.py, the plain Hugging Face QLoRA recipe) in fresh processes:

  t4_fp16        the 8B shape in fp16 with the process capped at 15 GiB (a T4): finite, falling loss, fp16 steps the
                 scaler skipped, then checkpoint + resume on the GPU against the uninterrupted run
  bf16_8b        the same in bf16
  context_8b     the longest max_length that trains in 15 GiB: qtune (activation offloading as its plan decides)
                 against the baseline, one step per try
  side_by_side   the 1B shape, qtune and the baseline alternating: tokens/s, peak memory, eval loss, ratios
  export_1b      merged fp16, NF4 and GGUF from the 1B run on the GPU: merge memory and the fidelity table
  nan_fp16       an injected NaN loss on the GPU: exit 6, the last good checkpoint kept
  moe_30b_a3b    Qwen3-30B-A3B's shape (8 of its 48 layers), experts in 4 bits, 4,096 tokens: peak against the plan,
                 tokens/s, and the whole model's peak by the plan
and, for every run, the plan's predicted peak against torch.cuda.max_memory_allocated, and MFU (FLOPs per token as
bench/throughput.py counts them, over this GPU's measured matmul rate).

    python bench/gpu_check.py [--out DIR] [--budget-s 480]    on a CUDA machine (DIR defaults to $OUT, else ./gpu-check)
    python bench/gpu_check.py --dry-run --out DIR             the same code path on a CPU, tiny shapes (in the tests)
    bash bench/gpu_check.sh                                   the device machine here: carried wheels, then the kit

Writes gpu_check.json, gpu_check.md and gpu_check.log into DIR as each section ends, so a run cut short keeps what
it measured. Sections run in order of importance and are skipped, said so, when the time budget is spent.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

from qtune.core.checkpoints import MANIFEST  # noqa: E402  (after the path: the kit runs from a source tree too)

GIB = 2**30
T4_GIB = 15.0
T4_FP16_FLOPS = 65e12  # a T4's fp16 tensor-core peak (datasheet)
LLAMA_31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
LLAMA_32_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
SECTIONS = (
    "t4_fp16", "context_8b", "side_by_side_1b", "export_1b", "bf16_8b", "nan_fp16", "grpo_1b", "moe_30b_a3b",
    "fsdp_2gpu",
)  # fmt: skip
# Qwen3-30B-A3B's shape (tests/model_configs/qwen3-30b-a3b); the kit builds MOE_LAYERS of its 48 layers and scales the
# measured peak to all of them by the plan
QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
    num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
    head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, router_aux_loss_coef=0.001,
)  # fmt: skip
MOE_LAYERS = 8
TINY_MOE = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_experts=8,
    num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    head_dim=32, max_position_embeddings=4096,
)  # fmt: skip
TINY = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=4096,
)  # fmt: skip


# --------------------------------------------------------------------------- the capped process (--exec)


class CappedProperties:
    """torch.cuda.get_device_properties with total_memory capped: qtune's plan and `auto` decisions see a T4."""

    def __init__(self, real, cap_bytes: int):
        self._real, self.total_memory = real, cap_bytes

    def __getattr__(self, name):
        return getattr(self._real, name)


def exec_capped(cap_gib: float | None, command: list[str]) -> None:
    """Run `-m module args` or `script args` in this process, its CUDA memory capped, and print the peaks at exit."""
    import resource

    if command[:2] == ["-m", "qtune"]:  # what qtune's CLI sets before CUDA starts, and this process starts it first
        from qtune.core.cuda_setup import use_expandable_segments

        use_expandable_segments()
    import torch

    if torch.cuda.is_available():
        torch.cuda.init()
        if cap_gib:
            real = torch.cuda.get_device_properties(0)
            torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / real.total_memory, 0)
            capped = CappedProperties(real, int(cap_gib * GIB))
            torch.cuda.get_device_properties = lambda device=None: capped

    def report():
        peak = {"rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if torch.cuda.is_available():
            peak["cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
            peak["cuda_reserved_bytes"] = torch.cuda.max_memory_reserved()
        print("GPU_CHECK_PEAK " + json.dumps(peak), flush=True)

    atexit.register(report)
    if command[0] == "-m":
        sys.argv = [command[1], *command[2:]]
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(command)
        runpy.run_path(command[0], run_name="__main__")


# --------------------------------------------------------------------------- models and data, built here


def build_base(folder: Path, shape: dict, device: str, model_type: str = "llama") -> int:
    """A model of `model_type` and `shape` (a Llama unless said) with random bf16 weights (std 0.02, norms at 1) and
    qtune's tokenizer; returns parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qtune.demo.tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = AutoConfig.for_model(model_type, **shape, **ids)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if "norm" in name else param.normal_(0, 0.02)
    model.save_pretrained(folder, max_shard_size="2GB")
    tokenizer.save_pretrained(folder)
    count = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return count


def save_in_4bit(source: Path, target: Path, device: str) -> None:
    """The base as the `*-bnb-4bit` Hub repos hold it: quantized once on load, saved packed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=quantization, device_map={"": 0 if device == "cuda" else "cpu"}
    )
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def long_text(tokens: int) -> str:
    """A text of at least `tokens` tokens of qtune's tokenizer (every word is one token or more)."""
    from qtune.demo.tiny_models import WORDS

    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens))


# --------------------------------------------------------------------------- the kit


class Kit:
    def __init__(self, out: Path, work: Path, budget_s: float, dry_run: bool):
        import torch

        self.out, self.work, self.dry_run = out, work, dry_run
        self.started = time.perf_counter()
        self.deadline = self.started + budget_s
        self.on_gpu = torch.cuda.is_available() and not dry_run
        self.device = "cuda" if self.on_gpu else "cpu"
        self.cap_gib = T4_GIB if self.on_gpu else None
        self.results: dict = {"dry_run": dry_run, "sections": {}}
        self.context_from = self.baseline_from = None  # --context-from, --baseline-from
        self.context_tries = 2
        self.log = (out / "gpu_check.log").open("a")

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    @contextmanager
    def section(self, name: str, needs_s: float):
        entry = {"status": "skipped", "seconds": 0.0}
        self.results["sections"][name] = entry
        if self.left() < needs_s:
            entry["why"] = f"{self.left():.0f} s left of the budget, the section needs about {needs_s:.0f}"
            self.say(f"[{name}] skipped: {entry['why']}")
            self.save()
            yield None
            return
        started = time.perf_counter()
        entry["status"] = "running"
        self.say(f"[{name}] start ({self.left():.0f} s left)")
        try:
            yield entry
            entry["status"] = "ok" if entry["status"] == "running" else entry["status"]
        except (Exception, SystemExit) as e:  # one section's failure must not cost the others
            entry["status"] = "failed"
            entry["error"] = f"{type(e).__name__}: {e}"[:2000]
            self.log.write(traceback.format_exc())
        entry["seconds"] = round(time.perf_counter() - started, 1)
        self.say(f"[{name}] {entry['status']} in {entry['seconds']} s")
        self.save()

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def save(self) -> None:
        self.results["elapsed_seconds"] = round(time.perf_counter() - self.started, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str))
        (self.out / "gpu_check.md").write_text(markdown(self.results))

    def run(self, command: list[str], *, cap: bool, env: dict | None = None, timeout: float | None = None) -> dict:
        """A command in a fresh, capped process: exit code, the peaks it printed, the last lines it wrote."""
        argv = [sys.executable, str(Path(__file__).resolve()), "--exec"]
        if cap and self.cap_gib:
            argv += ["--cap-gib", str(self.cap_gib)]
        argv += ["--", *command]
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        environment.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if not self.on_gpu:
            environment["CUDA_VISIBLE_DEVICES"] = ""
        environment.update(env or {})
        limit = max(10.0, min(timeout or 1e9, self.left() - 5))
        started = time.perf_counter()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, env=environment, timeout=limit, cwd=self.work)
            code, stdout, stderr = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as e:
            code, stdout, stderr = "timeout", (e.stdout or b"").decode(errors="replace"), ""
        seconds = time.perf_counter() - started
        self.log.write(f"$ {' '.join(command)}\nexit {code} in {seconds:.1f} s\n{stderr[-4000:]}\n")
        peak = {}
        for line in stdout.splitlines():
            if line.startswith("GPU_CHECK_PEAK "):
                peak = json.loads(line.removeprefix("GPU_CHECK_PEAK "))
        last_error = next((x for x in reversed(stderr.splitlines()) if x.startswith("qtune: error:")), None)
        out_of_memory = "OutOfMemoryError" in stderr or "out of GPU memory" in stderr or "CUDA out of memory" in stderr
        return dict(code=code, seconds=seconds, peak=peak, stdout=stdout, stderr_tail=stderr[-1500:],
                    error_line=last_error, out_of_memory=out_of_memory)  # fmt: skip

    def qtune(self, *args, cap: bool = True, env: dict | None = None, timeout: float | None = None) -> dict:
        return self.run(["-m", "qtune", *[str(a) for a in args]], cap=cap, env=env, timeout=timeout)


# --------------------------------------------------------------------------- recipes and measurements


def recipe(model: Path, output_dir: Path, data: dict, **train) -> dict:
    settings = {
        "output_dir": str(output_dir),
        "max_steps": 8,
        "micro_batch_size": 2,
        "grad_accum": 2,
        "lr": 1e-3,
        "warmup_ratio": 0.1,
        "save_steps": 10_000,
        "logging_steps": 1,
        "optimizer": "paged_adamw_8bit",
    }
    settings.update(train)
    quant = {"compute_dtype": settings.pop("compute_dtype", "auto")}
    return {
        "model": {"name": str(model)},
        "quant": quant,
        "lora": {"r": 16, "alpha": 32, "dropout": settings.pop("lora_dropout", 0.05)},
        "data": data,
        "train": settings,
    }


def write_recipe(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def planned_bytes(raw: dict, budget_gib: float | None, device: str, decided: dict | None = None) -> dict:
    """qtune's plan for a recipe, with the budget `qtune train` gives its `auto` decisions (80% of the GPU), or with
    the decisions a finished run recorded in metrics.json (`decided`)."""
    from qtune.config.recipe import validate_recipe
    from qtune.planning.plan import plan_training
    from qtune.training.arguments import AUTO_GPU_SHARE

    raw = json.loads(json.dumps(raw))
    for key in ("gradient_checkpointing", "offload_activations"):
        if decided and decided.get(key) is not None:
            raw["train"][key] = decided[key]
    return plan_training(
        validate_recipe(raw),
        device=device,
        compute_bytes=4 if device == "cpu" else 2,
        budget_bytes=int(budget_gib * GIB * AUTO_GPU_SHARE) if budget_gib else None,
    )


def step_losses(run_dir: Path) -> dict[int, float]:
    """Training loss per optimizer step, from the newest checkpoint's trainer_state.json."""
    states = sorted(
        (run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json"),
        key=lambda p: int(p.parent.name.split("-")[1]),
    )
    if not states:
        return {}
    history = json.loads(states[-1].read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def mfu(
    shape: dict, tokens_per_second: float | None, mean_context: float, recompute: bool, rate: float
) -> float | None:
    from throughput import flops_per_token

    if not tokens_per_second:
        return None
    return flops_per_token(shape, mean_context, recompute) * tokens_per_second / rate


def train_figures(kit: Kit, raw: dict, result: dict, shape: dict, mean_context: float) -> dict:
    """What one `qtune train` run showed: losses, memory against the plan, speed and MFU."""
    run_dir = Path(raw["train"]["output_dir"])
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    plan = planned_bytes(raw, kit.cap_gib, kit.device, decided=metrics)
    # training's peak (qtune counts it apart from loading's on a GPU): what the plan predicts
    peak = metrics.get("peak_memory_bytes") or result["peak"].get("cuda_allocated_bytes")
    figures = {
        "exit": result["code"],
        "error": result["error_line"],
        "seconds": round(result["seconds"], 1),
        "train_seconds": metrics.get("train_seconds"),
        "tokens_per_second": metrics.get("tokens_per_second"),
        "eval_loss_before": metrics.get("eval_loss_before"),
        "eval_loss": metrics.get("eval_loss"),
        "skipped_steps": metrics.get("skipped_steps"),
        "gradient_checkpointing": metrics.get("gradient_checkpointing"),
        "offload_activations": metrics.get("offload_activations"),
        "compute_dtype": metrics.get("compute_dtype"),
        "peak_bytes": peak,
        "loading_peak_bytes": metrics.get("peak_memory_loading_bytes"),
        "process_peak_bytes": result["peak"].get("cuda_allocated_bytes"),
        "planned_bytes": plan["total_bytes"],
        "plan_error": (plan["total_bytes"] / peak - 1) if peak else None,
        "losses": step_losses(run_dir),
    }
    figures["mfu"] = mfu(
        shape,
        figures["tokens_per_second"],
        mean_context,
        bool(figures["gradient_checkpointing"]),
        kit.results["matmul_flops"],
    )
    return figures


# --------------------------------------------------------------------------- sections


def section_environment(kit: Kit) -> None:
    import torch
    from throughput import matmul_rate

    with kit.section("environment", 5) as entry:
        if entry is None:
            return
        import bitsandbytes
        import peft
        import transformers
        import trl

        entry["torch"], entry["transformers"] = torch.__version__, transformers.__version__
        entry["peft"], entry["trl"], entry["bitsandbytes"] = peft.__version__, trl.__version__, bitsandbytes.__version__
        if kit.on_gpu:
            props = torch.cuda.get_device_properties(0)
            entry["gpu"], entry["gpu_memory_gib"] = props.name, round(props.total_memory / GIB, 1)
            entry["cuda"] = torch.version.cuda
        else:
            entry["gpu"] = f"none (dry run on {os.cpu_count()} CPU cores)"
        kit.results["matmul_flops"] = matmul_rate(seconds=1.0)
        entry["matmul_tflops"] = round(kit.results["matmul_flops"] / 1e12, 2)
        entry["sdpa_packed_rows"] = sdpa_backends_for_packed_rows(kit.device)


def sdpa_backends_for_packed_rows(device: str) -> dict:
    """Which attention kernels run a packed row (a block-diagonal causal mask, 8B-shape heads, fp16 on a GPU), and
    the peak memory of its forward and backward with each: the first suspect for the plan's -20% on short packed
    rows on the GPU. On a CPU (the dry run) only which kernels run."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    on_gpu = device == "cuda"
    tokens, heads, dim = (512, 32, 128) if on_gpu else (64, 2, 16)
    dtype = torch.float16 if on_gpu else torch.bfloat16
    q, k, v = (torch.randn(1, heads, tokens, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    sample = torch.arange(tokens, device=device) // (tokens // 4)  # four samples in the row
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
    mask = ((sample[:, None] == sample[None, :]) & causal)[None, None]
    found = {}
    backends = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)
    for backend in (*backends, None):
        name = backend.name if backend is not None else "default"
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if on_gpu else 0
        try:
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
            found[name] = {"runs": True}
            if on_gpu:
                found[name]["peak_mib"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
        except RuntimeError as e:
            found[name] = {"runs": False, "why": str(e).splitlines()[0][:160]}
    return found


def section_models(kit: Kit) -> dict:
    from throughput import alpaca_like_rows

    paths = {"8b": kit.work / "llama-3.1-8b-shape-bnb-4bit", "1b": kit.work / "side" / "base"}
    shapes = {"8b": TINY if kit.dry_run else LLAMA_31_8B, "1b": TINY if kit.dry_run else LLAMA_32_1B}
    kit.results["shapes"] = shapes
    with kit.section("models", 60) as entry:
        if entry is None:
            return paths
        started = time.perf_counter()
        bf16 = kit.work / "8b-bf16"
        entry["parameters_8b"] = build_base(bf16, shapes["8b"], kit.device)
        entry["build_8b_seconds"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        save_in_4bit(bf16, paths["8b"], kit.device)
        shutil.rmtree(bf16)
        entry["quantize_save_8b_seconds"] = round(time.perf_counter() - started, 1)
        entry["bnb_4bit_bytes"] = sum(f.stat().st_size for f in paths["8b"].glob("*.safetensors"))
        started = time.perf_counter()
        paths["1b"].parent.mkdir(parents=True, exist_ok=True)
        entry["parameters_1b"] = build_base(paths["1b"], shapes["1b"], kit.device)
        entry["build_1b_seconds"] = round(time.perf_counter() - started, 1)
        data = kit.work / "data"
        data.mkdir(exist_ok=True)
        write_jsonl(data / "train.jsonl", alpaca_like_rows(400, 0))
        write_jsonl(data / "val.jsonl", alpaca_like_rows(16, 1))
    return paths


def alpaca_data(kit: Kit, max_length: int) -> dict:
    data = kit.work / "data"
    return {
        "datasets": [{"path": str(data / "train.jsonl"), "format": "alpaca"}],
        "val_datasets": [{"path": str(data / "val.jsonl"), "format": "alpaca"}],
        "val_size": 0,
        "max_length": max_length,
    }


def section_t4_fp16(kit: Kit, base: Path) -> None:
    """fp16 compute, fp32 LoRA weights, the gradient scaler, 15 GiB; then a resume from the middle checkpoint."""
    steps, middle = (4, 2) if kit.dry_run else (8, 4)
    max_length = 256 if kit.dry_run else 512
    with kit.section("t4_fp16", 90) as entry:
        if entry is None:
            return
        run_dir = kit.work / "t4-run"
        dtype = (
            "fp32" if kit.dry_run else "fp16"
        )  # a CPU has no fp16 compute: the dry run follows the same path in fp32
        raw = recipe(
            base, run_dir, alpaca_data(kit, max_length), max_steps=steps, save_steps=middle, compute_dtype=dtype
        )
        path = write_recipe(kit.work / "t4.yaml", raw)
        result = kit.qtune("train", path)
        entry.update(train_figures(kit, raw, result, kit.results["shapes"]["8b"], mean_context=150))
        losses = entry["losses"]
        entry["losses_finite"] = bool(losses) and all(
            value == value and abs(value) != float("inf") for value in losses.values()
        )
        ordered = [losses[s] for s in sorted(losses)]
        entry["loss_falls"] = len(ordered) >= 4 and statistics.mean(ordered[-2:]) < statistics.mean(ordered[:2])
        if result["code"] != 0:
            entry["status"] = "failed"
            return
        # resume: the middle checkpoint, the rest trained again in a new process on the same GPU
        final = run_dir / "checkpoints" / f"checkpoint-{steps}"
        shutil.rmtree(final)
        for name in ("adapter", "metrics.json", "loss.png"):
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        resumed = kit.qtune("train", path, "--resume")
        again = step_losses(run_dir)
        compared = [s for s in losses if s > middle]
        entry["resume_exit"] = resumed["code"]
        entry["resume_losses"] = {s: again.get(s) for s in compared}
        differences = [abs(again[s] - losses[s]) for s in compared if s in again]
        entry["resume_max_loss_difference"] = max(differences) if len(differences) == len(compared) else None
        if resumed["code"] != 0 or entry["resume_max_loss_difference"] is None:
            entry["status"] = "failed"


def section_bf16_8b(kit: Kit, base: Path) -> None:
    with kit.section("bf16_8b", 45) as entry:
        if entry is None:
            return
        max_length = 256 if kit.dry_run else 2048
        raw = recipe(base, kit.work / "bf16-run", alpaca_data(kit, max_length), max_steps=3 if kit.dry_run else 6)
        result = kit.qtune("train", write_recipe(kit.work / "bf16.yaml", raw))
        entry.update(train_figures(kit, raw, result, kit.results["shapes"]["8b"], mean_context=150))
        if result["code"] != 0:
            entry["status"] = "failed"


def context_try(kit: Kit, base: Path, length: int, side: str) -> dict:
    """One optimizer step on one row of `length` tokens, in 15 GiB: qtune (side A) or the baseline (side B)."""
    folder = kit.work / f"context-{side}-{length}"
    text = kit.work / "data" / f"long-{length}.jsonl"
    write_jsonl(text, [{"text": long_text(length + 16)}] * 2)
    if side == "A":
        data = {"datasets": [{"path": str(text), "format": "text"}], "val_size": 0, "max_length": length}
        raw = recipe(base, folder, data, max_steps=1, micro_batch_size=1, grad_accum=1, lora_dropout=0.0)
        result = kit.qtune("train", write_recipe(kit.work / f"context-{length}.yaml", raw))
        plan = planned_bytes(raw, kit.cap_gib, kit.device)
        metrics_file = folder / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        figures = {"planned_bytes": plan["total_bytes"], "offload_activations": plan["offload_activations"]}
        figures["tokens_per_second"] = metrics.get("tokens_per_second")
    else:
        from datasets import Dataset
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        ids = tokenizer(long_text(length + 16)).input_ids[:length]
        tokenized = kit.work / f"long-{length}-tokenized"
        Dataset.from_dict({"input_ids": [ids, ids], "completion_mask": [[1] * len(ids)] * 2}).save_to_disk(
            str(tokenized)
        )
        settings = {
            "model": str(base), "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "output_dir": str(folder),
            "micro_batch_size": 1, "grad_accum": 1, "steps": 1, "lr": 1e-4, "warmup_ratio": 0.0,
            "max_length": length, "seed": 42, "train_tokenized": str(tokenized), "val_tokenized": str(tokenized),
            "evaluate": False,
        }  # fmt: skip
        path = kit.work / f"baseline-context-{length}.json"
        path.write_text(json.dumps(settings))
        result = kit.run([str(BENCH / "hf_baseline.py"), str(path)], cap=True)
        figures = {}
    figures.update(
        length=length,
        fits=result["code"] == 0,
        out_of_memory=result["out_of_memory"],
        exit=result["code"],
        error=result["error_line"],
        peak_bytes=result["peak"].get("cuda_allocated_bytes"),
        seconds=round(result["seconds"], 1),
    )
    kit.say(
        f"  {'qtune' if side == 'A' else 'baseline'} at {length:,} tokens: {'fits' if figures['fits'] else 'does not fit'}"
    )
    return figures


def section_context(kit: Kit, base: Path) -> None:
    """The longest max_length that trains in 15 GiB, qtune against the baseline (a short search, one step each)."""
    from qtune.planning.plan import largest_max_length

    with kit.section("context_8b", 120) as entry:
        if entry is None:
            return
        step = 256 if kit.dry_run else 4096
        raw = recipe(
            base, kit.work / "unused", {"datasets": [{"path": "x.jsonl", "format": "text"}], "max_length": 1024}
        )
        raw["lora"]["dropout"] = 0.0
        plan = planned_bytes(raw, kit.cap_gib or 1.0, "cuda")
        predicted = {m: largest_max_length(plan, (kit.cap_gib or 1.0) * GIB, m) for m in ("checkpointing", "offload")}
        entry["plan_largest_max_length"] = predicted
        # from the goal: up while it fits, or down until it fits
        first = kit.context_from or (1024 if kit.dry_run else 40960)
        length, direction, tries, fitting = first, None, [], []
        while kit.left() > 60 and len(tries) < (2 if kit.dry_run else kit.context_tries):
            figures = context_try(kit, base, length, "A")
            tries.append(figures)
            if figures["fits"]:
                fitting.append(length)
                if direction == "down":
                    break
                direction, length = "up", length + 2 * step
            else:
                if direction == "up" or not figures["out_of_memory"] or length <= step:
                    break
                direction, length = "down", length - step
        entry["qtune_tries"] = tries
        entry["qtune_longest"] = max(fitting, default=None)
        baseline, fitting = [], []
        length = kit.baseline_from if kit.baseline_from is not None else (512 if kit.dry_run else 2048)
        while kit.left() > 60 and len(baseline) < (1 if kit.dry_run else 3) and length > 0:
            figures = context_try(kit, base, length, "B")
            baseline.append(figures)
            if not figures["fits"]:
                break
            fitting.append(length)
            length *= 2
        entry["baseline_tries"] = baseline
        entry["baseline_longest"] = max(fitting, default=None)


def section_side_by_side(kit: Kit, base_1b: Path) -> None:
    """The 1B shape: qtune, then bench/hf_baseline.py, on the same GPU, each in a fresh process."""
    from throughput import LORA, qtune_recipe, run_side, write_inputs

    with kit.section("side_by_side_1b", 100) as entry:
        if entry is None:
            return
        work = base_1b.parent
        max_length, steps = (256, 2) if kit.dry_run else (1024, 10)
        stats = write_inputs(work, max_length, kit.results["shapes"]["1b"])
        entry["data"] = stats["train"]
        runs = {"A": [], "B": []}
        for side in ["A", "B"]:  # one pair: the device time of a lending is short
            out = work / f"run-{side}"
            if side == "A":
                payload = {"recipe": qtune_recipe(work, max_length, 4, 2, steps, out)}
            else:
                payload = {
                    "model": str(work / "base"), "lora": LORA, "output_dir": str(out), "micro_batch_size": 4,
                    "grad_accum": 2, "steps": steps, "lr": 1e-3, "warmup_ratio": 0.1, "max_length": max_length,
                    "seed": 42, "train_tokenized": str(work / "train-tokenized"),
                    "val_tokenized": str(work / "val-tokenized"),
                }  # fmt: skip
            settings = work / f"settings-{side}.json"
            settings.write_text(json.dumps(payload))
            if kit.left() < 40:
                raise TimeoutError("the budget ran out between runs")
            result = run_side(side, settings)
            result.pop("step_seconds", None)
            runs[side].append(result)
            kit.say(f"  {'qtune' if side == 'A' else 'baseline'}: {result['non_padding_tokens_per_second']:.0f} tok/s")
        measured = {side: results[-1] for side, results in runs.items()}
        supervised = stats["train"]["supervised_tokens"] / stats["train"]["tokens"]
        for result in measured.values():
            result["supervised_tokens_per_second"] = result["non_padding_tokens_per_second"] * supervised
            result["mfu"] = mfu(
                kit.results["shapes"]["1b"], result["non_padding_tokens_per_second"], stats["train"]["mean_context"],
                result["gradient_checkpointing"], kit.results["matmul_flops"],
            )  # fmt: skip
        entry["qtune"], entry["baseline"] = measured["A"], measured["B"]
        entry["speed_ratio"] = (
            measured["A"]["non_padding_tokens_per_second"] / measured["B"]["non_padding_tokens_per_second"]
        )
        entry["memory_ratio"] = measured["A"]["peak_bytes"] / measured["B"]["peak_bytes"]
        entry["eval_loss_ratio"] = measured["A"]["eval_loss"] / measured["B"]["eval_loss"]
        raw = qtune_recipe(work, max_length, 4, 2, steps, work / "run-A")
        plan = planned_bytes(raw, None, kit.device)
        entry["qtune_planned_bytes"] = plan["total_bytes"]
        entry["qtune_plan_error"] = plan["total_bytes"] / measured["A"]["peak_bytes"] - 1


def section_export(kit: Kit, base_1b: Path) -> None:
    with kit.section("export_1b", 60) as entry:
        if entry is None:
            return
        run_dir = base_1b.parent / "run-A"
        # GPTQ on the GPU: its layer-by-layer pass and the peak the plan gives it (the tiny dry-run shape is 64 wide)
        formats = ["merged_fp16", "gptq_int4", "gguf_q8_0"]
        if not kit.dry_run:
            formats += ["nf4", "gguf_q4_0"]
        small = ["--set", "export.gptq.group_size=32", "--set", "export.gptq.calibration_samples=8"]
        result = kit.qtune(
            "export",
            run_dir,
            *[x for f in formats for x in ("--format", f)],
            "--eval-samples",
            "8",
            *(small if kit.dry_run else []),
            cap=False,
        )
        entry.update(exit=result["code"], error=result["error_line"], seconds=round(result["seconds"], 1))
        entry["peak_cuda_bytes"] = result["peak"].get("cuda_allocated_bytes")
        entry["peak_rss_bytes"] = result["peak"].get("rss_bytes")
        report = run_dir / "export" / "export_report.json"
        if result["code"] != 0 or not report.is_file():
            entry["status"] = "failed"
            entry["stderr_tail"] = result["stderr_tail"]
            return
        artifacts = json.loads(report.read_text())["artifacts"]
        keep = ("perplexity", "mean_kl", "top1_agreement", "max_abs_logit_diff", "size_bytes")
        entry["fidelity"] = {name: {k: row.get(k) for k in keep} for name, row in artifacts.items()}


def section_fsdp(kit: Kit, base_1b: Path) -> None:
    """FSDP-QLoRA (accelerate_configs/fsdp_qlora.yaml) on 2 GPUs against DDP on the same 2 GPUs: the same losses.
    It cannot run on a CPU (accelerate's FSDP plugin refuses one), so this is where it is checked."""
    import torch

    with kit.section("fsdp_2gpu", 90) as entry:
        if entry is None:
            return
        gpus = torch.cuda.device_count() if kit.on_gpu else 0
        if gpus < 2:
            entry.update(status="skipped", why=f"needs 2 GPUs, this machine has {gpus}")
            return
        losses = {}
        for name, launcher in (
            ("fsdp", ["accelerate", "launch", "--config_file", str(REPO / "accelerate_configs" / "fsdp_qlora.yaml")]),
            ("ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]),
        ):
            raw = recipe(base_1b, kit.work / f"{name}-run", alpaca_data(kit, 512), max_steps=4, compute_dtype="bf16")
            path = write_recipe(kit.work / f"{name}.yaml", raw)
            done = subprocess.run(
                [*launcher, "-m", "qtune", "train", str(path)],
                capture_output=True,
                text=True,
                timeout=max(30, kit.left() - 5),
            )
            entry[f"{name}_exit"] = done.returncode
            entry[f"{name}_error"] = done.stderr[-1500:] if done.returncode else None
            losses[name] = step_losses(Path(raw["train"]["output_dir"]))
        entry["losses"] = losses
        if all(losses.values()) and losses["fsdp"].keys() == losses["ddp"].keys():
            entry["max_relative_difference"] = max(abs(losses["fsdp"][k] / losses["ddp"][k] - 1) for k in losses["ddp"])
        else:
            entry["status"] = "failed"


def section_moe(kit: Kit) -> None:
    """Qwen3-30B-A3B's shape (MOE_LAYERS of its layers) with its experts in 4 bits, trained at 4,096 tokens with
    recipes/qwen3-30b-a3b-alpaca.yaml's LoRA: peak against the plan, tokens/s, and the whole model's peak by the plan
    (the measured peak plus what the plan adds for the other layers)."""
    shape = TINY_MOE if kit.dry_run else {**QWEN3_30B_A3B, "num_hidden_layers": MOE_LAYERS}
    max_length = 256 if kit.dry_run else 4096
    with kit.section("moe_30b_a3b", 40 if kit.dry_run else 150) as entry:
        if entry is None:
            return
        base = kit.work / "qwen3-30b-a3b-shape"
        started = time.perf_counter()
        entry["parameters"] = build_base(base, shape, kit.device, model_type="qwen3_moe")
        entry["build_seconds"] = round(time.perf_counter() - started, 1)
        raw = recipe(base, kit.work / "moe-run", alpaca_data(kit, max_length), max_steps=3 if kit.dry_run else 6,
                     micro_batch_size=8, gradient_checkpointing=True, lora_dropout=0.0)  # fmt: skip
        raw["lora"].update(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "experts"])
        result = kit.qtune("train", write_recipe(kit.work / "moe.yaml", raw))
        # MFU counts the FLOPs of the experts a token goes through: a dense MLP of num_experts_per_tok experts' width
        active = {**shape, "intermediate_size": shape["num_experts_per_tok"] * shape["moe_intermediate_size"]}
        entry.update(train_figures(kit, raw, result, active, mean_context=150))
        if result["code"] != 0:
            entry["status"] = "failed"
            return
        full = kit.work / "qwen3-30b-a3b-config"
        full.mkdir(exist_ok=True)
        shutil.copy(REPO / "tests" / "model_configs" / "qwen3-30b-a3b" / "config.json", full / "config.json")
        whole = planned_bytes({**raw, "model": {"name": str(full)}}, kit.cap_gib, kit.device, decided=entry)
        entry["planned_48_layer_bytes"] = whole["total_bytes"]
        if entry["peak_bytes"]:
            entry["predicted_48_layer_peak_bytes"] = entry["peak_bytes"] + whole["total_bytes"] - entry["planned_bytes"]


def section_nan(kit: Kit, base: Path) -> None:
    """A NaN loss injected from step 3 on: the run stops (exit 6) and checkpoint-2 stays, on the GPU."""
    with kit.section("nan_fp16", 40) as entry:
        if entry is None:
            return
        dtype = "fp32" if kit.dry_run else "fp16"
        raw = recipe(base, kit.work / "nan-run", alpaca_data(kit, 256), max_steps=6, save_steps=2, compute_dtype=dtype)
        result = kit.qtune("train", write_recipe(kit.work / "nan.yaml", raw), env={"QTUNE_INJECT": "nan:3"})
        kept = kit.work / "nan-run" / "checkpoints" / "checkpoint-2" / MANIFEST
        entry.update(exit=result["code"], error=result["error_line"], checkpoint_2_kept=kept.is_file())
        if result["code"] != 6 or not kept.is_file():
            entry["status"] = "failed"


def section_grpo(kit: Kit, base_1b: Path) -> None:
    """GRPO on the 1B shape: 2 prompts x 8 completions per micro-batch, 2 micro-batches a step, generated with the KV
    cache on the 4-bit weights; generation's tokens/s and share of the step, the whole step's tokens/s, the peak
    against the plan (which counts the KV cache and the completions' log-probs)."""
    from qtune.data.templates import alpaca_prompt

    with kit.section("grpo_1b", 60) as entry:
        if entry is None:
            return
        completion, max_length, steps = (16, 128, 2) if kit.dry_run else (256, 512, 4)
        rows = [json.loads(line) for line in (kit.work / "data" / "train.jsonl").read_text().splitlines()[:200]]
        prompts = [{"prompt": alpaca_prompt(r["instruction"], r.get("input", "")), "answer": r["output"]} for r in rows]
        data = {
            "datasets": [{"path": str(write_jsonl(kit.work / "grpo.jsonl", prompts)), "format": "prompt_answer"}],
            "val_size": 0,
            "max_length": max_length,
        }
        raw = recipe(
            base_1b, kit.work / "grpo-run", data, max_steps=steps, micro_batch_size=16, grad_accum=2, lora_dropout=0.0
        )
        raw["train"].update(method="grpo", warmup_ratio=0.0)
        raw["grpo"] = {
            "rewards": [{"function": "length", "target": completion // 2}],  # rewards that differ within a group
            "num_generations": 8,
            "max_completion_length": completion,
        }
        result = kit.qtune("train", write_recipe(kit.work / "grpo.yaml", raw))
        entry.update(train_figures(kit, raw, result, kit.results["shapes"]["1b"], mean_context=max_length))
        metrics_file = kit.work / "grpo-run" / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        step_seconds = metrics.get("train_seconds") / steps if metrics.get("train_seconds") else None
        entry.update(
            generation_tokens_per_second=metrics.get("generation_tokens_per_second"),
            generation_seconds_per_step=metrics.get("generation_seconds"),
            step_seconds=step_seconds,
            generation_share=(metrics.get("generation_seconds") or 0) / step_seconds if step_seconds else None,
            completion_length=metrics.get("train_completion_length"),
            reward_first_last=(metrics.get("train_reward_first"), metrics.get("train_reward")),
        )
        if result["code"] != 0 or not entry["generation_tokens_per_second"]:
            entry["status"] = "failed"


# --------------------------------------------------------------------------- the report


def gib(value) -> str:
    return "—" if not value else f"{value / GIB:.2f}"


def pct(value) -> str:
    return "—" if value is None else f"{value:+.1%}"


def markdown(results: dict) -> str:
    sections = results["sections"]
    env = sections.get("environment", {})
    lines = [
        f"# qtune GPU check{' (dry run on CPU)' if results.get('dry_run') else ''}",
        "",
        f"GPU: {env.get('gpu', '?')}; torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, "
        f"bitsandbytes {env.get('bitsandbytes', '?')}; matmul {env.get('matmul_tflops', '?')} TFLOP/s measured; "
        f"{results.get('elapsed_seconds', 0):.0f} s in all.",
        "",
        "| section | status | seconds |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {s['status']}{': ' + str(s.get('why') or s.get('error') or '') if s['status'] != 'ok' else ''} | {s['seconds']} |"
        for name, s in sections.items()
    ]
    runs = [
        (n, sections[n])
        for n in ("t4_fp16", "bf16_8b")
        if sections.get(n, {}).get("status") in ("ok", "failed") and "losses" in sections[n]
    ]
    if runs:
        lines += ["", "| 8B-shape run | dtype | loss first → last | skipped steps | tok/s | MFU | peak GiB | plan GiB | plan error | checkpointing / offload |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for name, s in runs:
            ordered = [s["losses"][k] for k in sorted(s["losses"], key=int)]
            trend = f"{ordered[0]:.3f} → {ordered[-1]:.3f}" if ordered else "—"
            lines.append(
                f"| {name} | {s.get('compute_dtype')} | {trend} | {s.get('skipped_steps')} | "
                f"{s.get('tokens_per_second') or 0:.0f} | {s.get('mfu') or 0:.1%} | {gib(s.get('peak_bytes'))} | "
                f"{gib(s.get('planned_bytes'))} | {pct(s.get('plan_error'))} | {s.get('gradient_checkpointing')} / {s.get('offload_activations')} |"
            )
        t4 = sections.get("t4_fp16", {})
        if "resume_max_loss_difference" in t4:
            lines.append(
                f"\nResume from the middle checkpoint on the GPU: largest loss difference over the resumed steps {t4['resume_max_loss_difference']}."
            )
    context = sections.get("context_8b", {})
    if context.get("qtune_tries") is not None:
        lines += ["", f"Longest context in {T4_GIB:.0f} GiB, 8B shape: qtune {context.get('qtune_longest')}, baseline {context.get('baseline_longest')} (plan: {context.get('plan_largest_max_length')}).", "",
                  "| side | max_length | fits | peak GiB | plan GiB | offload | tok/s |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for side, tries in (("qtune", context.get("qtune_tries", [])), ("baseline", context.get("baseline_tries", []))):
            for t in tries:
                speed = f"{t['tokens_per_second']:.0f}" if t.get("tokens_per_second") else "—"
                lines.append(
                    f"| {side} | {t['length']:,} | {t['fits']} | {gib(t.get('peak_bytes'))} | {gib(t.get('planned_bytes'))} | {t.get('offload_activations', '—')} | {speed} |"
                )
    side = sections.get("side_by_side_1b", {})
    if "qtune" in side:
        lines += [
            "",
            "| 1B shape | tok/s | supervised tok/s | peak GiB | eval loss | MFU |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for label in ("qtune", "baseline"):
            r = side[label]
            lines.append(
                f"| {label} | {r['non_padding_tokens_per_second']:.0f} | {r['supervised_tokens_per_second']:.0f} | {gib(r['peak_bytes'])} | {r['eval_loss']:.4f} | {r['mfu'] or 0:.1%} |"
            )
        lines.append(
            f"\nqtune / baseline: speed {side['speed_ratio']:.2f}x, peak memory {side['memory_ratio']:.2f}x, eval loss {side['eval_loss_ratio']:.4f}x; plan {pct(side.get('qtune_plan_error'))} against qtune's peak."
        )
    export = sections.get("export_1b", {})
    if "fidelity" in export:
        lines += ["", f"Export of the 1B run on the GPU: {export['seconds']} s, peak GPU memory {gib(export.get('peak_cuda_bytes'))} GiB, peak RSS {gib(export.get('peak_rss_bytes'))} GiB.", "",
                  "| artifact | perplexity | KL | top-1 | max abs Δlogit |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for name, row in export["fidelity"].items():
            lines.append(
                f"| {name} | {row['perplexity']:.3f} | {row['mean_kl']:.2e} | {row['top1_agreement']:.1%} | {row['max_abs_logit_diff']:.3f} |"
            )
    nan = sections.get("nan_fp16", {})
    if "exit" in nan:
        lines.append(f"\nInjected NaN loss: exit {nan['exit']}, checkpoint-2 kept: {nan.get('checkpoint_2_kept')}.")
    grpo = sections.get("grpo_1b", {})
    if grpo.get("generation_tokens_per_second"):
        lines.append(
            f"\nGRPO, 1B shape, 32 completions per step: generation {grpo['generation_tokens_per_second']:.0f} tok/s "
            f"({grpo.get('generation_share') or 0:.0%} of a {grpo.get('step_seconds') or 0:.1f} s step), the whole step "
            f"{grpo.get('tokens_per_second') or 0:.0f} tok/s (prompts and completions); peak {gib(grpo.get('peak_bytes'))} GiB, "
            f"plan {gib(grpo.get('planned_bytes'))} GiB ({pct(grpo.get('plan_error'))})."
        )
    moe = sections.get("moe_30b_a3b", {})
    if moe.get("losses"):
        ordered = [moe["losses"][k] for k in sorted(moe["losses"], key=int)]
        lines.append(
            f"\nQwen3-30B-A3B shape, {moe.get('parameters', 0) / 1e9:.2f}B parameters in {MOE_LAYERS} of its 48 layers, "
            f"experts in 4 bits: loss {ordered[0]:.3f} → {ordered[-1]:.3f}, {moe.get('tokens_per_second') or 0:.0f} tok/s, "
            f"peak {gib(moe.get('peak_bytes'))} GiB (plan {gib(moe.get('planned_bytes'))}, {pct(moe.get('plan_error'))}); "
            f"all 48 layers: {gib(moe.get('predicted_48_layer_peak_bytes'))} GiB by the measured peak plus the plan's "
            f"other layers (plan alone {gib(moe.get('planned_48_layer_bytes'))} GiB)."
        )
    if results.get("t4_estimate_seconds"):
        lines.append(
            f"\nOn a T4 (65 TFLOP/s fp16, at the MFU measured here) the training steps above would take about {results['t4_estimate_seconds']:.0f} s."
        )
    return "\n".join(lines) + "\n"


def t4_estimate(results: dict) -> float | None:
    """Seconds a T4 would spend on the measured training steps, at the same fraction of its peak."""
    total = 0.0
    rate = results.get("matmul_flops")
    for name in ("t4_fp16", "bf16_8b"):
        s = results["sections"].get(name, {})
        if s.get("train_seconds") and rate:
            total += s["train_seconds"] * rate / T4_FP16_FLOPS
    return total or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--work", type=Path, default=None, help="where models and runs go (default: a temporary folder)"
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting sections after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the same code path, for the tests")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, in this order: {','.join(SECTIONS)}"
    )
    parser.add_argument("--context-from", type=int, default=None, help="first max_length the context search tries")
    parser.add_argument("--baseline-from", type=int, default=None, help="first max_length for the baseline's search")
    parser.add_argument("--context-tries", type=int, default=2, help="most max_lengths the context search tries")
    parser.add_argument("--exec", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cap-gib", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.exec:
        exec_capped(
            args.cap_gib, [c for c in args.command if c != "--"] if args.command[:1] == ["--"] else args.command
        )
        return 0
    out = args.out or Path(os.environ.get("OUT") or "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    scratch = shm if shm.is_dir() and shutil.disk_usage(shm).free > 40 * GIB else None
    work = args.work or Path(tempfile.mkdtemp(prefix="qtune-gpu-check-", dir=scratch))
    work.mkdir(parents=True, exist_ok=True)
    # the side-by-side runs start bench/throughput.py and bench/hf_baseline.py themselves: they inherit this
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    kit = Kit(out, work, args.budget_s, args.dry_run)
    if not kit.on_gpu and not args.dry_run:
        print("gpu_check: no CUDA GPU here; use --dry-run to check the kit itself on a CPU", file=sys.stderr)
        return 2
    kit.say(f"gpu_check: work folder {work}, results in {out}")
    try:
        section_environment(kit)
        paths = section_models(kit)
        if kit.results["sections"]["models"]["status"] == "ok":
            chosen = args.sections.split(",")
            kit.context_from, kit.baseline_from, kit.context_tries = (
                args.context_from,
                args.baseline_from,
                args.context_tries,
            )
            unknown = [name for name in chosen if name not in SECTIONS]
            if unknown:
                raise SystemExit(f"gpu_check: unknown section {unknown[0]}; known: {', '.join(SECTIONS)}")
            runners = {
                "t4_fp16": lambda: section_t4_fp16(kit, paths["8b"]),
                "context_8b": lambda: section_context(kit, paths["8b"]),
                "side_by_side_1b": lambda: section_side_by_side(kit, paths["1b"]),
                "export_1b": lambda: section_export(kit, paths["1b"]),
                "bf16_8b": lambda: section_bf16_8b(kit, paths["8b"]),
                "nan_fp16": lambda: section_nan(kit, paths["8b"]),
                "grpo_1b": lambda: section_grpo(kit, paths["1b"]),
                "moe_30b_a3b": lambda: section_moe(kit),
                "fsdp_2gpu": lambda: section_fsdp(kit, paths["1b"]),
            }
            for name in chosen:  # in the order asked for
                runners[name]()
        kit.results["t4_estimate_seconds"] = t4_estimate(kit.results)
        kit.save()
        print((out / "gpu_check.md").read_text())
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = [n for n, s in kit.results["sections"].items() if s["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
