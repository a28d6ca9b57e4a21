"""GRPO with verifiable rewards on the same 4-bit base: the rewards, the checks before the model loads, a reward that
rises, and the guarantees the other methods have."""

import json
import math

import pytest
from helpers import recipe_dict, write_jsonl, write_recipe

from qtune.config.recipe import validate_recipe
from qtune.core.errors import RecipeError
from qtune.training.rewards import build_reward


def spec(**fields):
    from qtune.training.methods.grpo import RewardSpec

    return RewardSpec(**fields)


# --------------------------------------------------------------------------- the rewards


def test_exact_match_and_numeric_read_gsm8k_answers():
    gsm8k = "Natalia sold 48/2 = 24 clips in May.\nAltogether 48+24 = 72 clips.\n#### 1,072"
    exact = build_reward(spec(function="exact_match", pattern=r"answer is\s*([^\n]+)"), r"####\s*(.+)")
    completions = ["So the answer is 1072.", "so the answer is 1,072", "The answer is 1073", "no answer here"]
    assert exact(completions=completions, answer=[gsm8k] * 4) == [1.0, 1.0, 0.0, 0.0]
    numeric = build_reward(spec(function="numeric", pattern=r"answer is\s*([^\n]+)", tolerance=0.5), r"####\s*(.+)")
    assert numeric(completions=["the answer is 1072.4", "the answer is 1,073", "x"], answer=[gsm8k] * 3) == [
        1.0,
        0.0,
        0.0,
    ]
    whole = build_reward(spec(function="exact_match"), None)  # no patterns: the whole completion and answer
    assert whole(completions=["  Paris. ", "paris", "Rome"], answer=["paris"] * 3) == [1.0, 1.0, 0.0]


def test_the_gsm8k_recipes_rewards_score_gsm8k_rows():
    """recipes/qwen3-4b-grpo-gsm8k.yaml's rewards on a GSM8K row: the exact final number and the format."""
    from qtune.config.recipe import load_recipe

    recipe = load_recipe("recipes/qwen3-4b-grpo-gsm8k.yaml", ["model.name=tests/model_configs/qwen3-4b"])
    section = recipe.grpo
    exact, form = (build_reward(spec, section.reference_pattern) for spec in section.rewards)
    answer = [
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    ]
    completions = [
        "She sold 24 in May, so 48 + 24 = 72.\n#### 72",  # right, formatted
        "She sold 24 in May, so 48 + 24 = 72.\n#### 1,072",  # wrong number
        "The answer is 72.",  # right number, no format
        "48 + 24 = 72\n#### 72.\nDone",  # the number is not on the last line
    ]
    got = [(exact(completions=[c], answer=answer)[0], form(completions=[c], answer=answer)[0]) for c in completions]
    assert got == [(1.0, 1.0), (0.0, 1.0), (0.0, 0.0), (1.0, 0.0)], got
    assert [spec.weight for spec in section.rewards] == [1.0, 0.2]


def test_regex_length_contains_and_a_users_own_reward(tmp_path, monkeypatch):
    think = build_reward(spec(function="regex", pattern=r"^<think>.+</think>\s*\S"), None)
    assert think(completions=["<think>a\nb</think> 42", "42", "<think></think>"]) == [1.0, 0.0, 0.0]
    short = build_reward(spec(function="length", target=4), None)
    assert short(completions=["a", "b"], completion_ids=[[1, 2], [1] * 8]) == [0.0, -1.0]
    has = build_reward(spec(function="contains", text="####"), None)
    assert has(completions=["x #### 3", "x"]) == [1.0, 0.0]
    (tmp_path / "myrewards.py").write_text(
        "def score(completions, **kw):\n    return [float(len(c)) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    own = build_reward(spec(function="python: myrewards:score"), None)
    assert own(completions=["ab", "c"], answer=["", ""]) == [2.0, 1.0]
    # the conversation form trl passes for chat prompts
    assert has(completions=[[{"role": "assistant", "content": "#### 1"}]]) == [1.0]


# --------------------------------------------------------------------------- the recipe


def grpo_recipe(model_dir, data_file, output_dir, grpo=None, **sections):
    raw = recipe_dict(model_dir, data_file, output_dir, fmt="prompt_answer", **sections)
    raw["train"].update({"method": "grpo", "micro_batch_size": 8, "grad_accum": 1, **sections.get("train", {})})
    raw["data"].update({"max_length": 128, "val_size": 0.1, **sections.get("data", {})})
    raw["grpo"] = {"rewards": [{"function": "length", "target": 4}], "num_generations": 4, "max_completion_length": 16}
    raw["grpo"].update(grpo or {})
    return raw


@pytest.mark.parametrize(
    "grpo,train,message",
    [
        ({"num_generations": 3}, {}, "grpo.num_generations 3 does not divide the 8 completions of a step"),
        ({"max_completion_length": 128}, {}, "grpo.max_completion_length 128 leaves no room for the prompt"),
        ({"rewards": [{"function": "exact_mach"}]}, {}, "unknown reward 'exact_mach': did you mean 'exact_match'?"),
        ({"rewards": [{"function": "regex"}]}, {}, "reward regex needs pattern"),
        ({"rewards": [{"function": "regex", "pattern": "(["}]}, {}, "is not a regular expression"),
        ({"rewards": [{"function": "python: nomodule"}]}, {}, "write python: package.module:function"),
        ({"rewards": []}, {}, "train.method grpo needs grpo.rewards"),
        ({"loss_type": "ppo"}, {}, "grpo.loss_type"),
        ({"importance_sampling_level": "word"}, {}, "grpo.importance_sampling_level"),
        ({"num_generations": 1}, {}, "grpo.num_generations"),
    ],
)
def test_bad_grpo_settings_are_one_line_before_anything_loads(tmp_path, grpo, train, message):
    raw = grpo_recipe("m", "p.jsonl", tmp_path / "run", grpo=grpo, train=train)
    with pytest.raises(RecipeError, match=None) as refused:
        validate_recipe(raw)
    assert message in str(refused.value), str(refused.value)


def test_kept_completions_are_the_first_prompts_own_in_groups_smaller_than_four(tmp_path):
    from collections import deque

    from qtune.training.methods.grpo_trainer import keep_completions

    logs = {
        "prompt": deque(["p1", "p1", "p2", "p2"]),
        "completion": deque(["a", "b", "c", "d"]),
        "rewards": {"exact_match": deque([1.0, float("nan"), 0.0, 0.0])},
        "advantages": deque([0.7, -0.7, 0.0, 0.0]),
    }
    keep_completions(logs, 2, 5, "#### 1", tmp_path / "c.jsonl")
    entry = json.loads((tmp_path / "c.jsonl").read_text())
    assert (entry["step"], entry["prompt"], entry["reference"]) == (5, "p1", "#### 1")
    assert entry["completions"] == [
        {"text": "a", "rewards": {"exact_match": 1.0}, "advantage": 0.7},
        {"text": "b", "rewards": {"exact_match": None}, "advantage": -0.7},
    ]


def test_a_grpo_beta_on_another_method_is_refused(tmp_path):
    """beta > 0 where it means nothing: GRPO's KL weight in a recipe that trains SFT (or KTO's beta under GRPO)."""
    with pytest.raises(RecipeError) as refused:
        validate_recipe(recipe_dict("m", "a.jsonl", "o", grpo={"beta": 0.1}))
    assert "the grpo section is set but train.method is sft: set train.method: grpo" in str(refused.value)
    with pytest.raises(RecipeError) as refused:
        validate_recipe({**grpo_recipe("m", "p.jsonl", "o"), "kto": {"beta": 0.5}})
    assert "the kto section is set but train.method is grpo" in str(refused.value)


def prompt_rows(count: int, numbered: bool = False) -> list[dict]:
    from qtune.data.templates import alpaca_prompt

    return [
        {"prompt": alpaca_prompt("Name a word.", str(i) if numbered else ""), "answer": f"#### {i}"}
        for i in range(count)
    ]


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "p"}, "'answer' is missing"),
        ({"prompt": "", "answer": "1"}, "'prompt' is empty or not text"),
        ({"prompt": [{"role": "assistant", "content": "x"}], "answer": "1"}, "must end with a user turn"),
    ],
)
def test_a_bad_row_is_one_line_with_its_row_and_line(tmp_path, tiny_llama, run_cli, row, message):
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(3) + [row])
    code, out, err = run_cli(
        "train", write_recipe(tmp_path / "r.yaml", grpo_recipe(tiny_llama, data, tmp_path / "run"))
    )
    assert code == 3 and message in err and "row 4 (line 4)" in err, err
    assert len(err.strip().splitlines()) == 1 and "model: loading" not in out


def test_a_reward_that_fails_on_real_rows_is_one_line_before_the_model_loads(
    tmp_path, tiny_llama, run_cli, monkeypatch
):
    (tmp_path / "badrewards.py").write_text(
        "def crash(completions, **kw):\n    raise KeyError('score')\n"
        "def short(completions, **kw):\n    return [1.0]\n"
        "def nan(completions, **kw):\n    return [float('nan')] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(20))
    for name, says in (
        ("crash", "raised KeyError on the first 4 training rows"),
        ("short", "returned 1 for 4 completions"),
        ("nan", "returned nan for training row 1"),
    ):
        raw = grpo_recipe(
            tiny_llama, data, tmp_path / "run", grpo={"rewards": [{"function": f"python: badrewards:{name}"}]}
        )
        code, out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
        assert code == 3 and f"grpo.rewards: python: badrewards:{name}" in err and says in err, err
        assert len(err.strip().splitlines()) == 1 and "model: loading" not in out


def test_prompts_are_cached_arrow_tables_that_carry_text_and_tokens(tmp_path, tiny_llama, monkeypatch):
    from transformers import AutoTokenizer

    from qtune.data.prompts import build

    monkeypatch.setenv("QTUNE_DATA_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(50, numbered=True))
    recipe = validate_recipe(grpo_recipe(tiny_llama, data, tmp_path / "run"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    first, again = build(recipe.data, tokenizer, seed=1), build(recipe.data, tokenizer, seed=1)
    assert not first.report["sources"][0]["cached"] and again.report["sources"][0]["cached"]
    assert again.train.column_names == ["prompt", "answer", "prompt_ids", "answer_ids"]
    assert again.train.cache_files and len(again.train) == 45 and len(again.val) == 5  # memory-mapped Arrow
    row = again.train[0]
    assert row["prompt_ids"] == tokenizer(row["prompt"]).input_ids and row == first.train[0]


def test_a_system_prompt_turns_text_prompts_into_conversations(tmp_path, tiny_llama, monkeypatch):
    from transformers import AutoTokenizer

    from qtune.data.prompts import build

    monkeypatch.setenv("QTUNE_DATA_CACHE", str(tmp_path / "cache"))
    rows = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(20)]
    data = write_jsonl(tmp_path / "gsm.jsonl", rows)
    raw = grpo_recipe(tiny_llama, data, tmp_path / "run", data={"chat_template": "chatml", "val_size": 0})
    raw["data"]["datasets"][0]["columns"] = {"prompt": "question"}
    raw["data"]["system_prompt"] = "End with '#### <number>'."
    prepared = build(validate_recipe(raw).data, AutoTokenizer.from_pretrained(tiny_llama), seed=1)
    assert prepared.train[3]["prompt"] == (
        "<|im_start|>system\nEnd with '#### <number>'.<|im_end|>\n<|im_start|>user\nWhat is 3 + 1?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prepared.report["prompt_style"] == "chat"
    raw["data"]["system_prompt"] = None  # kept as written otherwise (a new cache entry: the setting is in its key)
    assert build(validate_recipe(raw).data, AutoTokenizer.from_pretrained(tiny_llama), seed=1).train[3]["prompt"] == (
        "What is 3 + 1?"
    )
    with pytest.raises(RecipeError, match="data.system_prompt turns prompt_answer prompts into conversations"):
        validate_recipe(recipe_dict("m", "a.jsonl", "o", data={"system_prompt": "Be brief."}))


def test_a_streamed_grpo_run_trains_on_prompts_tokenized_as_it_reads(tmp_path, tiny_llama, run_cli):
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(60))
    raw = grpo_recipe(
        tiny_llama, data, tmp_path / "run", data={"streaming": True, "val_size": 8}, train={"max_steps": 3}
    )
    code, out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    assert "data: streaming 1 dataset(s)" in out + err and "8 validation prompts" in out + err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and math.isfinite(metrics["eval_reward"])


def test_use_vllm_asks_trl_for_colocated_generation_and_is_refused_without_a_gpu(tmp_path, tiny_llama, run_cli):
    from trl import GRPOConfig

    from qtune.training.methods.grpo import trainer_settings

    raw = grpo_recipe(tiny_llama, write_jsonl(tmp_path / "p.jsonl", prompt_rows(20)), tmp_path / "run")
    raw["grpo"].update({"use_vllm": True, "vllm_gpu_memory": 0.4})
    settings = trainer_settings(validate_recipe(raw))
    config = GRPOConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=8, use_cpu=True, **settings)
    assert (config.use_vllm, config.vllm_mode, config.vllm_gpu_memory_utilization) == (True, "colocate", 0.4)
    assert config.vllm_max_model_length == 128  # data.max_length: prompt and completion
    code, out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 4 and "grpo.use_vllm needs a CUDA GPU" in err and "set grpo.use_vllm: false" in err, err
    assert len(err.strip().splitlines()) == 1 and "model: loading" not in out


# --------------------------------------------------------------------------- training


def test_grpo_raises_the_reward_it_is_given(tmp_path, pretrained_llama, run_cli):
    """A length reward (short answers score 0, long ones less): the mean reward rises and completions shorten."""
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(100))
    raw = grpo_recipe(
        pretrained_llama,
        data,
        tmp_path / "run",
        train={"max_steps": 30, "eval_steps": 30, "save_steps": 100, "logging_steps": 1, "lr": 5e-3},
        grpo={"completions_every": 10},
    )
    code, out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    kept = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in kept] == [1, 10, 20, 30]
    for entry in kept:
        assert (
            "Name a word." in entry["prompt"]
            and entry["reference"].startswith("#### ")
            and len(entry["completions"]) == 4
        )
        assert all(set(c["rewards"]) == {"length"} and c["rewards"]["length"] <= 0 for c in entry["completions"])
    page = (tmp_path / "run" / "report.html").read_text()
    assert (
        "Completions during training" in page and "<h3>step 20</h3>" in page and "reference answer: <code>####" in page
    )
    curve = [reward for _, reward in metrics["reward_curve"]]
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    print("mean reward, first 5 steps", first, "last 5", last, "length", metrics["train_completion_length"])
    assert metrics["method"] == "grpo" and len(curve) == 30 and last > first + 0.5
    assert metrics["train_completion_length"] < metrics["train_completion_length_first"]
    assert metrics["train_reward_length"] == metrics["train_reward"]  # one reward: its own mean is the total
    assert 0 <= metrics["train_groups_all_equal"] <= 1 and math.isfinite(metrics["eval_reward"])
    assert "train: grpo, 4 completions per prompt of up to 16 tokens, rewards: length x 1" in out + err
    assert "step 30: eval reward" in out + err and "mean reward, first -> last logged step" in out + err


def test_grpo_raises_the_greedy_exact_answers_on_the_validation_prompts(tmp_path, pretrained_llama, run_cli):
    """An exact answer the model samples sometimes but never says greedily (a completion that starts with '.'): after
    GRPO its greedy answers to the held-out prompts are right, by far more than two standard errors, and the share of
    sampled completions rewarded rises."""
    from qtune.data.templates import alpaca_prompt

    rows = [{"prompt": alpaca_prompt("Name a word.", str(i)), "answer": "."} for i in range(200)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    first_character = [{"function": "exact_match", "pattern": r"^(\S)", "normalize": False}]
    raw = grpo_recipe(
        pretrained_llama,
        data,
        tmp_path / "run",
        grpo={"rewards": first_character, "num_generations": 8, "max_completion_length": 2},
        data={"val_size": 40},
        train={"max_steps": 30, "micro_batch_size": 32, "eval_steps": 30, "save_steps": 100, "lr": 5e-3},
    )
    code, out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    before, after = metrics["eval_reward_exact_match_before"], metrics["eval_reward_exact_match"]
    standard_error = math.sqrt(0.25 / 40)  # the largest a share of 40 answers can have
    print("greedy exact answers", before, "->", after, "sampled", metrics["reward_curve"])
    assert after - before > 2 * standard_error and metrics["eval_reward_before"] == before
    curve = [reward for _, reward in metrics["reward_curve"]]
    assert sum(curve[-10:]) > sum(curve[:10])
    assert f"exact answers (greedy) on the validation prompts, before -> after: {before:.3f} -> {after:.3f}" in out
    assert "Tried to track the number of tokens seen" not in out + err  # the Trainer's warning at every step
    assert metrics["train_tokens"] > 30 * 32 * 100  # trl's count: every prompt (100+ tokens) with its completion
    # the same path out as every method: generate (as chat loads the run), export, the card
    code, out, err = run_cli("generate", tmp_path / "run", "--prompt", "Name a word.", "--input", "7")
    assert code == 0 and out.strip().splitlines()[-1].startswith("."), (out, err)
    code, _, err = run_cli("export", tmp_path / "run", "--format", "merged_fp16", "--eval-samples", "4")
    assert code == 0, err
    rows = json.loads((tmp_path / "run" / "export" / "export_report.json").read_text())["artifacts"]
    assert rows["merged_fp16"]["top1_agreement"] >= 0.999
    from qtune.publish.model_card import model_card

    code, out, err = run_cli("eval", tmp_path / "run", "--samples", "8")  # the prompts with their reference answers
    assert code == 0 and "adapter" in out + err, err
    from qtune.demo.task import write_choice_task

    task = write_choice_task(tmp_path / "task", count=40)
    code, out, err = run_cli("eval", tmp_path / "run", "--tasks", task, "--limit", "16", "--batch-size", "16")
    assert code == 0, err
    scores = json.loads((tmp_path / "run" / "eval_report.json").read_text())["tasks"]["artifacts"]
    assert {"base (4-bit)", "adapter", "merged_fp16"} <= set(scores), scores.keys()
    card = model_card(tmp_path / "run", "someone/grpo", ["adapter"], {})
    assert "GRPO with verifiable rewards (exact_match; 8 completions per prompt, loss dapo, beta 0)" in card
    assert "exact answers (greedy) on the validation prompts, before -> after" in card


def test_beta_above_zero_measures_the_kl_against_the_base_with_the_adapter_off(tmp_path, pretrained_llama, run_cli):
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(40))
    train = {"max_steps": 3, "eval_steps": None, "logging_steps": 1, "lr": 5e-3}
    raw = grpo_recipe(pretrained_llama, data, tmp_path / "run", grpo={"beta": 0.1}, train=train)
    code, out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    assert "KL reference: the base with the adapter switched off" in out + err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # step 1 starts at the base (LoRA's B is zero): no divergence yet; after two updates at a high rate, some
    assert metrics["train_kl_first"] == 0 and metrics["train_kl"] > 0, (metrics["train_kl_first"], metrics["train_kl"])


def test_the_validation_reward_is_the_mean_over_every_answer(tmp_path, tiny_llama, run_cli, monkeypatch):
    """10 validation prompts in batches of 8 and 2: a reward of 1 on prompts 0, 3, 6 and 9 means 0.4 (trl's own
    figure is the mean of its batches' means)."""
    (tmp_path / "byanswer.py").write_text(
        "def third(completions, answer, **kw):\n    return [float(int(a.split()[-1]) % 3 == 0) for a in answer]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    train, val = write_jsonl(tmp_path / "p.jsonl", prompt_rows(40)), write_jsonl(tmp_path / "v.jsonl", prompt_rows(10))
    raw = grpo_recipe(
        tiny_llama,
        train,
        tmp_path / "run",
        grpo={"rewards": [{"function": "python: byanswer:third"}]},
        data={"val_size": 0, "val_datasets": [{"path": str(val), "format": "prompt_answer"}]},
        train={"max_steps": 2, "eval_steps": 2},
    )
    code, out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval_reward_before"] == pytest.approx(0.4) and metrics["eval_reward"] == pytest.approx(0.4)
    assert metrics["eval_reward_third"] == pytest.approx(0.4)


def test_a_grpo_run_killed_then_stopped_resumes_bit_identically(tmp_path, tiny_llama):
    from helpers import STEPS, assert_kill_9_then_resume_is_bit_identical

    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(100, numbered=True))  # each step's prompts told apart

    def recipe_in(folder):
        folder.mkdir(parents=True, exist_ok=True)
        train = {"max_steps": STEPS, "save_steps": 1, "keep_checkpoints": 2, "eval_steps": None}
        return write_recipe(folder / "r.yaml", grpo_recipe(tiny_llama, data, folder / "run", train=train))

    assert_kill_9_then_resume_is_bit_identical(recipe_in, tmp_path, 5, stop_at=12)


def test_a_streamed_grpo_run_killed_then_resumed_is_bit_identical(tmp_path, tiny_llama):
    """A stream has no indices to restore: the resumed run skips the prompts the checkpoint's steps trained on, and
    trains on the same ones after them."""
    from helpers import STEPS, assert_kill_9_then_resume_is_bit_identical

    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(300, numbered=True))

    def recipe_in(folder):
        folder.mkdir(parents=True, exist_ok=True)
        train = {"max_steps": STEPS, "save_steps": 1, "keep_checkpoints": 2, "eval_steps": None}
        raw = grpo_recipe(tiny_llama, data, folder / "run", train=train, data={"streaming": True, "val_size": 8})
        return write_recipe(folder / "r.yaml", raw)

    assert_kill_9_then_resume_is_bit_identical(recipe_in, tmp_path, 5)


def test_changed_rewards_or_groups_are_a_changed_recipe_for_resume():
    from qtune.training.resume import recipe_differences

    raw = grpo_recipe("m", "p.jsonl", "o")
    changed = grpo_recipe("m", "p.jsonl", "o", grpo={"num_generations": 8})
    changed["grpo"]["rewards"] = [{"function": "length", "target": 4, "weight": 2.0}]
    said = recipe_differences(validate_recipe(raw), validate_recipe(changed))
    assert "grpo.num_generations: 4 -> 8" in said and any(line.startswith("grpo.rewards") for line in said), said


def test_the_plan_counts_generation_and_the_completions_logits(tmp_path, pretrained_llama):
    from qtune.modeling.config import load_config
    from qtune.planning.plan import plan_training, training_shape

    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(10))
    shape = training_shape(load_config(pretrained_llama))
    # a long generation batch: the KV cache of its 64 sequences is the larger part
    raw = grpo_recipe(pretrained_llama, data, tmp_path / "run", train={"grad_accum": 8})
    plan = plan_training(validate_recipe(raw), device="cpu", compute_bytes=4)
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * 4 * 64 * 128
    assert plan["parts"]["generation_kv_cache"] == kv and "completion_logits" not in plan["parts"]
    assert plan["sequences_in_flight"] == 8 and "completions: the micro-batch's 8 prompts" in plan["in_flight"]
    # long completions over the vocabulary, one micro-batch: the log-probs are the larger part
    raw = grpo_recipe(pretrained_llama, data, tmp_path / "run", grpo={"max_completion_length": 100})
    plan = plan_training(validate_recipe(raw), device="cpu", compute_bytes=4)
    assert plan["parts"]["completion_logits"] == 2 * 8 * 100 * shape.vocab * 4
    without = plan_training(validate_recipe(grpo_recipe(pretrained_llama, data, tmp_path / "r2")), device="cpu")
    assert plan["training_bytes"] > without["training_bytes"]


def test_the_plan_says_the_largest_groups_and_completions_each_gpu_fits(run_cli):
    """qtune plan's GRPO table for the GSM8K recipe on Qwen3-4B's shape: each figure is the boundary of the plan
    itself (the recipe planned at it fits the GPU, one more does not)."""
    import re

    from qtune.config.recipe import load_recipe
    from qtune.planning.plan import GPUS_GIB, plan_training

    # one prompt per step, its 8 completions a micro-batch; activations checkpointed, never offloaded
    overrides = [
        "model.name=tests/model_configs/qwen3-4b",
        "data.max_length=2048",
        "train.grad_accum=1",
        "train.offload_activations=false",  # the limits are for the way the recipe keeps activations
    ]
    code, out, err = run_cli("plan", "recipes/qwen3-4b-grpo-gsm8k.yaml", *sum((["--set", o] for o in overrides), []))
    assert code == 0, err
    table = {m[0]: m[1:] for m in re.findall(r"^  (\S+) +([\d,]+|-) +([\d,]+|-)$", out, flags=re.M)}
    assert "largest that fit: num_generations at 1 prompt(s) per step" in out and set(GPUS_GIB) <= set(table), out

    def fits(gpu, *changes):
        recipe = load_recipe("recipes/qwen3-4b-grpo-gsm8k.yaml", [*overrides, *changes])
        return plan_training(recipe, gpu_gib=GPUS_GIB[gpu], compute_bytes=2)["fits"]

    for gpu in ("t4", "l4"):
        generations, length = (int(cell.replace(",", "")) for cell in table[gpu])
        assert 0 < length < 2047 and generations >= 8, (gpu, table[gpu])
        assert fits(gpu, f"grpo.max_completion_length={length}")
        assert not fits(gpu, f"grpo.max_completion_length={length + 1}")
        # more completions at once: a longer generation batch (8 per micro-batch, grad_accum of them)
        assert fits(gpu, f"train.grad_accum={generations // 8}")
        assert not fits(gpu, f"train.grad_accum={generations // 8 + 1}")


def test_groups_that_keep_teaching_nothing_are_warned_about_once(tmp_path, tiny_llama, run_cli):
    """A reward that never fires: every group's rewards are equal, the run learns nothing, and says so."""
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(40))
    never = {"rewards": [{"function": "contains", "text": "no tiny model writes this"}]}
    train = {"max_steps": 6, "eval_steps": None, "logging_steps": 1}
    raw = grpo_recipe(tiny_llama, data, tmp_path / "run", grpo=never, train=train)
    code, out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    said = [line for line in (out + err).splitlines() if "got all-equal rewards" in line]
    assert len(said) == 1 and "100% of the groups" in said[0] and "5 logged steps in a row (step 5)" in said[0], said
