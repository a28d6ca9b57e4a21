"""DDP through torchrun on CPU (gloo, 2 processes), against a single process with the same global batch;
and the launches that silently give fewer processes than asked."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, recipe_dict, run_qtune, step_losses, write_recipe

from qtune.core.distributed import processes_asked_of_accelerate


def batches(run: Path, rank: int):
    return [json.loads(line) for line in (run / "sample_trace" / f"rank-{rank}.jsonl").read_text().splitlines()]


def test_ddp_two_processes_match_one_process(tmp_path, pretrained_llama, alpaca_file):
    """2 ranks x 2 samples vs 1 process x 2 samples x 2 accumulation: the same samples per optimizer step."""
    raw = recipe_dict(
        pretrained_llama,
        alpaca_file,
        tmp_path / "ddp",
        train={"micro_batch_size": 2, "max_steps": 4, "save_steps": 4, "eval_steps": 4},
    )
    recipe = write_recipe(tmp_path / "ddp.yaml", raw)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    result = run_qtune(["-m", "qtune", "train", str(recipe)], launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    single = run_qtune(
        [
            sys.executable,
            "-m",
            "qtune",
            "train",
            str(recipe),
            "--set",
            f"train.output_dir={tmp_path / 'single'}",
            "--set",
            "train.grad_accum=2",
        ]
    )
    assert single.returncode == 0, single.stderr[-3000:]

    ddp, one = tmp_path / "ddp", tmp_path / "single"
    assert json.loads((ddp / "metrics.json").read_text())["world_size"] == 2
    assert json.loads((one / "metrics.json").read_text())["world_size"] == 1
    rank0, rank1 = batches(ddp, 0), batches(ddp, 1)
    assert not {i for b in rank0 for i in b} & {i for b in rank1 for i in b}  # each rank its own shard
    # The loaders fetch one batch ahead, so compare the batches of the 4 optimizer steps.
    interleaved = [b for pair in zip(rank0[:4], rank1[:4]) for b in pair]
    assert batches(one, 0)[:8] == interleaved  # together: the single process's batches, step by step
    fingerprints = [json.loads((ddp / "sample_trace" / f"final-rank-{r}.json").read_text()) for r in (0, 1)]
    assert fingerprints[0] == fingerprints[1]  # identical adapters on both ranks
    ddp_losses, one_losses = step_losses(ddp, 4), step_losses(one, 4)
    assert len(ddp_losses) == 4
    for (step, loss, norm), (_, loss_one, norm_one) in zip(ddp_losses, one_losses):
        assert loss == pytest.approx(loss_one, rel=1e-4), step  # measured: equal to the last bit
        assert norm == pytest.approx(norm_one, rel=1e-4), step


def test_accelerate_cpu_launch_that_gives_one_process_is_refused(tmp_path, tiny_llama, alpaca_file):
    accelerate = shutil.which("accelerate")
    assert accelerate, "accelerate's launcher must be installed with the package"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_llama, alpaca_file, tmp_path / "run"))
    result = run_qtune(
        [
            accelerate,
            "launch",
            "--cpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "qtune",
            "train",
            str(recipe),
        ]
    )
    assert result.returncode != 0
    assert "qtune: error: asked for 2 processes but training runs in 1" in result.stderr
    assert "Traceback" not in result.stderr.split("qtune: error:")[0][-200:]


def test_accelerate_command_lines_are_read(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"num_processes": 4}))
    assert (
        processes_asked_of_accelerate(["/x/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "qtune"])
        == 2
    )
    assert processes_asked_of_accelerate(["/x/bin/accelerate", "launch", "--num-processes=3", "t.py"]) == 3
    assert processes_asked_of_accelerate(["accelerate", "launch", "--config_file", str(config), "-m", "qtune"]) == 4
    assert processes_asked_of_accelerate(["python", "-m", "qtune", "train", "r.yaml"]) is None
    assert processes_asked_of_accelerate(["/usr/bin/python3", "/x/bin/torchrun", "--nproc_per_node", "2"]) is None


def launch_environment(config_file: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file FILE` gives each process, computed by accelerate's own
    launcher code (without starting anything)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "qtune", "train", "r.yaml"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name, processes", [("single_gpu", 1), ("multi_gpu", 2), ("fsdp_qlora", 2)])
def test_accelerate_configs_parse(name, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "accelerate_configs" / f"{name}.yaml"))
    assert config.num_machines == 1 and config.num_processes == processes
    assert config.mixed_precision == "no"  # qtune picks the compute dtype itself


def test_the_fsdp_config_launches_fsdp_qlora(monkeypatch):
    """The FSDP config, as accelerate launches it: FSDP on (qtune reads ACCELERATE_USE_FSDP), the settings FSDP needs
    around 4-bit weights (original parameters off, module states synced from rank 0 after a CPU-RAM-efficient load,
    decoder layers wrapped, fully sharded); and under that environment qtune stores the packed 4-bit weights in the
    compute dtype and lets FSDP place them."""
    import torch

    from qtune.config.recipe import QuantSection
    from qtune.modeling import load as model_loading

    env = launch_environment(REPO / "accelerate_configs" / "fsdp_qlora.yaml")
    ddp = launch_environment(
        REPO / "accelerate_configs" / "multi_gpu.yaml"
    )  # before the test sets a variable it copies
    wanted = {
        "ACCELERATE_USE_FSDP": "true",
        "ACCELERATE_MIXED_PRECISION": "no",
        "FSDP_USE_ORIG_PARAMS": "false",
        "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
        "FSDP_SYNC_MODULE_STATES": "true",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
        "FSDP_OFFLOAD_PARAMS": "false",
    }
    assert {key: env.get(key) for key in wanted} == wanted
    monkeypatch.setenv("ACCELERATE_USE_FSDP", env["ACCELERATE_USE_FSDP"])
    assert model_loading.base_quantization(QuantSection(), torch.bfloat16).bnb_4bit_quant_storage == torch.bfloat16
    assert model_loading.device_map() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", ddp.get("ACCELERATE_USE_FSDP", "false"))
    assert model_loading.base_quantization(QuantSection(), torch.bfloat16).bnb_4bit_quant_storage == torch.uint8


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapter_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_two_nodes_match_one_process(tmp_path, pretrained_llama, alpaca_file):
    """torchrun's multi-node launch (static rendezvous: one command per node, --node_rank 0 and 1), here two "nodes"
    of one process each on this machine, against one process with the same global batch: the same losses, gradient
    norms and adapter."""
    raw = recipe_dict(
        pretrained_llama,
        alpaca_file,
        tmp_path / "nodes",
        train={"micro_batch_size": 2, "max_steps": 4, "save_steps": 4, "eval_steps": 4},
    )
    recipe = write_recipe(tmp_path / "nodes.yaml", raw)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", QTUNE_SAMPLE_TRACE="1")
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
            + ["--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
            + ["-m", "qtune", "train", str(recipe)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    single = run_qtune(
        [sys.executable, "-m", "qtune", "train", str(recipe)]
        + ["--set", f"train.output_dir={tmp_path / 'single'}", "--set", "train.grad_accum=2"]
    )
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = tmp_path / "nodes", tmp_path / "single"
    assert json.loads((two / "metrics.json").read_text())["world_size"] == 2
    fingerprints = [json.loads((two / "sample_trace" / f"final-rank-{r}.json").read_text()) for r in (0, 1)]
    assert fingerprints[0] == fingerprints[1]  # both nodes end with the same adapter
    two_losses, one_losses = step_losses(two, 4), step_losses(one, 4)
    assert len(two_losses) == 4
    for (step, loss, norm), (_, loss_one, norm_one) in zip(two_losses, one_losses):
        assert loss == pytest.approx(loss_one, rel=1e-4), step
        assert norm == pytest.approx(norm_one, rel=1e-4), step
    import torch

    nodes_adapter, single_adapter = adapter_weights(two), adapter_weights(one)
    assert nodes_adapter.keys() == single_adapter.keys()
    for name, weight in nodes_adapter.items():
        assert torch.allclose(weight, single_adapter[name], rtol=1e-4, atol=1e-6), name


def test_fsdp_on_a_cpu_is_one_line_not_a_traceback(tmp_path, tiny_llama, alpaca_file, run_cli, monkeypatch):
    """accelerate's FSDP plugin refuses a CPU (measured: `accelerate launch --config_file fsdp_qlora.yaml` with
    use_cpu raises "There are currently no available devices found" inside the Trainer): qtune says so first."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    code, _out, err = run_cli(
        "train", write_recipe(tmp_path / "r.yaml", recipe_dict(tiny_llama, alpaca_file, tmp_path / "run"))
    )
    assert code == 4
    assert err.strip().splitlines()[-1].startswith("qtune: error: FSDP needs GPUs") and "torchrun" in err
    assert "Traceback" not in err


def test_qtune_speaks_on_the_main_process_only():
    """One logger for every stage: on global rank 0 (or without a launcher) its lines go to stdout, on the other ranks
    nowhere, so a DDP run says each thing once."""
    code = (
        "from qtune.core.log import get_logger; get_logger('qtune.training.run').info('said once'); "
        "get_logger('qtune.export.run').info('and this')"
    )
    for rank, expected in (("0", "said once\nand this\n"), ("1", "")):
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "RANK": rank}, timeout=60
        )
        assert done.returncode == 0 and done.stdout == expected, (rank, done.stdout, done.stderr)
