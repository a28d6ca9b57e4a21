"""Preference tuning: DPO and ORPO from the same recipe on the same 4-bit base, with the guarantees SFT has.

The learnable preference of these tests: the chosen answer is a word from one half of the tiny vocabulary, the
rejected one a word from the other half. A model has no reason to prefer either half before training (ORPO starts
near chance), and the halves are the same in the validation split, so what is learned carries over."""

import json
import random
import re

import pytest
import torch
from helpers import recipe_dict, write_jsonl, write_recipe

from qtune.config.recipe import DataSection, validate_recipe
from qtune.core.errors import DataError, RecipeError


def vocabulary_pairs(count: int, seed: int = 0) -> list[dict]:
    from qtune.data.templates import alpaca_prompt
    from qtune.demo.tiny_models import WORDS

    rng = random.Random(seed)
    words = sorted(set(WORDS))
    random.Random(0).shuffle(words)
    good, bad = words[: len(words) // 2], words[len(words) // 2 :]
    return [
        {
            "prompt": alpaca_prompt("Name a word.", rng.choice(words)),
            "chosen": rng.choice(good),
            "rejected": rng.choice(bad),
        }
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", vocabulary_pairs(300))


def preference_recipe(model_dir, data_file, output_dir, method="dpo", **sections):
    raw = recipe_dict(model_dir, data_file, output_dir, fmt="preference", **sections)
    raw["train"]["method"] = method
    raw["data"].update({"max_length": 192, "val_size": 0.2, **sections.get("data", {})})
    return raw


# --------------------------------------------------------------------------- the recipe


def test_the_recipe_ties_method_data_and_settings_together():
    base = {"model": {"name": "m"}, "data": {"datasets": [{"path": "p.jsonl", "format": "preference"}]}}

    def check(train, **sections):
        return validate_recipe({**base, "train": {"output_dir": "o", **train}, **sections})

    assert check({"method": "dpo"}, dpo={"beta": 0.3}).dpo.beta == 0.3
    assert check({"method": "orpo"}, orpo={"beta": 1.0}).orpo.beta == 1.0
    refusals = [
        (({"method": "sft"},), {}, "preference data needs train.method: dpo or orpo"),
        (({"method": "dpo"},), {"orpo": {"beta": 1}}, "the orpo section is set but train.method is dpo"),
        (({"method": "orpo"},), {"dpo": {"loss_type": "ipo"}}, "the dpo section is set but train.method is orpo"),
        (({"method": "dpo"},), {"dpo": {"los_type": "ipo"}}, "did you mean 'dpo.loss_type'"),
        (({"method": "dpo"},), {"dpo": {"loss_type": "kto"}}, "'dpo.loss_type' is 'kto'"),
        (({"method": "dpo"},), {"dpo": {"loss_type": "exo_pair"}}, "exo_pair needs label_smoothing > 0"),
        (({"method": "dpo"},), {"dpo": {"beta": 0}}, "'dpo.beta'"),
        (({"method": "dpa"},), {}, "did you mean 'dpo'"),
    ]
    for (train,), sections, message in refusals:
        with pytest.raises(RecipeError, match=re.escape(message)):
            check(train, **sections)
    sft_data = {**base, "data": {"datasets": [{"path": "p.jsonl", "format": "alpaca"}]}}
    with pytest.raises(RecipeError, match="give every dataset format: preference"):
        validate_recipe({**sft_data, "train": {"output_dir": "o", "method": "orpo"}})
    with pytest.raises(RecipeError, match="never trains on prompts"):
        validate_recipe(
            {**base, "data": {**base["data"], "train_on_inputs": True}, "train": {"output_dir": "o", "method": "dpo"}}
        )


def test_a_changed_beta_is_a_changed_recipe_for_resume():
    from qtune.training.resume import recipe_differences

    raw = {
        "model": {"name": "m"},
        "data": {"datasets": [{"path": "p.jsonl", "format": "preference"}]},
        "train": {"output_dir": "o", "method": "dpo"},
    }
    changed = validate_recipe({**raw, "dpo": {"beta": 0.5}})
    assert recipe_differences(validate_recipe(raw), changed) == ["dpo.beta: 0.1 -> 0.5"]


# --------------------------------------------------------------------------- the data


def build(tmp_path, rows, tokenizer, **data):
    from qtune.data.pairs import build as build_pairs

    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    section = DataSection(datasets=[{"path": str(path), "format": "preference"}], val_size=0, **data)
    return build_pairs(section, tokenizer, seed=0)


def test_text_pairs_are_tokenized_as_prompt_completion_rows_are(tmp_path, tiny_tokenizer):
    prepared = build(tmp_path, [{"prompt": "Add 2 and 3.\n", "chosen": "5", "rejected": "6"}], tiny_tokenizer)
    row = prepared.train[0]
    eos = tiny_tokenizer.eos_token_id
    assert row["prompt_ids"] == tiny_tokenizer("Add 2 and 3.\n").input_ids
    assert row["chosen_ids"] == tiny_tokenizer("5", add_special_tokens=False).input_ids + [eos]
    assert row["rejected_ids"] == tiny_tokenizer("6", add_special_tokens=False).input_ids + [eos]
    assert prepared.report["prompt_style"] == "raw"


def test_the_conversation_layouts_of_hub_preference_sets_give_the_same_tokens(tmp_path, tiny_tokenizer):
    user = {"role": "user", "content": "What is 2 + 3?"}
    good, bad = {"role": "assistant", "content": "5"}, {"role": "assistant", "content": "6"}
    layouts = {
        "explicit": {"prompt": [user], "chosen": [good], "rejected": [bad]},
        "implicit": {"chosen": [user, good], "rejected": [user, bad]},
        # ultrafeedback-binarized: a text prompt and whole conversations
        "ultrafeedback": {"prompt": user["content"], "chosen": [user, good], "rejected": [user, bad]},
        "text prompt": {"prompt": user["content"], "chosen": [good], "rejected": [bad]},
        "sharegpt keys": {
            "chosen": [{"from": "human", "value": user["content"]}, {"from": "gpt", "value": "5"}],
            "rejected": [{"from": "human", "value": user["content"]}, {"from": "gpt", "value": "6"}],
        },
    }
    rows = {
        name: build(tmp_path, [row], tiny_tokenizer, chat_template="chatml").train[0] for name, row in layouts.items()
    }
    first = rows["explicit"]
    assert all(row == first for row in rows.values()), {k: v for k, v in rows.items() if v != first}
    # the prompt is the template's prompt up to the assistant's turn marker, never scored; each answer ends its turn
    assert (
        tiny_tokenizer.decode(first["prompt_ids"])
        == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tiny_tokenizer.decode(first["chosen_ids"]) == "5<|im_end|>\n"
    assert tiny_tokenizer.decode(first["rejected_ids"]) == "6<|im_end|>\n"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "chosen": "a"}, "'rejected' is missing"),
        ({"prompt": "p", "chosen": " ", "rejected": "b"}, "'chosen' is empty"),
        ({"chosen": "a", "rejected": "b"}, "'prompt' is missing"),
        ({"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "both be text or both"),
        (
            {"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
            "no prompt",
        ),
        (
            {
                "prompt": "p",
                "chosen": [{"role": "assistant", "content": ""}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "'chosen' is empty",
        ),
        (
            {
                "prompt": "p",
                "chosen": [{"role": "robot", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "unknown role",
        ),
    ],
)
def test_a_bad_row_is_refused_with_its_row_and_line_number(tmp_path, tiny_tokenizer, row, message):
    from qtune.data.pairs import build as build_pairs

    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{good}\n\n{good}\n{json.dumps(row)}\n")  # a blank line: the third row is on line 4
    section = DataSection(datasets=[{"path": str(path), "format": "preference"}], val_size=0, chat_template="chatml")
    with pytest.raises(DataError, match=message) as refused:
        build_pairs(section, tiny_tokenizer, seed=0)
    assert "row 3 (line 4)" in str(refused.value)


def test_pairs_that_cannot_teach_are_counted_and_dropped_and_all_of_them_refused(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "word " * 80, "chosen": "a", "rejected": "b"},  # the prompt fills max_length
        {"prompt": "p", "chosen": "x " * 40 + "a", "rejected": "x " * 40 + "b"},  # they differ only past max_length
        {"prompt": "p", "chosen": "long " * 40, "rejected": "b"},  # truncated, kept
    ]
    report = build(tmp_path, rows, tiny_tokenizer, max_length=48).report
    assert (report["train_samples"], report["identical"], report["no_room"], report["truncated"]) == (2, 2, 1, 2)
    with pytest.raises(DataError, match="no usable training preference pair: 2 have identical"):
        build(tmp_path, rows[1:4], tiny_tokenizer, max_length=48)


def test_bad_data_stops_train_before_the_model_loads_and_leaves_no_folder(tmp_path, tiny_llama, run_cli):
    data = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3 + [{"prompt": "p"}]
    )
    recipe = write_recipe(tmp_path / "r.yaml", preference_recipe(tiny_llama, data, tmp_path / "run"))
    code, out, err = run_cli("train", recipe)
    assert code == 3 and err.strip().count("\n") == 0, err
    assert err.startswith("qtune: error: 'chosen' is missing") and "row 4 (line 4)" in err
    assert "model: loading" not in out and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def preference_runs(tmp_path_factory, pretrained_llama, pairs_file):
    """A DPO run (60 steps) and an ORPO run (120) on the pretrained tiny Llama, evaluated before and after."""
    from qtune.cli import main

    runs = {}
    # ORPO's odds-ratio term shares the loss with the chosen answers' language-model loss: it takes more steps
    for method, settings, steps in (("dpo", {"beta": 0.1}, 60), ("orpo", {"beta": 1.0}, 120)):
        folder = tmp_path_factory.mktemp(method)
        raw = preference_recipe(
            pretrained_llama,
            pairs_file,
            folder / "run",
            method,
            train={"max_steps": steps, "eval_steps": steps, "save_steps": 60, "logging_steps": 10, "lr": 3e-3},
            **{method: settings},
        )
        assert main(["train", str(write_recipe(folder / "r.yaml", raw))]) == 0
        runs[method] = folder / "run"
    return runs


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_dpo_and_orpo_learn_a_learnable_preference(preference_runs, method):
    run = preference_runs[method]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["eval_perplexity"] is None
    before, after = metrics["eval_reward_accuracy_before"], metrics["eval_reward_accuracy"]
    print(method, "validation reward accuracy", before, "->", after, "margin", metrics["eval_reward_margin"])
    if method == "dpo":
        # the policy starts as its reference: every reward is 0, and trl counts a tie as not preferred
        assert before == 0.0 and metrics["eval_reward_margin_before"] == 0.0
    else:
        assert 0.3 <= before <= 0.7, before  # about chance: the model has no reason to prefer either half
    assert after >= 0.8, (before, after)
    assert metrics["eval_reward_margin"] > 0.05 and metrics["eval_loss"] < metrics["eval_loss_before"]
    assert (
        metrics["train_reward_accuracy"] is not None and metrics["eval_logps_chosen"] > metrics["eval_logps_rejected"]
    )
    assert (run / "loss.png").stat().st_size > 10_000
    # the adapter holds the trained weights only, no reference copy
    assert sorted(p.name for p in (run / "adapter").iterdir() if p.is_dir()) == []


def test_the_progress_line_shows_the_reward_accuracy(tmp_path, pretrained_llama, pairs_file, run_cli):
    raw = preference_recipe(
        pretrained_llama, pairs_file, tmp_path / "run", "orpo", train={"max_steps": 2, "eval_steps": 2}
    )
    code, out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    assert "train: orpo, ORPO: no reference model" in out
    assert "step 0: eval_loss" in err + out and "reward accuracy" in err + out
    assert "validation reward accuracy before -> after:" in out  # the closing line


def test_dpo_continues_an_sft_adapter_and_takes_it_as_its_reference(tmp_path, llama_run, preference_runs, pairs_file):
    """Starting from the SFT adapter, the policy equals the reference before the first step: rewards exactly 0. Were
    the reference the base, or the adapter's copy rounded to bf16 (trl's cast of trainable weights), they would not
    be."""
    from safetensors.torch import load_file

    from qtune.cli import main

    sft = open_recipe(llama_run)
    raw = preference_recipe(
        sft["model"]["name"],
        pairs_file,
        tmp_path / "run",
        "dpo",
        model={"name": sft["model"]["name"], "adapter": str(llama_run)},
        train={"max_steps": 4, "eval_steps": 4, "save_steps": 4},
    )
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", raw))]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval_reward_chosen_before"] == 0.0 and metrics["eval_reward_rejected_before"] == 0.0
    # the reference scores differ from the base's (the fresh-adapter DPO run's reference)
    fresh = json.loads((preference_runs["dpo"] / "metrics.json").read_text())
    assert abs(metrics["eval_logps_chosen_before"] - fresh["eval_logps_chosen_before"]) > 1e-3
    trained = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    started = load_file(llama_run / "adapter" / "adapter_model.safetensors")
    assert trained.keys() == started.keys()
    assert any(not torch.equal(trained[k], started[k]) for k in trained)
    assert all(t.dtype == torch.float32 for t in trained.values())


def open_recipe(run):
    import yaml

    return yaml.safe_load((run / "recipe.yaml").read_text())


def test_an_adapter_of_another_base_is_refused_before_anything_loads(
    tmp_path, llama_run, tiny_qwen2, pairs_file, run_cli
):
    raw = preference_recipe(tiny_qwen2, pairs_file, tmp_path / "run", model={"adapter": str(llama_run / "adapter")})
    code, out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 2 and "was trained on" in err and str(tiny_qwen2) in err, err
    assert "model: loading" not in out and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "method, settings", [("dpo", {}), ("orpo", {"beta": 1.0}), ("dpo", {"loss_type": ["sigmoid", "sft"]})]
)
def test_one_pair_at_a_time_gives_the_batched_gradients(tmp_path, pretrained_llama, method, settings):
    """The lean path (backward pair by pair, each pair cut to its own length) against trl's own batched step. With
    trl's "sft" term (a mean over the batch's tokens) qtune runs the batched step itself."""
    from qtune.config.recipe import load_recipe
    from qtune.demo.tiny_models import write_demo_data
    from qtune.training.methods.base_trainer import QtuneTrainerMixin
    from qtune.training.run import prepare

    pairs = write_demo_data(tmp_path / "demo-pairs.jsonl", count=40, preference=True)  # answers of many lengths
    raw = preference_recipe(pretrained_llama, pairs, tmp_path / "run", method, **{method: settings})
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", raw))
    (tmp_path / "run").mkdir()
    trainer = prepare(recipe, tmp_path / "run", resume=False).trainer
    assert trainer.pair_by_pair == ("sft" not in settings.get("loss_type", []))
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    batch = next(iter(trainer.get_train_dataloader()))
    widths = batch["attention_mask"].sum(dim=1)
    assert widths.min() < batch["input_ids"].shape[1], "the batch should carry padding to cut"

    def gradients(step):
        trainer.model.zero_grad()
        loss = step(trainer.model, batch)
        return loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    lean_loss, lean = gradients(trainer.micro_batch_step)
    plain_loss, plain = gradients(lambda model, inputs: QtuneTrainerMixin.micro_batch_step(trainer, model, inputs))
    assert torch.allclose(lean_loss, plain_loss, rtol=1e-5, atol=1e-7)
    for name in plain:
        # the two paths add the same terms in another order: elements near zero differ by float32 rounding of the
        # tensor's scale (up to 2e-6 of it measured on an AMD EPYC), which an absolute 1e-8 failed on
        atol = 1e-5 * plain[name].abs().max().item()
        assert torch.allclose(lean[name], plain[name], rtol=1e-4, atol=atol), name


def test_orpo_loss_equals_the_paper_computed_from_full_logits(tmp_path, pretrained_llama, pairs_file):
    """qtune's ORPO (trl's fused head, answer positions only) against the loss from the model's plain logits."""
    import torch.nn.functional as F

    from qtune.config.recipe import load_recipe
    from qtune.training.run import prepare

    raw = preference_recipe(pretrained_llama, pairs_file, tmp_path / "run", "orpo", orpo={"beta": 0.5})
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", raw))
    (tmp_path / "run").mkdir()
    trainer = prepare(recipe, tmp_path / "run", resume=False).trainer
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.orpo_loss(trainer.model, batch)
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].float()
    token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, targets[..., None])[..., 0] * mask
    mean_logps = token_logps.sum(1) / mask.sum(1)
    chosen, rejected = mean_logps.chunk(2)
    nll = -chosen.mean()  # per pair, then over pairs
    log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
    expected = nll - 0.5 * F.logsigmoid(log_odds).mean()
    assert torch.allclose(loss, expected, rtol=1e-5), (loss, expected)


def test_the_plan_counts_both_sequences_of_a_pair(tmp_path, pretrained_llama, pairs_file):
    from qtune.planning.plan import plan_training

    sft = validate_recipe(recipe_dict(pretrained_llama, pairs_file, tmp_path / "a"))
    dpo = validate_recipe(preference_recipe(pretrained_llama, pairs_file, tmp_path / "b", data={"max_length": 128}))
    plans = [plan_training(r, device="cpu", compute_bytes=4) for r in (sft, dpo)]
    assert plans[1]["sequences_in_flight"] == 2 and plans[1]["tokens_per_micro_batch"] == 2 * 128
    assert plans[1]["parts"]["activations"] == pytest.approx(2 * plans[0]["parts"]["activations"], rel=1e-6)
    # with trl's "sft" term the micro-batch runs batched: all of its pairs at once
    rpo = validate_recipe(
        preference_recipe(
            pretrained_llama,
            pairs_file,
            tmp_path / "c",
            data={"max_length": 128},
            dpo={"loss_type": ["sigmoid", "sft"]},
        )
    )
    assert plan_training(rpo, device="cpu", compute_bytes=4)["sequences_in_flight"] == 2 * rpo.train.micro_batch_size


# --------------------------------------------------------------------------- after training: export, card, chat


def test_a_preference_run_exports_and_its_card_says_the_method_and_data(preference_runs, run_cli):
    from qtune.publish.chat import load_for_generation
    from qtune.publish.model_card import model_card

    run = preference_runs["dpo"]
    code, out, err = run_cli("export", run, "--format", "merged_fp16", "--format", "nf4", "--format", "gguf_q8_0")
    assert code == 0, err
    report = json.loads((run / "export" / "export_report.json").read_text())
    assert report["artifacts"]["merged_fp16"]["top1_agreement"] >= 0.99
    card = model_card(run, "me/dpo-demo", ["adapter", "gguf"], {"model-q8_0.gguf": run})
    assert "DPO on preference pairs (beta 0.1, loss sigmoid); reference: the base model (adapter off)" in card
    assert "pairs.jsonl (preference)" in card and "validation reward accuracy before -> after | 0.000 ->" in card
    assert "- dpo" in card  # a tag
    model, tokenizer, style = load_for_generation(run)
    assert style == "alpaca"  # its prompts were alpaca prompts, so chat writes them so too
    # (this DPO-only run answers with EOS at once: it learned the preference, not to say more; see the README's demo)
    code, out, err = run_cli("generate", run, "--prompt", "Name a word.", "--input", "river", "--max-new-tokens", "4")
    assert code == 0, err
    page = (run / "report.html").read_text()  # the run's page shows the reward accuracy and the export
    assert "Validation reward accuracy" in page and ">gguf_q8_0</td>" in page
    # qtune eval scores the chosen answers: DPO made them likelier than the base does
    code, out, err = run_cli("eval", run)
    assert code == 0, err
    table = json.loads((run / "eval_report.json").read_text())["models"]
    assert table["adapter"]["loss"] < table["base (4-bit)"]["loss"] and "training's own eval_loss" not in out


# --------------------------------------------------------------------------- survival


@pytest.fixture(scope="module")
def dpo_survival(tmp_path_factory, tiny_llama, pairs_file):
    """A DPO recipe as tests/test_survival.py runs SFT ones (a checkpoint every step), and its uninterrupted run."""
    from helpers import STEPS, adapter_tensors, finish, run_dir, trained_sequence

    def recipe_in(folder):
        raw = preference_recipe(
            tiny_llama,
            pairs_file,
            folder / "run",
            train={"max_steps": STEPS, "save_steps": 1, "keep_checkpoints": 2, "eval_steps": None},
        )
        return write_recipe(folder / "r.yaml", raw)

    reference = recipe_in(tmp_path_factory.mktemp("dpo-reference"))
    done = finish(reference)
    assert done.returncode == 0, done.stderr[-2000:]
    return recipe_in, (adapter_tensors(run_dir(reference)), trained_sequence(run_dir(reference)))


def test_a_dpo_run_killed_then_stopped_resumes_bit_identically(tmp_path, dpo_survival):
    import signal

    from helpers import assert_same_as_reference, finish, kill_at_step, run_dir, start, wait_for_step

    recipe_in, reference = dpo_survival
    recipe = recipe_in(tmp_path)
    assert kill_at_step(recipe, 5) == -signal.SIGKILL
    process = start(recipe, "--resume")
    wait_for_step(process, recipe, 12)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 75
    assert "--resume" in process.stderr.read().strip().splitlines()[-1]
    done = finish(recipe, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_as_reference(run_dir(recipe), reference)


def test_a_hub_adapter_that_cannot_be_read_is_one_line_before_anything_loads(tmp_path, tiny_llama, pairs_file, run_cli):
    raw = preference_recipe(tiny_llama, pairs_file, tmp_path / "run", model={"adapter": "someone/dpo-adapter"})
    code, out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))  # HF_HUB_OFFLINE=1 in the tests
    assert code == 4 and err.startswith("qtune: error:") and "someone/dpo-adapter" in err, err
    assert err.strip().count("\n") == 0 and "model: loading" not in out and not (tmp_path / "run").exists()


def test_dpo_under_ddp_matches_one_process(tmp_path, pretrained_llama, pairs_file):
    """torchrun, 2 ranks x 2 pairs (trained pair by pair, the first without a gradient sync) against 1 process x 2
    pairs x 2 accumulation: the same losses, gradient norms and adapter on both ranks."""
    import sys

    from helpers import run_qtune, step_losses

    raw = preference_recipe(
        pretrained_llama, pairs_file, tmp_path / "ddp", train={"micro_batch_size": 2, "max_steps": 3, "save_steps": 3}
    )
    recipe = write_recipe(tmp_path / "ddp.yaml", raw)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    result = run_qtune(["-m", "qtune", "train", str(recipe)], launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    overrides = ["--set", f"train.output_dir={tmp_path / 'single'}", "--set", "train.grad_accum=2"]
    single = run_qtune([sys.executable, "-m", "qtune", "train", str(recipe), *overrides])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp, one = tmp_path / "ddp", tmp_path / "single"
    assert json.loads((ddp / "metrics.json").read_text())["world_size"] == 2
    fingerprints = [json.loads((ddp / "sample_trace" / f"final-rank-{r}.json").read_text()) for r in (0, 1)]
    assert fingerprints[0] == fingerprints[1]
    ddp_losses, one_losses = step_losses(ddp, 3), step_losses(one, 3)
    assert len(ddp_losses) == 3
    for (step, loss, norm), (_, loss_one, norm_one) in zip(ddp_losses, one_losses):
        assert loss == pytest.approx(loss_one, rel=1e-4), step
        assert norm == pytest.approx(norm_one, rel=1e-4), step


def test_dpo_continues_an_adapter_from_the_hub_and_pushes_its_card(hub, llama_run, tmp_path, pairs_file, run_cli):  # noqa: F811
    """model.adapter as a Hub repo (a local stand-in of the Hub): its base checked from adapter_config.json, its
    weights as the start and the reference; then the DPO run pushed, its card saying what it is."""
    from helpers import assert_canary_absent

    code, _, err = run_cli("push", llama_run, "--repo", "someone/tiny-sft", "--what", "adapter")
    assert code == 0, err
    base = open_recipe(llama_run)["model"]["name"]
    raw = preference_recipe(
        base,
        pairs_file,
        tmp_path / "run",
        model={"name": base, "adapter": "someone/tiny-sft"},
        train={"max_steps": 2, "eval_steps": 2, "save_steps": 2},
    )
    code, out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    assert "LoRA continues someone/tiny-sft" in out and "reference: the loaded adapter someone/tiny-sft" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval_reward_chosen_before"] == 0.0 and metrics["eval_reward_rejected_before"] == 0.0
    code, _, err = run_cli("push", tmp_path / "run", "--repo", "someone/tiny-dpo", "--what", "adapter")
    assert code == 0, err
    card = hub.repos["someone/tiny-dpo"]["files"]["README.md"].decode()
    assert (
        "DPO on preference pairs (beta 0.1, loss sigmoid); reference: that adapter; continues the adapter someone/tiny-sft"
        in card
    )
    assert "validation reward accuracy before -> after | 0.000 ->" in card
    assert_canary_absent(hub, [tmp_path / "run"])
