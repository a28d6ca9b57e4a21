"""KTO: one answer per prompt labelled good or bad, on the same 4-bit base, with the guarantees the other methods have.

The learnable labels of these tests are the preference tests' (tests/test_preference.py): a word from one half of the
tiny vocabulary is a good answer, a word from the other half a bad one."""

import json
import random

import pytest
from helpers import recipe_dict, write_jsonl, write_recipe
from test_preference import vocabulary_pairs

from qtune.config.recipe import validate_recipe
from qtune.core.errors import RecipeError
from qtune.training.methods.kto_trainer import weights_advice


def labelled_rows(count: int, good_share: float = 0.5, seed: int = 0) -> list[dict]:
    """`count` pairs' answers unpaired: each pair's good answer, or its bad one, `good_share` of them good."""
    rng = random.Random(seed)
    rows = []
    for pair in vocabulary_pairs(count, seed):
        good = rng.random() < good_share
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"], "label": good})
    return rows


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory):
    """Both answers of 300 pairs, shuffled: 600 labelled answers, half good."""
    rows = []
    for pair in vocabulary_pairs(300):
        rows += [
            {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False},
        ]
    random.Random(0).shuffle(rows)
    return write_jsonl(tmp_path_factory.mktemp("kto") / "kto.jsonl", rows)


def kto_recipe(model_dir, data_file, output_dir, **sections):
    raw = recipe_dict(model_dir, data_file, output_dir, fmt="kto", **sections)
    raw["train"]["method"] = "kto"
    raw["data"].update({"max_length": 192, "val_size": 0.2, **sections.get("data", {})})
    return raw


@pytest.fixture(scope="module")
def kto_run(tmp_path_factory, pretrained_llama, labelled_file):
    """A 120-step KTO run on the pretrained tiny Llama, evaluated before and after (its output kept)."""
    import contextlib
    import io

    from qtune.cli import main

    folder = tmp_path_factory.mktemp("kto-run")
    train = {"max_steps": 120, "eval_steps": 120, "save_steps": 60, "logging_steps": 10, "lr": 3e-3}
    raw = kto_recipe(pretrained_llama, labelled_file, folder / "run", train=train)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["train", str(write_recipe(folder / "r.yaml", raw))]) == 0
    return folder / "run", out.getvalue() + err.getvalue()


def test_kto_moves_good_answers_up_and_bad_ones_down(kto_run):
    run, output = kto_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "kto" and metrics["eval_perplexity"] is None
    good = (metrics["eval_logps_good_before"], metrics["eval_logps_good"])
    bad = (metrics["eval_logps_bad_before"], metrics["eval_logps_bad"])
    print("validation log-probs: good", good, "bad", bad, "KL", metrics["eval_kl"])
    # the policy starts as its reference (the base, adapter off): every reward is 0 before training
    assert metrics["eval_reward_good_before"] == 0.0 and metrics["eval_reward_bad_before"] == 0.0
    assert good[1] > good[0] + 1.0 and bad[1] < bad[0] - 1.0
    assert metrics["eval_reward_good"] > 0 > metrics["eval_reward_bad"] and metrics["eval_reward_margin"] > 0.5
    assert metrics["train_reward_margin"] is not None and metrics["eval_kl"] >= 0
    assert "data: 480 train / 120 validation labelled answers (" in output and "good, " in output
    assert "train: kto, reference: the same 4-bit base with the adapter switched off" in output
    assert "step 120: eval_loss" in output and "reward good" in output and "perplexity" not in output
    assert "validation log-prob of good answers before -> after" in output
    # the adapter holds the trained weights only, no reference copy
    assert sorted(p.name for p in (run / "adapter").iterdir() if p.is_dir()) == []


def test_a_kto_run_exports_and_its_card_says_the_method(kto_run, run_cli, tmp_path):
    import shutil

    from qtune.publish.model_card import model_card

    run = tmp_path / "run"
    shutil.copytree(kto_run[0], run)
    code, _, err = run_cli("export", run, "--format", "merged_fp16", "--eval-samples", "4")
    assert code == 0, err
    rows = json.loads((run / "export" / "export_report.json").read_text())["artifacts"]
    assert rows["merged_fp16"]["top1_agreement"] >= 0.999
    card = model_card(run, "someone/kto", ["adapter"], {})
    assert "KTO on labelled answers (beta 0.1, weights good 1 / bad 1); reference: the base model" in card


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "p", "completion": "c", "label": "maybe"}, "'label' is 'maybe', not a label"),
        ({"prompt": "p", "completion": "c", "label": 2}, "'label' is 2, not a label"),
        ({"prompt": "p", "completion": "", "label": True}, "'completion' is empty"),
        ({"prompt": "p", "label": True}, "'completion' is missing"),
        ({"prompt": [{"role": "user", "content": "p"}], "completion": "c", "label": True}, "expected text"),
        ({"prompt": "p", "completion": [{"role": "user", "content": "c"}], "label": 0}, "no assistant answer"),
    ],
)
def test_a_bad_labelled_row_is_one_line_with_its_row_and_line(tmp_path, tiny_llama, run_cli, row, message):
    good = {"prompt": "a", "completion": "b", "label": "true"}
    data = write_jsonl(tmp_path / "kto.jsonl", [good, good, good, row])
    recipe = write_recipe(tmp_path / "r.yaml", kto_recipe(tiny_llama, data, tmp_path / "run"))
    code, out, err = run_cli("train", recipe)
    assert code == 3 and message in err and "row 4 (line 4)" in err, err
    assert err.startswith("qtune: error:") and len(err.strip().splitlines()) == 1
    assert "model: loading" not in out and not (tmp_path / "run").exists()


def test_labels_are_read_in_the_forms_files_write_them(tmp_path):
    from qtune.config.recipe import DatasetSpec
    from qtune.data.labelled import normalize_rows

    forms = [True, False, 1, 0, 1.0, "true", "False", " 1 ", "0"]
    rows = [{"prompt": "p", "completion": "c", "label": form} for form in forms]
    labels = [r["label"] for r in normalize_rows(rows, DatasetSpec(path="x.jsonl", format="kto"))]
    assert labels == [True, False, True, False, True, True, False, True, False]


def test_kto_needs_two_answers_per_micro_batch_and_no_prompt_training():
    raw = {
        "model": {"name": "m"},
        "data": {"datasets": [{"path": "p.jsonl", "format": "kto"}]},
        "train": {"output_dir": "o", "method": "kto", "micro_batch_size": 1},
    }
    with pytest.raises(RecipeError, match="set train.micro_batch_size to 2 or more"):
        validate_recipe(raw)
    raw["train"]["micro_batch_size"] = 2
    raw["data"]["train_on_inputs"] = True
    with pytest.raises(RecipeError, match="never trains on prompts"):
        validate_recipe(raw)
    raw["data"]["train_on_inputs"] = False
    raw["train"]["method"] = "dpo"
    with pytest.raises(RecipeError, match="train.method dpo trains on preference pairs, and data has format kto"):
        validate_recipe(raw)


def test_unbalanced_data_gets_the_kto_papers_weight_advice(tmp_path, pretrained_llama, run_cli):
    # the paper's rule: desirable_weight x good / (undesirable_weight x bad) in [1, 4/3]
    assert weights_advice(100, 100, 1.0, 1.0) is None
    advice = weights_advice(100, 400, 1.0, 1.0)
    assert "kto.desirable_weight in [4, 5.32] or kto.undesirable_weight in [0.19, 0.25]" in advice
    assert weights_advice(100, 400, 4.5, 1.0) is None and weights_advice(100, 400, 1.0, 0.2) is None
    data = write_jsonl(tmp_path / "kto.jsonl", labelled_rows(200, good_share=0.2))
    raw = kto_recipe(pretrained_llama, data, tmp_path / "run", train={"max_steps": 2, "eval_steps": None})
    code, out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    assert "kto: " in out + err and "good and " in out + err and "the KTO paper's range" in out + err


def test_the_plan_counts_the_micro_batchs_answers(tmp_path, pretrained_llama, labelled_file):
    from qtune.planning.plan import describe_plan, plan_training

    raw = kto_recipe(pretrained_llama, labelled_file, tmp_path / "run", train={"micro_batch_size": 4})
    plan = plan_training(validate_recipe(raw), device="cpu", compute_bytes=4)
    assert plan["sequences_in_flight"] == 4 and plan["tokens_per_micro_batch"] == 4 * 192
    assert "labelled answers: the micro-batch's 4 sequences of up to 192 tokens" in describe_plan(plan, None)


# --------------------------------------------------------------------------- survival


def test_changed_answer_weights_are_a_changed_recipe_for_resume():
    from qtune.config.recipe import validate_recipe
    from qtune.training.resume import recipe_differences

    raw = kto_recipe("m", "l.jsonl", "o")
    changed = kto_recipe("m", "l.jsonl", "o", kto={"desirable_weight": 1.5})
    assert recipe_differences(validate_recipe(raw), validate_recipe(changed)) == ["kto.desirable_weight: 1.0 -> 1.5"]


def test_a_kto_run_killed_then_stopped_resumes_bit_identically(tmp_path, tiny_llama, labelled_file):
    from helpers import STEPS, assert_kill_9_then_resume_is_bit_identical

    def recipe_in(folder):
        folder.mkdir(parents=True, exist_ok=True)
        train = {"max_steps": STEPS, "save_steps": 1, "keep_checkpoints": 2, "eval_steps": None}
        return write_recipe(folder / "r.yaml", kto_recipe(tiny_llama, labelled_file, folder / "run", train=train))

    assert_kill_9_then_resume_is_bit_identical(recipe_in, tmp_path, 7, stop_at=14)
