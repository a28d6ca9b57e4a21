"""4-bit loading, dtype choice, pad token, LoRA targets, and the CPU repack trap."""

import json

import pytest
import torch
from transformers import AutoConfig

from qtune.config.recipe import LoraSection, ModelSection, QuantSection
from qtune.core.errors import EXIT_ENVIRONMENT, QtuneError, RecipeError
from qtune.modeling import load as model_stage
from qtune.modeling.precision import resolve_compute_dtype

LLAMA_BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize(
    "cuda, capability, expected",
    [
        (False, None, torch.float32),
        (True, (7, 5), torch.float16),
        (True, (7, 0), torch.float16),
        (True, (8, 0), torch.bfloat16),
        (True, (9, 0), torch.bfloat16),
    ],
)
def test_auto_compute_dtype(cuda, capability, expected):
    # A T4 is sm_75: torch.cuda.is_bf16_supported() says yes there (emulation), auto must say fp16.
    assert resolve_compute_dtype("auto", cuda_available=cuda, capability=capability) == expected


def test_explicit_fp16_on_cpu_is_refused():
    with pytest.raises(RecipeError, match="fp16 needs a GPU"):
        resolve_compute_dtype("fp16", cuda_available=False)


def test_pad_token_is_distinct_from_eos(tiny_llama):
    tokenizer = model_stage.load_tokenizer(ModelSection(name=str(tiny_llama)))
    assert tokenizer.pad_token is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"


def test_missing_model_folder_is_an_environment_error(tmp_path):
    with pytest.raises(QtuneError, match="no such folder") as info:
        model_stage.load_tokenizer(ModelSection(name=str(tmp_path / "nope")))
    assert info.value.code == EXIT_ENVIRONMENT
    with pytest.raises(QtuneError, match="no config.json"):
        model_stage.load_tokenizer(ModelSection(name=str(tmp_path)))


def test_hub_id_offline_is_an_environment_error():
    with pytest.raises(QtuneError, match=r"loading model 'someone/not-here' \(revision main\) failed") as info:
        model_stage.load_tokenizer(ModelSection(name="someone/not-here"))
    assert info.value.code == EXIT_ENVIRONMENT


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_base_loads_every_linear_in_4bit(tiny_llama, quant_type):
    import bitsandbytes as bnb

    base = model_stage.load_base(ModelSection(name=str(tiny_llama)), QuantSection(type=quant_type), torch.float32)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    blocks = AutoConfig.from_pretrained(tiny_llama).num_hidden_layers
    assert len(layers) == blocks * len(LLAMA_BLOCK_LINEARS)
    assert all(m.weight.quant_state.quant_type == quant_type for m in layers)
    assert all(m.weight.quant_state.nested for m in layers)  # double quantization
    assert not isinstance(base.get_output_embeddings(), bnb.nn.Linear4bit)
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)


def test_lora_targets_all_linear_and_checks_names(tiny_llama):
    base = model_stage.load_base(ModelSection(name=str(tiny_llama)), QuantSection(), torch.float32)
    assert model_stage.build_lora_config(LoraSection(), base).target_modules == "all-linear"  # peft expands it
    with pytest.raises(RecipeError, match=r"\['qkv_proj'\] match no layer.*q_proj"):
        model_stage.build_lora_config(LoraSection(target_modules=["q_proj", "qkv_proj"]), base)
    rs = model_stage.build_lora_config(LoraSection(use_rslora=True, use_dora=True, target_modules=["q_proj"]), base)
    assert rs.use_rslora and rs.use_dora and rs.target_modules == {"q_proj"}


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "phi3"])
def test_peft_all_linear_adapts_the_layers_qtune_did_and_starts_from_the_same_adapter(tmp_path, family):
    """all-linear is peft's now; before, qtune listed every linear layer but the output head itself. The layers adapted
    and the initial adapter (the same random draws, in the same order) are what they were, so a run's numbers are."""
    from helpers import TINY_SHAPE

    from qtune.demo.tiny_models import write_tiny_model

    model_dir = write_tiny_model(tmp_path / family, family, **TINY_SHAPE)

    def adapted(targets):
        base = model_stage.load_base(ModelSection(name=str(model_dir)), QuantSection(), torch.float32)
        hand_listed = model_stage.linear_module_names(base)  # qtune's own rule, as it was
        torch.manual_seed(0)
        model = model_stage.attach_lora(
            base, LoraSection(target_modules=targets or hand_listed), gradient_checkpointing=False
        )
        weights = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
        return hand_listed, weights

    hand_listed, by_hand = adapted(None)
    _, by_peft = adapted("all-linear")
    assert by_peft.keys() == by_hand.keys() and len(by_hand) > 0
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in by_peft} == set(hand_listed)
    assert all(torch.equal(by_peft[name], by_hand[name]) for name in by_hand)


def test_training_mode_keeps_qtune_s_ops(tiny_llama):
    """transformers 5.25 re-kernelizes a model whenever it switches to training mode (with the `kernels` package,
    which it installs), resetting each module's forward: qtune's lean RMSNorm and SwiGLU were silently gone in every
    training step. They must survive model.train(), which the Trainer calls before each step."""
    base = model_stage.load_base(ModelSection(name=str(tiny_llama)), QuantSection(), torch.float32)
    model = model_stage.attach_lora(base, LoraSection(dropout=0.1), gradient_checkpointing=False)
    model.train()
    model.eval()
    model.train()
    layer = base.model.layers[0]
    assert layer.input_layernorm.forward.__func__.__name__ == "_lean_norm_forward"
    assert layer.mlp.forward.__func__.__name__ == "_lean_mlp_forward"
    assert layer.self_attn.q_proj.lora_A["default"].forward.__func__.__name__ == "_dropout_then_linear"


@pytest.fixture
def cpu_with_avx512bf16(monkeypatch):
    """Make bitsandbytes believe this CPU has AVX512-BF16, as the machines where the trap was found do.

    Without this the tests below would pass on a CPU lacking the instruction even with the guard gone.
    """
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)


def lora_gradients(model_dir, *, eval_first: bool, repack_guard: bool = True):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    base = model_stage.load_base(ModelSection(name=str(model_dir)), QuantSection(), torch.float32)
    if not repack_guard:
        for module in base.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on such a CPU
    torch.manual_seed(0)
    model = model_stage.attach_lora(base, LoraSection(dropout=0.0), gradient_checkpointing=False)
    batch = torch.randint(0, 500, (2, 64), generator=torch.Generator().manual_seed(1))
    if eval_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=batch)
    model.train()
    model(input_ids=batch, labels=batch).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_eval_before_train_keeps_gradients(tiny_llama, cpu_with_avx512bf16):
    """bitsandbytes repacks 4-bit weights on a no-grad CPU forward; qtune's guard keeps training exact."""
    import bitsandbytes as bnb

    assert bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu  # the pretence took effect
    clean = lora_gradients(tiny_llama, eval_first=False)
    after_eval = lora_gradients(tiny_llama, eval_first=True)
    assert torch.equal(clean, after_eval)


@pytest.mark.filterwarnings("ignore:bitsandbytes..gemv_4bit:UserWarning")  # the repacked op, reached on purpose here
def test_the_repack_trap_is_real(tiny_llama, cpu_with_avx512bf16):
    """Why the guard exists: without it, gradients after an eval pass are wrong (cosine 0.34 on the
    machine where it was found; near 0 on this tiny model)."""
    clean = lora_gradients(tiny_llama, eval_first=False)
    trapped = lora_gradients(tiny_llama, eval_first=True, repack_guard=False)
    cosine = torch.nn.functional.cosine_similarity(clean, trapped, dim=0).item()
    assert cosine < 0.99


def test_a_one_token_row_trains_with_exact_gradients(tiny_llama, cpu_with_avx512bf16):
    """bitsandbytes sends a single-token input that needs no gradient to `gemv_4bit`, an op without a backward (torch
    warns "may lead to silently incorrect behavior" when one backprops through it). In training that input is the
    frozen embedding's output, so nothing needs its gradient: the LoRA gradients of one token alone equal half those
    of the same token twice in a batch, which goes through bitsandbytes' differentiable MatMul4Bit. The suite turns
    that torch warning into an error (pyproject.toml), so a training path that does backprop through gemv_4bit fails.
    """
    torch.manual_seed(0)
    base = model_stage.load_base(ModelSection(name=str(tiny_llama)), QuantSection(), torch.float32)
    torch.manual_seed(0)
    model = model_stage.attach_lora(base, LoraSection(dropout=0.0), gradient_checkpointing=False)
    for module in model.modules():  # LoRA B starts at zero: make every branch carry a gradient to its A
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.02)
    model.train()

    def gradients(ids):
        model.zero_grad()
        model(input_ids=torch.tensor(ids)).logits.float().pow(2).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    one, twice = gradients([[17]]), gradients([[17], [17]])
    assert one.abs().sum() > 0
    torch.testing.assert_close(2 * one, twice, rtol=1e-4, atol=1e-6)


def test_the_attention_kernel_is_chosen_per_family():
    from transformers import Gemma2Config, LlamaConfig

    from qtune.core.errors import RecipeError

    assert model_stage.attention_implementation(LlamaConfig(), "auto") == "sdpa"
    assert model_stage.attention_implementation(Gemma2Config(), "auto") == "eager"  # soft-capped attention logits
    assert model_stage.attention_implementation(Gemma2Config(), "eager") == "eager"
    with pytest.raises(RecipeError, match="soft-cap"):
        model_stage.attention_implementation(Gemma2Config(), "sdpa")


def test_gemma2_loads_and_trains(tmp_path, alpaca_file, run_cli):
    """It did not load at all: transformers refuses Gemma 2 with SDPA, and qtune asked for SDPA."""
    from helpers import TINY_SHAPE, recipe_dict, write_recipe

    from qtune.demo.tiny_models import write_tiny_model

    # a Gemma 2 whose query scale is not its head size: llama.cpp would scale its queries differently
    base = write_tiny_model(tmp_path / "gemma2", "gemma2", **TINY_SHAPE)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "query_pre_attn_scalar": 256}))
    raw = recipe_dict(base, alpaca_file, tmp_path / "run", train={"max_steps": 2, "save_steps": 2, "eval_steps": 2})
    code, _out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_an_export_format_the_architecture_lacks_is_refused_before_training(tmp_path, alpaca_file, run_cli):
    from helpers import TINY_SHAPE, recipe_dict, write_recipe

    from qtune.demo.tiny_models import write_tiny_model

    # a Gemma 2 whose query scale is not its head size: llama.cpp would scale its queries differently
    base = write_tiny_model(tmp_path / "gemma2", "gemma2", **TINY_SHAPE)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "query_pre_attn_scalar": 256}))
    raw = recipe_dict(base, alpaca_file, tmp_path / "run", export={"formats": ["merged_fp16", "gguf_q8_0"]})
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    for command in ("validate", "train"):
        code, _out, err = run_cli(command, recipe)
        assert code == 2, err
        assert "GGUF export needs query_pre_attn_scalar equal to the head size (256 != 32)" in err
        assert "so not gguf_q8_0" in err
        assert "for this model: adapter, merged_fp16, merged_bf16, nf4" in err
    assert not (tmp_path / "run").exists()
