"""Data at scale: the Arrow data path gives the tokens the row-by-row one gave (every format, both kinds, the split),
in worker processes too; its cache is used by a second start, re-tokenizes when any input changes, and rebuilds a
damaged entry. Needs a tokenizer, no model."""

import json
import shutil

import numpy as np
import pytest
from helpers import write_jsonl

from qtune.config.recipe import DataSection
from qtune.core.errors import DataError
from qtune.data import pairs, sft, tokenized
from qtune.data.prepared import held_out
from qtune.data.readers import read_rows
from qtune.data.templates import renderer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A tokenized-data cache of this test's own."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(tokenized.CACHE_SETTING, str(folder))
    return folder


@pytest.fixture
def tok(tiny_tokenizer):
    from qtune.modeling.load import choose_pad_token

    choose_pad_token(tiny_tokenizer)
    return tiny_tokenizer


# --------------------------------------------------------------------------- the row-by-row pipeline, for parity


def reference_sft(data: DataSection, tokenizer, seed: int):
    """The tokens as qtune made them before issue 25: rows read into Python lists, each tokenized alone
    (sft.tokenize_sample), truncated, dropped when nothing is left to learn, the validation share held out."""
    _, render = renderer(data, tokenizer)

    def tokenize(specs):
        samples = []
        for spec in specs:
            for sample in sft.normalize_rows(read_rows(spec), spec):
                ids, labels = sft.tokenize_sample(
                    sample, tokenizer, train_on_inputs=data.train_on_inputs, render=render
                )
                ids, labels = ids[: data.max_length], labels[: data.max_length]
                if any(label != -100 for label in labels[1:]):
                    samples.append({"input_ids": ids, "labels": labels})
        return samples

    return split(tokenize(data.datasets), tokenize(data.val_datasets) if data.val_datasets else None, data, seed)


def reference_pairs(data: DataSection, tokenizer, seed: int):
    """The pairs as qtune made them before issue 25, row by row (pairs.tokenize_pair)."""
    _, render = renderer(data, tokenizer)

    def tokenize(specs):
        samples = []
        for spec in specs:
            for pair in pairs.normalize_pairs(read_rows(spec), spec):
                prompt, chosen, rejected = pairs.tokenize_pair(pair, tokenizer, render)
                if chosen == rejected or len(prompt) >= data.max_length:
                    continue
                room = data.max_length - len(prompt)
                chosen, rejected = chosen[:room], rejected[:room]
                if chosen != rejected:
                    samples.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
        return samples

    return split(tokenize(data.datasets), tokenize(data.val_datasets) if data.val_datasets else None, data, seed)


def split(train: list, val: list | None, data: DataSection, seed: int):
    if val is None and data.val_size > 0:
        held = held_out(len(train), max(1, round(len(train) * data.val_size)), seed)
        train, val = [s for i, s in enumerate(train) if i not in held], [s for i, s in enumerate(train) if i in held]
    return train, val


def rows_of(dataset) -> list[dict]:
    return [] if dataset is None else dataset.to_list()


def conversation(n: int) -> list[dict]:
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"reverse word{n}"},
        {"role": "assistant", "content": f"{n}drow"},
        {"role": "user", "content": "and the next?"},
        {"role": "assistant", "content": "word " * (n % 7)},
    ]


def sft_sources(folder) -> list[dict]:
    """One file per format, rows of many lengths: some truncated, some left with nothing to learn."""
    n = range(60)
    write_jsonl(
        folder / "alpaca.jsonl",
        [{"instruction": "word " * (i * 3), "input": "x " * (i % 4), "output": "answer " * (i % 9)} for i in n],
    )
    write_jsonl(folder / "pc.jsonl", [{"q": f"Q{i}: " + "w " * (i * 2), "a": " A" * (i % 5)} for i in n])
    write_jsonl(folder / "messages.jsonl", [{"messages": conversation(i)} for i in n])
    write_jsonl(
        folder / "sharegpt.jsonl",
        [{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": "yo " * i}]} for i in n],
    )
    write_jsonl(folder / "text.jsonl", [{"text": "the model learns " * (i % 13)} for i in n])
    return [
        {"path": str(folder / "alpaca.jsonl"), "format": "alpaca"},
        {
            "path": str(folder / "pc.jsonl"),
            "format": "prompt_completion",
            "columns": {"prompt": "q", "completion": "a"},
        },
        {"path": str(folder / "messages.jsonl"), "format": "messages"},
        {"path": str(folder / "sharegpt.jsonl"), "format": "sharegpt"},
        {"path": str(folder / "text.jsonl"), "format": "text"},
    ]


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_every_sft_format_gives_the_tokens_of_the_row_by_row_pipeline(tmp_path, tok, cache, train_on_inputs):
    sources = sft_sources(tmp_path)
    data = DataSection(
        datasets=sources, val_size=0.1, max_length=40, train_on_inputs=train_on_inputs, chat_template="chatml"
    )
    prepared = sft.build(data, tok, seed=7)
    train, val = reference_sft(data, tok, seed=7)
    assert rows_of(prepared.train) == train
    assert rows_of(prepared.val) == val
    report = prepared.report
    assert report["train_samples"] == len(train)
    assert report["train_tokens"] == sum(len(s["input_ids"]) for s in train)
    assert report["train_supervised_tokens"] == sum(sum(x != -100 for x in s["labels"][1:]) for s in train)
    assert report["truncated"] > 0 and (report["dropped"] > 0) != train_on_inputs  # the data exercise both


def test_explicit_validation_sets_match_too(tmp_path, tok, cache):
    sources = sft_sources(tmp_path)
    data = DataSection(
        datasets=sources[:2], val_datasets=sources[2:], val_size=0, max_length=48, chat_template="chatml"
    )
    prepared = sft.build(data, tok, seed=0)
    train, val = reference_sft(data, tok, seed=0)
    assert (rows_of(prepared.train), rows_of(prepared.val)) == (train, val)


def test_preference_pairs_give_the_tokens_of_the_row_by_row_pipeline(tmp_path, tok, cache):
    text_pairs = [
        {"prompt": "p " * (i % 30), "chosen": "a " * (i % 11 + 1), "rejected": "b " * (i % 6 + 1)} for i in range(50)
    ]
    text_pairs += [{"prompt": "p", "chosen": "same", "rejected": "same"}]
    chat_pairs = [
        {
            "chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "good " * i}],
            "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "bad"}],
        }
        for i in range(1, 40)
    ]
    sources = [
        {"path": str(write_jsonl(tmp_path / "text.jsonl", text_pairs)), "format": "preference"},
        {"path": str(write_jsonl(tmp_path / "chat.jsonl", chat_pairs)), "format": "preference"},
    ]
    data = DataSection(datasets=sources, val_size=0.2, max_length=32, chat_template="chatml")
    prepared = pairs.build(data, tok, seed=3)
    train, val = reference_pairs(data, tok, seed=3)
    assert (rows_of(prepared.train), rows_of(prepared.val)) == (train, val)
    assert prepared.report["identical"] >= 1 and prepared.report["no_room"] >= 1 and prepared.report["truncated"] >= 1


def test_worker_processes_give_the_same_samples_and_name_a_bad_row(tmp_path, tok, cache, monkeypatch):
    """Two tokenizing processes: the samples in the same order as one process gives, and a bad row in the second
    worker's share still named by its row and line."""
    rows = [{"instruction": f"n{i} " * (i % 17), "output": "o " * (i % 5 + 1)} for i in range(3000)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    data = DataSection(datasets=[{"path": str(path), "format": "alpaca"}], val_size=0, max_length=256)
    alone = rows_of(sft.build(data, tok, seed=0).train)
    shutil.rmtree(cache)
    monkeypatch.setattr(tokenized, "ROWS_PER_WORKER", 1000)
    monkeypatch.setenv("QTUNE_CPU_THREADS", "2")
    assert tokenized.worker_count(3000) == 2
    prepared = sft.build(data, tok, seed=0)
    assert rows_of(prepared.train) == alone
    assert len(list(cache.iterdir())) == 1
    entry = next(cache.iterdir())
    assert len(json.loads((entry / "meta.json").read_text())["files"]) == 2  # one file per worker

    rows[2500]["output"] = 5
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=r"'output' is int, expected text.*row 2501 \(line 2501\)"):
        sft.build(data, tok, seed=0)


def test_a_bad_value_in_an_arrow_loaded_file_is_named_by_its_line(tmp_path, tok, cache):
    """The file loads as Arrow (every value of a column the same type); the row check names the row and its line,
    counting blank lines."""
    path = tmp_path / "a.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    path.write_text(f"{good}\n\n{good}\n{json.dumps({'instruction': 'a', 'output': None})}\n")
    with pytest.raises(DataError, match=r"'output' is NoneType, expected text.*row 3 \(line 4\)"):
        sft.build(DataSection(datasets=[{"path": str(path), "format": "alpaca"}], val_size=0), tok, seed=0)


# --------------------------------------------------------------------------- the cache


def build_alpaca(path, tok, **fields):
    fields.setdefault("val_size", 0)
    columns = fields.pop("columns", {})
    data = DataSection(datasets=[{"path": str(path), "format": "alpaca", "columns": columns}], **fields)
    return sft.build(data, tok, seed=0)


def cached(prepared) -> bool:
    return prepared.report["sources"][0]["cached"]


@pytest.fixture
def alpaca(tmp_path):
    return write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"add {i}", "output": str(i)} for i in range(40)])


def test_a_second_start_reads_the_cache_and_says_so(alpaca, tok, cache):
    first = build_alpaca(alpaca, tok)
    second = build_alpaca(alpaca, tok)
    assert not cached(first) and cached(second)
    assert rows_of(first.train) == rows_of(second.train)
    assert "tokens from the cache" in sft.describe(second.report)
    assert "cache" not in sft.describe(first.report)


@pytest.mark.parametrize(
    "change",
    ["data", "tokenizer", "chat_template", "max_length", "train_on_inputs", "columns", "code"],
)
def test_any_input_of_the_tokens_changed_tokenizes_again(alpaca, tok, cache, change, monkeypatch, tmp_path):
    build_alpaca(alpaca, tok)
    fields, tokenizer, path = {}, tok, alpaca
    if change == "data":
        rows = [json.loads(line) for line in alpaca.read_text().splitlines()]
        rows[7]["output"] = "changed"
        write_jsonl(alpaca, rows)
    elif change == "tokenizer":
        from qtune.demo.tiny_models import build_tokenizer

        tokenizer = build_tokenizer(vocab_size=400)
    elif change == "chat_template":
        fields["chat_template"] = "chatml"
    elif change == "max_length":
        fields["max_length"] = 100
    elif change == "train_on_inputs":
        fields["train_on_inputs"] = True
    elif change == "columns":  # a file with both columns: first read as output, then answer read as output
        rows = [dict(json.loads(line), answer="other") for line in alpaca.read_text().splitlines()]
        path = write_jsonl(tmp_path / "b.jsonl", rows)
        assert cached(build_alpaca(path, tok)) is False and cached(build_alpaca(path, tok))
        fields["columns"] = {"output": "answer"}
    else:
        monkeypatch.setattr(tokenized, "code_fingerprint", lambda: "another version of qtune's data code")
    again = build_alpaca(path, tokenizer, **fields)
    assert not cached(again)
    assert cached(build_alpaca(path, tokenizer, **fields))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "no meta"])
def test_a_damaged_entry_is_tokenized_again_never_trusted(alpaca, tok, cache, damage, capsys):
    first = rows_of(build_alpaca(alpaca, tok).train)
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    arrow = next(entry.glob("*.arrow"))
    raw = bytearray(arrow.read_bytes())
    if damage == "flipped byte":
        raw[len(raw) // 2] ^= 0xFF
        arrow.write_bytes(bytes(raw))
    elif damage == "truncated":
        arrow.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        (entry / "meta.json").unlink()
    capsys.readouterr()
    again = build_alpaca(alpaca, tok)
    assert not cached(again)
    assert rows_of(again.train) == first
    said = capsys.readouterr()
    assert "are damaged" in said.out + said.err
    assert cached(build_alpaca(alpaca, tok))


def test_an_entry_appears_whole_or_not_at_all(alpaca, tok, cache, monkeypatch):
    """A tokenization that fails halfway leaves no entry (and no scratch folder); the next start tokenizes."""

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenized, "write_entry", broken)
    with pytest.raises(KeyboardInterrupt):
        build_alpaca(alpaca, tok)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    assert not cached(build_alpaca(alpaca, tok))


def test_the_report_comes_from_the_length_column(alpaca, tok, cache):
    prepared = build_alpaca(alpaca, tok, val_size=0.25)
    lengths = np.array([len(ids) for ids in prepared.train["input_ids"]])
    report = prepared.report
    assert report["max_tokens"] == lengths.max() and report["train_tokens"] == lengths.sum()
    assert sum(report["length_histogram"]["counts"]) == report["train_samples"] == 30
    every_id = [t for split in (prepared.train, prepared.val) for ids in split["input_ids"] for t in ids]
    assert report["highest_token_id"] == max(every_id)  # validation samples included: the vocabulary check reads it


# --------------------------------------------------------------------------- streaming


def streaming_recipe(model, data_file, out, **train):
    from helpers import recipe_dict

    return recipe_dict(
        model,
        data_file,
        out,
        data={"streaming": True, "val_size": 8},
        lora={"dropout": 0.1},
        train={"max_steps": 6, "save_steps": 3, **train},
    )


def test_a_streamed_run_trains_and_validates_on_the_first_samples(tmp_path, tiny_llama, alpaca_file, run_cli, cache):
    from helpers import write_recipe

    raw = streaming_recipe(tiny_llama, alpaca_file, tmp_path / "run")
    code, out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    assert "data: streaming 1 dataset(s)" in out + err and "8 validation samples (the first" in out + err
    assert "eval: the loss before training, on 8 validation samples" in out + err  # said before it runs
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["streaming"] and metrics["data"]["val_samples"] == 8
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert not cache.exists()  # a stream is never cached
    # the validation samples are the first 8 the file gives, tokenized as the map-style path tokenizes them
    data = DataSection(datasets=[{"path": str(alpaca_file), "format": "alpaca"}], val_size=0, max_length=128)
    first = rows_of(sft.build(data, __import__("transformers").AutoTokenizer.from_pretrained(tiny_llama), seed=0).train)
    assert metrics["data"]["mean_tokens"] == round(sum(len(s["input_ids"]) for s in first[:8]) / 8, 1)


def test_a_streamed_run_resumes_bit_identically(tmp_path, tiny_llama, alpaca_file, run_cli):
    """Stopped after checkpoint-3 of 6 and resumed: the stream continues from the right sample (the Trainer skips the
    batches trained on), so steps 4-6 and the adapter equal the uninterrupted run's."""
    import torch
    from helpers import interrupted_and_resumed, losses_after_step
    from safetensors.torch import load_file

    full, cut = interrupted_and_resumed(run_cli, tmp_path, streaming_recipe(tiny_llama, alpaca_file, tmp_path / "full"))
    assert len(losses_after_step(full, 3)) == 3 and losses_after_step(cut, 3) == losses_after_step(full, 3)
    resumed = load_file(cut / "adapter" / "adapter_model.safetensors")
    uninterrupted = load_file(full / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.parametrize(
    ("data", "train", "message"),
    [
        ({"streaming": True, "val_size": 8}, {"max_steps": None}, "set train.max_steps"),
        ({"streaming": True, "val_size": 0.1}, {}, "give val_size as a count"),
        ({"val_size": 2.5}, {}, "neither a fraction below 1 nor a count"),
    ],
)
def test_streaming_and_val_size_settings_that_cannot_work_are_refused(tmp_path, alpaca_file, data, train, message):
    from helpers import recipe_dict

    from qtune.config.recipe import validate_recipe
    from qtune.core.errors import RecipeError

    raw = recipe_dict(tmp_path / "model", alpaca_file, tmp_path / "run", data=data, train=train)
    with pytest.raises(RecipeError, match=message):
        validate_recipe(raw)


@pytest.mark.parametrize(
    ("val_size", "count", "expected"),
    [(None, 40, 1), (None, 2000, 40), (None, 10**6, 1000), (0.1, 10**6, 10**5), (200, 10**6, 200), (0, 50, 0)],
)
def test_the_validation_share(val_size, count, expected, alpaca_file):
    from qtune.data.prepared import validation_count

    data = DataSection(datasets=[{"path": str(alpaca_file), "format": "alpaca"}], val_size=val_size)
    assert validation_count(data, count) == expected


def test_preference_pairs_stream_through_the_same_path(tmp_path, tiny_llama, run_cli):
    from helpers import recipe_dict, write_recipe

    from qtune.demo.tiny_models import write_demo_data

    pairs_file = write_demo_data(tmp_path / "pairs.jsonl", count=120, preference=True)
    raw = recipe_dict(
        tiny_llama,
        pairs_file,
        tmp_path / "run",
        fmt="preference",
        data={"streaming": True, "val_size": 8},
        train={"method": "dpo", "max_steps": 3, "save_steps": 10, "eval_steps": None},
    )
    code, out, err = run_cli("train", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 0, err
    assert "8 validation preference pairs (the first" in out + err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["eval_reward_accuracy"] is not None


def test_a_turn_with_a_null_role_is_missing_not_unknown(tmp_path, tok, cache):
    """Arrow gives every turn of a column every key some turn has: a turn without content reads as content null."""
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant"}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": conversation(3)}, {"messages": turns}])
    data = DataSection(datasets=[{"path": str(path), "format": "messages"}], val_size=0, chat_template="chatml")
    with pytest.raises(DataError, match=r"turn 2 needs 'role' and 'content'.*row 2 \(line 2\)"):
        sft.build(data, tok, seed=0)


def test_the_sft_trainer_trains_on_qtunes_table_as_it_is(tmp_path, tiny_llama, alpaca_file, cache):
    """trl's own preparation (truncate, drop masked samples: done already) would copy the data into memory again."""
    from helpers import recipe_dict

    from qtune.config.recipe import validate_recipe
    from qtune.training.run import prepare

    recipe = validate_recipe(recipe_dict(tiny_llama, alpaca_file, tmp_path / "run"))
    (tmp_path / "run").mkdir()
    prepared = prepare(recipe, tmp_path / "run", resume=False)
    assert prepared.trainer.train_dataset is prepared.data.train
    assert prepared.trainer.eval_dataset is prepared.data.val


def test_text_that_looks_like_dates_stays_text(tmp_path, tok, cache):
    """pyarrow's JSON reader infers timestamps from ISO-8601 strings; answers that are dates are still text."""
    rows = [{"prompt": f"When was release {i}?", "completion": f"2024-01-{i + 1:02d}"} for i in range(20)]
    path = write_jsonl(tmp_path / "dates.jsonl", rows)
    data = DataSection(datasets=[{"path": str(path), "format": "prompt_completion"}], val_size=0)
    train, _ = reference_sft(data, tok, seed=0)
    assert rows_of(sft.build(data, tok, seed=0).train) == train


def test_the_code_fingerprint_covers_every_data_module(tmp_path, monkeypatch):
    """A change to any module of qtune.data (a new data kind's included) makes earlier cache entries unused."""
    from pathlib import Path

    from qtune.data import tokenized

    copy = tmp_path / "data"
    shutil.copytree(Path(tokenized.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(tokenized, "__file__", str(copy / "tokenized.py"))
    before = tokenized.code_fingerprint()
    for module in sorted(copy.glob("*.py")):
        original = module.read_text()
        module.write_text(original + "\n# changed\n")
        assert tokenized.code_fingerprint() != before, f"{module.name} is not in the fingerprint"
        module.write_text(original)
    assert tokenized.code_fingerprint() == before
