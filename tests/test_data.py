"""Dataset formats, masking, truncation, splits and every data error. Needs a tokenizer, no model."""

import json

import pytest
from helpers import write_jsonl

from qtune.config.recipe import DataSection
from qtune.core.errors import EXIT_DATA, DataError, RecipeError
from qtune.data.sft import build, tokenize_sample
from qtune.data.templates import ALPACA_WITH_INPUT


def section(*datasets, **fields) -> DataSection:
    fields.setdefault("val_size", 0)
    return DataSection(datasets=list(datasets), **fields)


def spec(path, fmt, **extra):
    return {"path": str(path), "format": fmt, **extra}


def supervised(tokenizer, ids, labels) -> str:
    return tokenizer.decode([token for token, label in zip(ids, labels) if label != -100])


@pytest.fixture
def tok(tiny_tokenizer):
    from qtune.modeling.load import choose_pad_token

    choose_pad_token(tiny_tokenizer)
    return tiny_tokenizer


def test_alpaca_masks_the_prompt_and_supervises_eos(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5"}])
    prepared = build(section(spec(path, "alpaca")), tok, seed=0)
    ids, labels = prepared.train[0]["input_ids"], prepared.train[0]["labels"]
    assert ids[0] == tok.bos_token_id
    assert labels[-1] == tok.eos_token_id == ids[-1]
    assert supervised(tok, ids, labels) == "5" + tok.eos_token
    prompt = ALPACA_WITH_INPUT.format(instruction="Add the two numbers.", input="2 + 3")
    assert tok.decode(ids, skip_special_tokens=True) == prompt + "5"


def test_alpaca_without_input_uses_the_short_template(tok):
    ids, labels = tokenize_sample({"prompt": "p", "completion": "c"}, tok, train_on_inputs=False, render=None)
    assert labels.count(-100) == len(tok("p").input_ids)


def test_train_on_inputs_supervises_everything(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "output": "hi"}])
    prepared = build(section(spec(path, "alpaca"), train_on_inputs=True), tok, seed=0)
    assert prepared.train[0]["labels"] == prepared.train[0]["input_ids"]


def test_prompt_completion(tmp_path, tok):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: 1+1?\nA:", "completion": " 2"}])
    row = build(section(spec(path, "prompt_completion")), tok, seed=0).train[0]
    assert supervised(tok, row["input_ids"], row["labels"]) == " 2" + tok.eos_token


def conversation():
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "reverse apple"},
        {"role": "assistant", "content": "elppa"},
        {"role": "user", "content": "and stone?"},
        {"role": "assistant", "content": "enots"},
    ]


def test_messages_supervise_only_assistant_turns_with_end_of_turn(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": conversation()}])
    row = build(section(spec(path, "messages")), tok, seed=0).train[0]
    text = supervised(tok, row["input_ids"], row["labels"])
    assert text == "elppa<|im_end|>\nenots<|im_end|>\n"
    assert "apple" not in text and "Be brief" not in text


def test_sharegpt_maps_roles(tmp_path, tok):
    turns = [{"from": "human", "value": "reverse apple"}, {"from": "gpt", "value": "elppa"}]
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": turns}])
    row = build(section(spec(path, "sharegpt")), tok, seed=0).train[0]
    assert supervised(tok, row["input_ids"], row["labels"]) == "elppa<|im_end|>\n"
    assert "<|im_start|>user" in tok.decode(row["input_ids"])


def test_chatml_template_from_the_recipe(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": conversation()[:3]}])
    row = build(section(spec(path, "messages"), chat_template="chatml"), tok, seed=0).train[0]
    assert tok.decode(row["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert supervised(tok, row["input_ids"], row["labels"]) == "elppa<|im_end|>\n"


def test_text_format_trains_on_everything(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "the model learns"}])
    row = build(section(spec(path, "text")), tok, seed=0).train[0]
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tok.eos_token_id


def test_csv_parquet_json_and_folders(tmp_path, tok):
    import pandas as pd

    rows = [{"instruction": f"i{n}", "input": "", "output": f"o{n}"} for n in range(3)]
    folder = tmp_path / "mixed"
    folder.mkdir()
    pd.DataFrame(rows).to_csv(folder / "a.csv", index=False)
    pd.DataFrame(rows).to_parquet(folder / "b.parquet")
    (folder / "c.json").write_text(json.dumps(rows))
    (folder / "notes.txt").write_text("ignored")
    prepared = build(section(spec(folder, "alpaca")), tok, seed=0)
    assert len(prepared.train) == 9


def test_several_datasets_mix_and_columns_map(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"q": "question", "a": "answer"}] * 4)
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": conversation()}] * 3)
    data = section(spec(a, "prompt_completion", columns={"prompt": "q", "completion": "a"}), spec(b, "messages"))
    prepared = build(data, tok, seed=0)
    assert len(prepared.train) == 7
    assert [s["rows"] for s in prepared.report["sources"]] == [4, 3]


def test_val_size_split_is_seeded_and_disjoint(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"n{n}", "output": str(n)} for n in range(50)])
    first = build(section(spec(path, "alpaca"), val_size=0.2), tok, seed=3)
    again = build(section(spec(path, "alpaca"), val_size=0.2), tok, seed=3)
    assert (len(first.train), len(first.val)) == (40, 10)
    assert first.val["input_ids"] == again.val["input_ids"]
    assert not {tuple(r) for r in first.val["input_ids"]} & {tuple(r) for r in first.train["input_ids"]}


def test_explicit_validation_dataset(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "output": "b"}] * 5)
    val = write_jsonl(tmp_path / "v.jsonl", [{"instruction": "c", "output": "d"}] * 2)
    prepared = build(section(spec(train, "alpaca"), val_datasets=[spec(val, "alpaca")]), tok, seed=0)
    assert (len(prepared.train), len(prepared.val)) == (5, 2)


def test_truncation_is_counted_and_fully_masked_rows_dropped(tmp_path, tok):
    rows = [
        {"instruction": "short", "output": "ok"},
        {"instruction": "word " * 300, "output": "lost"},  # prompt alone exceeds max_length: nothing to learn
        {"instruction": "x", "output": "answer " * 300},  # completion cut, still learnable
    ]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    prepared = build(section(spec(path, "alpaca"), max_length=128), tok, seed=0)
    assert prepared.report["truncated"] == 2
    assert prepared.report["dropped"] == 1
    assert len(prepared.train) == 2
    assert max(len(r) for r in prepared.train["input_ids"]) == 128


# --------------------------------------------------------------------------- errors


def expect_data_error(tok, data, match):
    with pytest.raises(DataError, match=match) as info:
        build(data, tok, seed=0)
    assert info.value.code == EXIT_DATA
    assert "\n" not in info.value.line()
    return info.value


def test_missing_file(tmp_path, tok):
    """A path that can only be local and is not there: said at once, never looked up on the Hub (and a missing file
    is "not found" whatever its suffix, unlike an existing file of a type qtune does not read: the test below)."""
    expect_data_error(tok, section(spec(tmp_path / "nope.jsonl", "alpaca")), "dataset file not found")
    expect_data_error(tok, section(spec("./data/gone.txt", "text")), "dataset file not found")


def test_empty_file(tmp_path, tok):
    (tmp_path / "e.jsonl").write_text("\n\n")
    expect_data_error(tok, section(spec(tmp_path / "e.jsonl", "alpaca")), "empty")


def test_missing_column_is_named(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "response": "r"}])
    error = expect_data_error(tok, section(spec(path, "alpaca")), "column 'output' missing")
    assert "response" in error.line() and "columns:" in error.line()


def test_bad_jsonl_line_gives_its_number(tmp_path, tok):
    path = tmp_path / "a.jsonl"
    path.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n'
    )
    expect_data_error(tok, section(spec(path, "alpaca")), "line 3")


def test_non_utf8_bytes_give_the_line(tmp_path, tok):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    expect_data_error(tok, section(spec(path, "alpaca")), "not UTF-8.*line 2")


def test_wrong_value_type_names_the_row(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": None}]
    )
    expect_data_error(tok, section(spec(path, "alpaca")), "row 2")


def test_zero_supervised_tokens(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    expect_data_error(tok, section(spec(path, "messages")), "no training sample has a supervised token")


def test_unknown_role(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "wizard", "content": "hi"}]}])
    expect_data_error(tok, section(spec(path, "messages")), "unknown role 'wizard'")


def test_unsupported_file_type(tmp_path, tok):
    (tmp_path / "a.txt").write_text("hello")
    expect_data_error(tok, section(spec(tmp_path / "a.txt", "text")), r"unsupported data file type '\.txt'")


def test_too_few_rows_for_the_validation_split(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    expect_data_error(tok, section(spec(path, "alpaca"), val_size=0.5), "too few")


def test_columns_mapping_to_unknown_name(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(RecipeError, match="unknown name"):
        build(section(spec(path, "alpaca", columns={"answer": "output"})), tok, seed=0)


def test_messages_need_a_chat_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": conversation()}])
    saved, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(RecipeError, match="chat_template"):
            build(section(spec(path, "messages")), tok, seed=0)
    finally:
        tok.chat_template = saved
