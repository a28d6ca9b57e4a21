"""Long context on a small GPU: activation offloading gives the same loss and gradients, and the plan's arithmetic."""

import json

import pytest
import torch
import yaml

from qtune.data.packing import IGNORE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def checkpointed_lora_model(pretrained_llama):
    """The 4-bit base with LoRA as qtune trains it, gradient checkpointing on (fp32 compute on CPU)."""
    from qtune.config.recipe import LoraSection, ModelSection, QuantSection
    from qtune.modeling import load as model_stage

    base = model_stage.load_base(ModelSection(name=str(pretrained_llama)), QuantSection(), torch.float32)
    torch.manual_seed(0)
    model = model_stage.attach_lora(base, LoraSection(r=4, alpha=8, dropout=0.1), gradient_checkpointing=True)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: nonzero, so every gradient is exercised
            torch.nn.init.normal_(param, std=0.02)
    model.train()
    return model


def lora_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_offloaded_activations_give_the_same_loss_and_gradients(checkpointed_lora_model):
    from qtune.modeling.loss import last_hidden_state, supervised_loss_sum
    from qtune.modeling.offload import ActivationsToCPU

    model = checkpointed_lora_model
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 500, (1, 96), generator=generator)
    labels = ids.clone()
    labels[:, :20] = IGNORE
    head = model.get_output_embeddings().weight
    results = []
    for offload in (None, ActivationsToCPU(min_bytes=0)):
        model.zero_grad()
        torch.manual_seed(7)  # the same dropout masks, in the forward pass and in the recompute
        with offload if offload is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            with last_hidden_state(model) as captured:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            loss, _count = supervised_loss_sum(captured["hidden"], labels, head)
            loss.backward()
        results.append((loss.item(), lora_grads(model), offload))
    (plain_loss, plain_grads, _), (offloaded_loss, offloaded_grads, offload) = results
    # the control: the hooks really moved the checkpointed layer inputs (copies on a CPU, but through the same path)
    assert offload.offloaded_bytes >= 2 * 96 * 64 * 4
    assert offloaded_loss == plain_loss
    assert plain_grads.keys() == offloaded_grads.keys() and len(plain_grads) > 0
    for name in plain_grads:
        assert torch.equal(plain_grads[name], offloaded_grads[name]), name
        assert plain_grads[name].abs().sum() > 0, name


def test_the_trainer_offloads_inside_its_row_by_row_step(checkpointed_lora_model, tiny_tokenizer, tmp_path):
    """QtuneSFTTrainer.training_step (rows > 1) wraps every row's forward and backward in the offload hooks."""
    from helpers import qtune_trainer

    generator = torch.Generator().manual_seed(5)
    samples = []
    for length in (40, 70, 25, 60):
        ids = torch.randint(3, 500, (length,), generator=generator).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE] * 5 + ids[5:]})
    results = []
    for offload in (False, True):
        trainer = qtune_trainer(
            checkpointed_lora_model,
            samples,
            tiny_tokenizer,
            tmp_path,
            row_tokens=80,
            gradient_checkpointing=True,
            offload_activations=offload,
        )
        trainer.create_optimizer()
        batch = trainer.data_collator(samples)
        assert batch["input_ids"].shape[0] >= 2
        checkpointed_lora_model.zero_grad()
        torch.manual_seed(11)
        loss = trainer.training_step(
            checkpointed_lora_model, dict(batch), num_items_in_batch=torch.tensor(int((batch["labels"] != -100).sum()))
        )
        results.append((loss.item(), lora_grads(checkpointed_lora_model)))
    assert results[0][0] == results[1][0]
    for name in results[0][1]:
        assert torch.equal(results[0][1][name], results[1][1][name]), name


def llama_8b_recipe(tmp_path, **train):
    from qtune.config.recipe import validate_recipe

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    raw = {
        "model": {"name": str(tmp_path)},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"datasets": [{"path": "d.jsonl", "format": "alpaca"}], "max_length": 40960},
        "train": {"output_dir": str(tmp_path / "run"), "micro_batch_size": 1, **train},
    }
    return raw, validate_recipe(raw)


def test_plan_offloading_arithmetic(tmp_path):
    from qtune.modeling.config import load_config
    from qtune.planning.plan import (
        activation_bytes_per_token_per_layer,
        backward_transient_bytes_per_token,
        largest_max_length,
        plan_training,
        training_shape,
    )

    _raw, recipe = llama_8b_recipe(tmp_path, gradient_checkpointing=True, offload_activations=True)
    plan = plan_training(recipe, gpu_gib=15.0)
    shape = training_shape(load_config(str(tmp_path), "main"))
    per_layer = activation_bytes_per_token_per_layer(shape, 2, lora_dropout=False)
    per_layer += backward_transient_bytes_per_token(shape, 2)
    tokens = 40960
    assert plan["offload_activations"] and plan["gradient_checkpointing"]
    # on the GPU: one layer recomputed, the layer input being copied back and its gradient
    assert plan["parts"]["activations"] == tokens * (2 * 4096 * 2 + per_layer)
    # in pinned host memory: every layer's input
    assert plan["offloaded_host_bytes"] == tokens * 32 * 4096 * 2
    assert plan["activations_with_offloading"] < plan["activations_with_checkpointing"]
    assert plan["activations_with_checkpointing"] - plan["activations_with_offloading"] == tokens * 30 * 4096 * 2
    # the largest max_length is where the plan's total meets the budget, for each way of keeping activations
    for mode in ("checkpointing", "offload"):
        longest = largest_max_length(plan, 15 * 2**30, mode)
        used = plan["bytes_fixed"] + longest * plan["bytes_per_token"][mode]
        assert used <= 15 * 2**30 < used + plan["bytes_per_token"][mode]
    assert largest_max_length(plan, 15 * 2**30, "offload") > 1.5 * largest_max_length(plan, 15 * 2**30, "checkpointing")


def test_auto_offloads_only_when_checkpointing_alone_does_not_fit(tmp_path):
    from qtune.planning.plan import plan_training

    raw, recipe = llama_8b_recipe(tmp_path)  # both auto
    assert plan_training(recipe, gpu_gib=80.0)["offload_activations"] is False  # an A100-80GB: checkpointing suffices
    on_t4 = plan_training(recipe, gpu_gib=15.0)
    assert on_t4["gradient_checkpointing"] and on_t4["offload_activations"]
    from qtune.config.recipe import validate_recipe

    short = validate_recipe(dict(raw, data=dict(raw["data"], max_length=512)))
    assert not plan_training(short, gpu_gib=15.0)["offload_activations"]
    # no budget to fit into (and never on CPU): off
    assert not plan_training(recipe)["offload_activations"]
    assert not plan_training(recipe, device="cpu", compute_bytes=4, budget_bytes=2**30)["offload_activations"]


def test_offloading_without_checkpointing_is_refused(tmp_path, run_cli):
    raw, _recipe = llama_8b_recipe(tmp_path)
    raw["train"].update(gradient_checkpointing=False, offload_activations=True)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    code, _out, err = run_cli("validate", path)
    assert code == 2
    assert err.count("\n") == 1 and "gradient_checkpointing" in err and "offload_activations" in err


def test_qtune_plan_reports_the_longest_context_per_gpu(tmp_path, run_cli):
    raw, _recipe = llama_8b_recipe(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    code, out, err = run_cli("plan", path, "--gpu", "t4")
    assert code == 0, err
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  t4 ")}
    checkpointing, offloading = (int(value.replace(",", "")) for value in rows["t4"][:2])
    assert 0 < checkpointing < offloading
    assert "planned with checkpointing and offloading" in out
    assert "offloaded layer inputs in pinned CPU memory" in out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_plan_counts_what_autograd_keeps_per_layer(tmp_path, dtype, dropout):
    """The plan's bytes per token and layer against the tensors autograd really saves in one decoder layer (each
    storage counted once), in fp32 and under bf16 autocast as on a GPU, the way qtune trains (LoRA inputs not cast)."""
    from qtune.config.recipe import LoraSection, ModelSection, QuantSection
    from qtune.demo.tiny_models import write_tiny_model
    from qtune.modeling import load as model_stage
    from qtune.modeling.lean_ops import lora_inputs_stay_in_compute_dtype
    from qtune.planning.plan import activation_bytes_per_token_per_layer, training_shape

    folder = write_tiny_model(tmp_path / "m", hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512)
    base = model_stage.load_base(ModelSection(name=str(folder)), QuantSection(), dtype)
    model = model_stage.attach_lora(base, LoraSection(r=8, alpha=16, dropout=dropout), gradient_checkpointing=False)
    model_stage.keep_trainable_in_fp32(model)
    if dtype != torch.float32:
        assert lora_inputs_stay_in_compute_dtype(model) == 7 * 2
    model.train()
    saved, inside = {}, [False]
    layer = base.model.layers[1]
    layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))

    def pack(tensor):
        if inside[0] and not isinstance(tensor, torch.nn.Parameter):
            key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
            saved[key] = max(saved.get(key, 0), tensor.untyped_storage().nbytes())
        return tensor

    tokens = 512
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            model(input_ids=torch.randint(3, 500, (1, tokens)), use_cache=False, logits_to_keep=1)
    measured = sum(saved.values()) / tokens
    predicted = activation_bytes_per_token_per_layer(training_shape(base.config), dtype.itemsize, dropout > 0)
    assert abs(predicted / measured - 1) < 0.02, (predicted, measured)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_norm_and_swiglu_equal_transformers(dtype):
    """The same forward arithmetic, bit for bit; gradients to rounding (the lean backward sums in another order)."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP, LlamaRMSNorm

    from qtune.modeling.lean_ops import use_lean_ops

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=192, rms_norm_eps=1e-5)
    reference = torch.nn.ModuleList([LlamaRMSNorm(64, eps=1e-5), LlamaMLP(config)]).to(dtype)
    with torch.no_grad():
        reference[0].weight.normal_(1.0, 0.1)
    lean = torch.nn.ModuleList([LlamaRMSNorm(64, eps=1e-5), LlamaMLP(config)]).to(dtype)
    lean.load_state_dict(reference.state_dict())
    assert use_lean_ops(lean) == 2
    x = torch.randn(3, 50, 64, dtype=dtype) * 3
    outputs, grads = [], []
    for modules in (reference, lean):
        inputs = x.clone().requires_grad_(True)
        out = modules[1](modules[0](inputs))
        out.float().square().sum().backward()
        outputs.append(out.detach())
        grads.append([inputs.grad] + [p.grad for p in modules.parameters()])
    assert torch.equal(outputs[0], outputs[1])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for plain, fast in zip(*grads):
        assert torch.allclose(plain.float(), fast.float(), rtol=tolerance, atol=tolerance * plain.abs().max().item())


def test_lean_ops_give_the_loss_and_lora_gradients_of_the_plain_model(pretrained_llama):
    from qtune.config.recipe import LoraSection, ModelSection, QuantSection
    from qtune.modeling import load as model_stage
    from qtune.modeling.lean_ops import use_lean_ops

    def lora_model(lean: bool):
        base = model_stage.load_base(ModelSection(name=str(pretrained_llama)), QuantSection(), torch.float32)
        torch.manual_seed(0)
        model = model_stage.attach_lora(base, LoraSection(r=4, alpha=8, dropout=0.0), gradient_checkpointing=True)
        if not lean:  # undo: the plain transformers forward of every module
            for module in model.modules():
                module.__dict__.pop("forward", None) if type(module).__name__.endswith(("RMSNorm", "MLP")) else None
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(hash(name) % 1000))
        return model

    ids = torch.randint(3, 500, (2, 64), generator=torch.Generator().manual_seed(1))
    results = []
    for lean in (False, True):
        model = lora_model(lean)
        model.train()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        results.append((loss.item(), lora_grads(model)))
    assert use_lean_ops(lora_model(True)) > 0
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for name, plain in results[0][1].items():
        assert torch.allclose(plain, results[1][1][name], rtol=1e-4, atol=1e-7), name
