"""Mixtures of experts in 4 bits (qtune.modeling.moe): Qwen3-MoE, Mixtral, OLMoE and gpt-oss, their experts quantized
per expert, routed, trained with LoRA, exported, and planned."""

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_SHAPE, assert_close, recipe_dict, write_recipe

REPO = Path(__file__).resolve().parent.parent
MOE_FAMILIES = ("qwen3_moe", "mixtral", "olmoe", "gpt_oss")
# bitsandbytes' NF4 with double quantization: 4 bits a weight, one 8-bit absmax per 64 weights, one fp32 absmax per
# 256 of those
NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)


def quantization_config():
    from qtune.modeling.precision import bnb_config

    return bnb_config("nf4", double_quant=True, compute_dtype=torch.float32)


def quantized(model):
    """The model with its experts in 4 bits as load_base leaves them (bitsandbytes' CPU repack kept off: it computes in
    bf16, and has no backward)."""
    from qtune.modeling.moe.experts import quantize_experts
    from qtune.modeling.precision import keep_cpu_4bit_layout_trainable

    quantize_experts(model, quantization_config(), torch.float32)
    keep_cpu_4bit_layout_trainable(model)
    return model


def tiny_moe(family: str, tokenizer, **shape):
    """A seeded tiny MoE of `family` (4 experts, 2 per token), in fp32."""
    from qtune.demo.tiny_models import build_model

    return build_model(family, tokenizer, **{**TINY_SHAPE, **shape})


def expert_layers(model):
    """Every 4-bit layer of every expert."""
    from qtune.modeling.moe.experts import QuantizedExperts

    return [
        layer
        for module in model.modules()
        if isinstance(module, QuantizedExperts)
        for expert in module
        for layer in (expert.gate_proj, expert.up_proj, expert.down_proj)
    ]


def held_bytes(layers) -> int:
    """Bytes the layers' 4-bit weights hold: packed weights and every tensor of their quantization state, each
    storage counted once (bitsandbytes shares some code tables)."""
    seen, total = set(), 0
    for layer in layers:
        state = layer.weight.quant_state
        tensors = [layer.weight.data, state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        for tensor in tensors:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def test_experts_load_as_nf4_with_double_quantization_at_the_planned_bytes(tmp_path, tiny_tokenizer):
    """Loaded from a 16-bit checkpoint, every expert projection is a bitsandbytes 4-bit layer of its own (NF4, block
    64, double quantization, the compute dtype), at 4.13 bits a weight as the plan counts it; the router stays in the
    compute dtype, frozen, and no fused 16-bit expert tensor is left."""
    import bitsandbytes as bnb

    from qtune.config.recipe import validate_recipe
    from qtune.modeling.config import load_config
    from qtune.modeling.load import load_base
    from qtune.planning.memory import inventory, quantization_constants_bytes

    model = tiny_moe("qwen3_moe", tiny_tokenizer, hidden=512, intermediate=1024)  # experts 512 wide: 512x512 each
    model.save_pretrained(tmp_path / "m")
    recipe = validate_recipe(recipe_dict(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "run"))
    base = load_base(recipe.model, recipe.quant, torch.float32)
    layers = expert_layers(base)
    assert len(layers) == 2 * 4 * 3  # layers x experts x projections
    for layer in layers:
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.compute_dtype == torch.float32
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.blocksize == 64 and state.nested
    weights = sum(layer.in_features * layer.out_features for layer in layers)
    bits = 8 * held_bytes(layers) / weights
    print(f"experts: {bits:.3f} bits per weight ({held_bytes(layers)} bytes for {weights} weights)")
    assert bits == pytest.approx(NF4_DQ_BITS, rel=0.02)
    # the plan's arithmetic for the same experts (it counts the code tables per layer, so a little more)
    inv = inventory(load_config(tmp_path / "m"))
    expert_shapes = [s for s in inv.quantized_shapes if s == (512, 512)]
    assert len(expert_shapes) == len(layers)
    planned = sum(o * i // 2 + quantization_constants_bytes(o * i, True) for o, i in expert_shapes)
    assert held_bytes(layers) <= planned <= 1.02 * held_bytes(layers)
    for layer in base.model.layers:
        router = layer.mlp.gate
        assert type(router).__name__ == "Qwen3MoeTopKRouter" and router.weight.dtype == torch.float32
        assert not any(p.dim() == 3 for p in layer.mlp.parameters())  # no fused 16-bit experts kept


def test_experts_quantize_while_loading_one_layer_in_16_bits_at_a_time(tmp_path, tiny_tokenizer, monkeypatch):
    """The 16-bit experts are quantized as transformers reads each layer (qtune.modeling.moe.streaming): when a
    layer's experts arrive, those of the layers before are gone (only their 4-bit weights are kept), so the whole
    model is never in memory in 16 bits."""
    import weakref

    from qtune.config.recipe import validate_recipe
    from qtune.modeling import load
    from qtune.modeling.moe import streaming

    tiny_moe("mixtral", tiny_tokenizer, layers=6).save_pretrained(tmp_path / "m")
    recipe = validate_recipe(recipe_dict(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "run"))
    arrived, alive_at_arrival = [], []
    quantize = streaming.nf4_weights

    def watched(tensor, *args):
        alive_at_arrival.append(sum(ref() is not None for ref in arrived))
        arrived.append(weakref.ref(tensor))
        return quantize(tensor, *args)

    monkeypatch.setattr(streaming, "nf4_weights", watched)  # what the loader quantizes as it reads
    base = load.load_base(recipe.model, recipe.quant, torch.float32)
    assert len(arrived) == 6 * 2  # each layer's gate_up_proj and down_proj, quantized as they loaded
    assert max(alive_at_arrival) <= 2, alive_at_arrival  # at most the previous one or two, never the model's
    assert len(expert_layers(base)) == 6 * 4 * 3
    assert base.config.quantization_config.quant_method == "bitsandbytes"  # as it saves and as peft sees it


def test_only_the_experts_a_token_is_routed_to_run(tiny_tokenizer):
    """Each expert's 4-bit layers run for the tokens routed to it and no others; an expert no token chose never
    runs (nor is dequantized)."""
    model = tiny_moe("qwen3_moe", tiny_tokenizer)
    quantized(model)
    block = model.model.layers[0].mlp
    hidden = torch.randn(3, block.gate.hidden_dim)
    _, weights, chosen = block.gate(hidden)
    calls = {}

    def count(index):
        def hook(_module, args, _output):
            calls[index] = calls.get(index, 0) + args[0].shape[0]

        return hook

    for index, expert in enumerate(block.experts):
        expert.gate_proj.register_forward_hook(count(index))
    block.experts(hidden, chosen, weights)
    routed = {int(e): int((chosen == e).sum()) for e in chosen.unique()}
    assert calls == routed  # the experts hit, each with exactly its tokens
    assert len(routed) < len(block.experts) or chosen.numel() >= len(block.experts)


def reference_loss_and_grads(qtune_model, reference, samples, family):
    """Loss and LoRA gradients of transformers' own eager model on the dequantized 4-bit weights with each LoRA
    delta added (W + scale * B @ A, the experts fused back into the family's 3-D layout), each sample run alone."""
    import bitsandbytes as bnb
    from torch.func import functional_call

    from qtune.data.packing import IGNORE
    from qtune.modeling.moe.experts import fuse_experts
    from qtune.modeling.moe.families import moe_family

    lora = {name: p for name, p in qtune_model.named_parameters() if p.requires_grad}
    fam = moe_family(reference.config)
    count = fam.expert_count(reference.config)

    def merged_parameters():
        """The reference's parameters with every LoRA delta added (built again for each backward pass)."""
        weights = {}
        for name, module in qtune_model.named_modules():
            if not hasattr(module, "lora_A"):
                continue
            base = module.base_layer
            weight = (
                bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
                if isinstance(base, bnb.nn.Linear4bit)
                else base.weight
            )
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
            weights[name.removeprefix("base_model.model.")] = (weight.detach() + delta, base.bias)
        params = dict(reference.named_parameters())
        for layer in range(reference.config.num_hidden_layers):
            prefix, experts = f"model.layers.{layer}.mlp.experts.", {}
            for key, (weight, bias) in weights.items():
                if key.startswith(prefix):
                    experts[key.removeprefix(prefix) + ".weight"] = weight
                    if bias is not None:
                        experts[key.removeprefix(prefix) + ".bias"] = bias
            params.update(fuse_experts(experts, fam, layer, count))
        params.update({key + ".weight": weight for key, (weight, _) in weights.items() if ".experts." not in key})
        return params

    total = sum(sum(1 for x in s["labels"][1:] if x != IGNORE) for s in samples)
    value = 0.0
    for p in lora.values():
        p.grad = None
    for s in samples:
        ids = torch.tensor([s["input_ids"]])
        logits = functional_call(reference, merged_parameters(), kwargs={"input_ids": ids}).logits
        targets = torch.tensor(s["labels"][1:])
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], targets, ignore_index=IGNORE, reduction="sum") / total
        loss.backward()
        value += loss.item()
    return value, {n: p.grad.detach().clone() for n, p in lora.items()}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_qtune_moe_forward_and_lora_gradients_equal_transformers_eager_moe(family, tiny_tokenizer):
    """qtune's routed 4-bit experts with LoRA on every expert and the attention, on one packed row through qtune's
    supervised-only loss, against transformers' own eager MoE (its fused experts) on the dequantized weights with the
    same LoRA deltas, each sample alone: the same loss and the same LoRA gradients."""
    from peft import LoraConfig, get_peft_model

    from qtune.data.packing import IGNORE, PackedCollator
    from qtune.modeling import loss as loss_stage
    from qtune.modeling.load import attention_implementation, peft_sees_per_expert_layers

    model = tiny_moe(family, tiny_tokenizer)
    model.config._attn_implementation = attention_implementation(model.config, "auto")
    reference = copy.deepcopy(model).eval()
    quantized(model)
    for p in model.parameters():
        p.requires_grad = False
    torch.manual_seed(0)
    with peft_sees_per_expert_layers(model):
        lora = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        )
    lora.eval()  # the same routing both sides: Mixtral's jitter noise is a training-time perturbation
    generator = torch.Generator().manual_seed(1)
    samples = []
    for length in (37, 5, 40, 12, 23, 9):
        ids = torch.randint(3, 500, (length,), generator=generator).tolist()
        prompt = int(torch.randint(0, max(1, length - 1), (1,), generator=generator))
        samples.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    batch = PackedCollator(pad_token_id=0, row_tokens=96)(samples)
    assert batch["input_ids"].shape[0] == 2
    head = loss_stage.fused_head_weight(lora)
    with loss_stage.last_hidden_state(lora) as captured:
        lora(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, logits_to_keep=1)
    loss_sum, count = loss_stage.supervised_loss_sum(captured["hidden"], batch["labels"], head, None)
    (loss_sum / count).backward()
    grads = {n: p.grad.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    assert any(".experts.3.down_proj.lora_A" in n for n in grads)
    assert_close((loss_sum / count).item(), grads, reference_loss_and_grads(lora, reference, samples, family))


def test_lora_reaches_every_expert_and_never_the_router(tmp_path, tiny_tokenizer):
    """peft >= 0.18 rewrites a LoRA config for the MoE families transformers 5 fused: it would put LoRA on the router
    and none on qtune's per-expert layers. attach_lora keeps peft's rewrite away; the control shows the rewrite is
    still there (when it goes, qtune.modeling.load.peft_sees_per_expert_layers can go too)."""
    from peft import LoraConfig, get_peft_model

    from qtune.config.recipe import LoraSection
    from qtune.modeling.load import attach_lora

    def adapted(model):
        return {
            n.split(".lora_A")[0].removeprefix("base_model.model.")
            for n, _ in model.named_parameters()
            if ".lora_A" in n
        }

    base = tiny_moe("qwen3_moe", tiny_tokenizer)
    quantized(base)
    control = copy.deepcopy(base)
    model = attach_lora(base, LoraSection(r=4, alpha=8), gradient_checkpointing=False)
    targets = adapted(model)
    experts = {
        f"model.layers.{la}.mlp.experts.{e}.{p}"
        for la in range(2)
        for e in range(4)
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert experts <= targets
    assert not any(name.endswith("mlp.gate") for name in targets)  # the router
    rewritten = adapted(get_peft_model(control, LoraConfig(r=4, target_modules="all-linear")))
    assert any(name.endswith("mlp.gate") for name in rewritten) and not experts & rewritten


def test_target_modules_experts_names_the_experts_alone(tiny_tokenizer):
    from qtune.config.recipe import LoraSection
    from qtune.modeling.load import attach_lora

    base = tiny_moe("mixtral", tiny_tokenizer)
    quantized(base)
    model = attach_lora(
        base, LoraSection(r=4, alpha=8, target_modules=["q_proj", "experts"]), gradient_checkpointing=False
    )
    leaves = {n.split(".lora_A")[0].split(".", 5)[-1] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert {name.rsplit(".", 1)[-1] for name in leaves} == {"q_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(".experts." in name for name in leaves if not name.endswith("q_proj"))


# --------------------------------------------------------------------------- each family end to end


@pytest.fixture(scope="module")
def moe_base(tmp_path_factory):
    """A pretrained tiny model of a family (TINY_SHAPE), built once per family for this module's runs."""
    from qtune.demo.tiny_models import write_tiny_model

    built = {}

    def base(family: str) -> Path:
        if family not in built:
            folder = tmp_path_factory.mktemp(f"moe-{family}") / family
            built[family] = write_tiny_model(folder, family, pretrain_steps=20, **TINY_SHAPE)
        return built[family]

    return base


@pytest.fixture(scope="module")
def moe_data(tmp_path_factory):
    from qtune.demo.tiny_models import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("moe-data") / "alpaca.jsonl", count=120)


# the formats each family exports
FAMILY_FORMATS = {
    "qwen3_moe": ["merged_fp16", "nf4", "gguf_f16", "gguf_q8_0", "gguf_q4_k_m"],
    "mixtral": ["merged_fp16", "nf4", "gguf_f16", "gguf_q4_k_m"],
    "olmoe": ["merged_fp16", "nf4", "gguf_f16", "gguf_q4_k_m"],
    "gpt_oss": ["merged_fp16", "nf4", "gguf_f16", "gguf_q4_k_m"],
}


# Mixtral and OLMoE take Qwen3-MoE's paths but for their names (Mixtral's per-expert w1/w3/w2, checked by the merge and
# GGUF unit tests and the slow llama.cpp tests): slow, to keep the default suite under its 15 minutes
@pytest.mark.parametrize(
    "family",
    [
        "qwen3_moe",
        pytest.param("mixtral", marks=pytest.mark.slow),
        pytest.param("olmoe", marks=pytest.mark.slow),
        "gpt_oss",
    ],
)
def test_each_family_trains_exports_and_chats(family, tmp_path, moe_base, moe_data, run_cli):
    """Train (the load-balancing loss reported), export to every format the family has, each through the fidelity
    gate, and chat with the NF4 export."""

    base = moe_base(family)
    raw = recipe_dict(
        base,
        moe_data,
        tmp_path / "run",
        train={"max_steps": 4, "eval_steps": 4, "save_steps": 4},
        export={"formats": FAMILY_FORMATS[family], "eval_samples": 4},
    )
    code, _, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert 1.0 < metrics["router_aux_loss"] < 4.0  # top-2 of 4 experts: 2 when perfectly balanced
    rows = json.loads((tmp_path / "run" / "export" / "export_report.json").read_text())["artifacts"]
    print({name: {k: row.get(k) for k in ("mean_kl", "top1_agreement")} for name, row in rows.items()})
    for name in FAMILY_FORMATS[family]:
        assert not rows[name].get("rejected"), (name, rows[name])
    assert rows["merged_fp16"]["mean_kl"] < 1e-6  # the merge into the NF4 weights training saw is exact
    # re-quantizing the merge costs little (measured 3e-4 to 2e-3); experts read back wrongly would cost far more
    assert rows["nf4"]["mean_kl"] < 0.01
    code, out, err = run_cli_with_input(
        run_cli,
        "chat",
        tmp_path / "run",
        "--artifact",
        tmp_path / "run" / "export" / "nf4",
        "--max-new-tokens",
        "4",
        stdin="Add the two numbers.\n",
    )
    assert code == 0, err[-2000:]


def run_cli_with_input(run_cli, *args, stdin: str):
    import io
    import sys

    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        return run_cli(*args)
    finally:
        sys.stdin = saved


# OLMoE and gpt-oss take the same paths as Qwen3-MoE and Mixtral here (which peft renames most); slow to keep the
# default suite's time
@pytest.mark.parametrize(
    "family",
    [
        "qwen3_moe",
        "mixtral",
        pytest.param("olmoe", marks=pytest.mark.slow),
        pytest.param("gpt_oss", marks=pytest.mark.slow),
    ],
)
def test_a_run_resumes_bit_identically_and_trains_from_its_nf4_export(family, tmp_path, moe_base, moe_data, run_cli):
    """A run killed after its checkpoint resumes to the same losses (the experts' LoRA weights restored, which peft's
    rename of their keys would lose); a base saved in 4 bits by qtune (the NF4 export) loads its experts as saved and
    trains on."""
    from helpers import interrupted_and_resumed, losses_after_step

    base = moe_base(family)
    raw = recipe_dict(base, moe_data, tmp_path / "full", export={"formats": ["nf4"], "eval_samples": 2})
    full, cut = interrupted_and_resumed(run_cli, tmp_path, raw)
    assert losses_after_step(cut, 3) == losses_after_step(full, 3)
    nf4 = full / "export" / "nf4"
    assert "quantization_config" in json.loads((nf4 / "config.json").read_text())
    # read back as saved: each expert's packed 4-bit weight, with no fused 16-bit experts made on the way
    from safetensors import safe_open

    from qtune.export.formats.nf4 import load_nf4
    from qtune.modeling.weights import checkpoint_tensors

    model = load_nf4(nf4, config=None, dtype=torch.float32, on_gpu=False)
    location = checkpoint_tensors(nf4)
    key = next(k for k in location if k.startswith("model.layers.1.") and k.endswith("experts.3.down_proj.weight"))
    with safe_open(str(location[key]), "pt") as handle:
        saved = handle.get_tensor(key)
    assert torch.equal(expert_layers(model)[-1].weight.data.flatten(), saved.flatten())
    assert not any(p.dim() == 3 for p in model.parameters())
    again = recipe_dict(
        nf4,
        moe_data,
        tmp_path / "again",
        train={"max_steps": 2, "eval_steps": 2},
        export={"formats": ["merged_fp16"], "eval_samples": 2},
    )
    code, _, err = run_cli("train", write_recipe(tmp_path / "again.yaml", again))
    assert code == 0, err[-3000:]
    rows = json.loads((tmp_path / "again" / "export" / "export_report.json").read_text())["artifacts"]
    assert rows["merged_fp16"]["mean_kl"] < 1e-5  # merged into the 4-bit experts it trained on, read as saved


# --------------------------------------------------------------------------- the plan and validate


@pytest.mark.parametrize(
    "config_name, total, active, published_total, published_active",
    [
        # Qwen counts the embeddings in its 3.3B activated; OpenAI leaves the input embedding out of its 3.6B
        ("qwen3-30b-a3b", 30_532_122_624, "active", 30.5e9, 3.3e9),
        ("gpt-oss-20b", 20_914_757_184, "without_embedding", 20.9e9, 3.6e9),
    ],
)
def test_the_plan_counts_total_and_active_parameters_as_published(
    config_name, total, active, published_total, published_active
):
    from qtune.modeling.config import load_config
    from qtune.planning.memory import inventory

    inv = inventory(load_config(str(REPO / "tests" / "model_configs" / config_name)))
    assert inv.total == total  # worked out by hand from the config's shapes
    assert abs(inv.total - published_total) < 0.06e9  # the model cards round down: 30.5B, 20.9B
    counted = inv.active if active == "active" else inv.active - inv.embeddings
    assert abs(counted - published_active) < 0.06e9, counted


def test_qwen3_30b_a3b_fits_a_24_gb_card_at_4096_tokens_and_gpt_oss_20b_a_t4():
    from qtune.config.recipe import load_recipe
    from qtune.planning.plan import plan_training

    configs = REPO / "tests" / "model_configs"
    recipe = load_recipe(REPO / "recipes" / "qwen3-30b-a3b-alpaca.yaml", [f"model.name={configs / 'qwen3-30b-a3b'}"])
    assert recipe.data.max_length >= 4096
    plan = plan_training(recipe, gpu_gib=24.0, compute_bytes=2)
    print(f"qwen3-30b-a3b: {plan['total_bytes'] / 2**30:.2f} GiB, largest max_length {plan['largest_max_length']}")
    assert plan["fits"] and plan["largest_max_length"] >= 4096
    assert plan["total_bytes"] <= 0.85 * 24 * 2**30  # headroom for what the plan does not see
    gpt_oss = load_recipe(
        REPO / "recipes" / "qwen3-30b-a3b-alpaca.yaml",
        [f"model.name={configs / 'gpt-oss-20b'}", "data.max_length=2048"],
    )
    plan = plan_training(gpt_oss, gpu_gib=15.0, compute_bytes=2)
    print(
        f"gpt-oss-20b: {plan['total_bytes'] / 2**30:.2f} GiB on a T4, largest max_length {plan['largest_max_length']}"
    )
    assert plan["fits"] and plan["largest_max_length"] >= 2048


@pytest.mark.parametrize(
    "config, says",
    [
        ({"model_type": "deepseek_v3", "n_routed_experts": 256}, "deepseek_v3 is a mixture of experts qtune"),
        (json.loads((REPO / "tests" / "model_configs" / "gpt-oss-20b" / "config.json").read_text()), "MXFP4"),
    ],
)
def test_validate_refuses_experts_qtune_cannot_quantize_in_one_line(tmp_path, run_cli, config, says):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    raw = recipe_dict(folder, tmp_path / "d.jsonl", tmp_path / "run")
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    code, _, err = run_cli("validate", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_methods_train_a_mixture_of_experts(method, tmp_path, moe_base, run_cli):
    """trl's DPO adds a frozen copy of the adapter as its reference: on a mixture of experts, peft's rename would put
    that copy elsewhere and the trainer would fail to build (qtune.training.methods.base_trainer keeps it away)."""
    from safetensors import safe_open

    from qtune.demo.tiny_models import write_demo_data

    base = moe_base("qwen3_moe")
    data = write_demo_data(tmp_path / "pairs.jsonl", count=60, preference=True)
    raw = recipe_dict(base, data, tmp_path / "run", fmt="preference", train={"method": method, "max_steps": 2})
    code, _, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err[-3000:]
    with safe_open(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert any(".experts.3.down_proj.lora_B" in key for key in keys) and not any(".mlp.gate.lora" in k for k in keys)


@pytest.mark.slow  # ~30 s: two processes
def test_ddp_trains_a_mixture_of_experts_whose_step_leaves_experts_unrouted(tmp_path, moe_data, tiny_tokenizer):
    """64 experts, one per token, one sample per rank and step: some experts get no token, so their LoRA
    weights no gradient. DDP then needs find_unused_parameters (qtune.training.arguments sets it for an MoE); without
    it the second step fails."""
    import sys

    from helpers import run_qtune

    model = tiny_moe("qwen3_moe", tiny_tokenizer, config_extra={"num_experts": 64, "num_experts_per_tok": 1})
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    raw = recipe_dict(
        tmp_path / "m",
        moe_data,
        tmp_path / "run",
        data={"max_length": 128},
        train={"micro_batch_size": 1, "max_steps": 3, "save_steps": 3, "eval_steps": 3},
    )
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    result = run_qtune(["-m", "qtune", "train", str(write_recipe(tmp_path / "r.yaml", raw))], launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
