"""Datasets from files and folders, column checks, chat templates, left truncation and padding."""

import json

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from llmrl.config import DataConfig
from llmrl.data import (
    PREFERENCE_COLUMNS,
    DataError,
    PromptCollator,
    encode_prompts,
    load_datasets,
    load_rows,
    pad,
    render_preference,
    render_prompt,
)

ROWS = [
    {"prompt": "What is 2+3?", "answer": "5"},
    {"prompt": [{"role": "user", "content": "What is 7+1?"}], "answer": "8"},
]
PLAIN_ROWS = [{"prompt": "What is 2+3?", "answer": "5"}, {"prompt": "What is 7+1?", "answer": "8"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_load_rows_from_each_file_type(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    table = datasets.Dataset.from_list(PLAIN_ROWS)
    {".jsonl": lambda: table.to_json(str(path), lines=True), ".json": lambda: table.to_json(str(path), lines=False),
     ".csv": lambda: table.to_csv(str(path), index=False), ".parquet": lambda: table.to_parquet(str(path))}[suffix]()
    rows = load_rows(str(path))
    assert rows["prompt"] == ["What is 2+3?", "What is 7+1?"]
    assert [str(a) for a in rows["answer"]] == ["5", "8"]


def test_load_rows_keeps_chat_messages(tmp_path):
    rows = load_rows(str(write_jsonl(tmp_path / "chat.jsonl", ROWS[1:])))
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is 7+1?"}]


def test_load_rows_from_folders(tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PLAIN_ROWS),
                          "test": datasets.Dataset.from_list(PLAIN_ROWS[:1])}).save_to_disk(str(saved))
    assert len(load_rows(str(saved), split="test")) == 1
    with pytest.raises(DataError, match=r"has no split 'valid'; it has \['test', 'train'\]"):
        load_rows(str(saved), split="valid")

    split_files = tmp_path / "files"
    split_files.mkdir()
    write_jsonl(split_files / "train.jsonl", PLAIN_ROWS)
    write_jsonl(split_files / "test.jsonl", PLAIN_ROWS[:1])
    assert len(load_rows(str(split_files), split="train")) == 2
    assert len(load_rows(str(split_files), split="test")) == 1


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"Dataset file '.*nope.jsonl' does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_missing_prompt_column_names_column_file_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "1+1?", "answer": "2"}])
    with pytest.raises(DataError) as err:
        load_datasets(DataConfig(dataset_name=str(path)))
    message = str(err.value)
    assert "no column 'prompt'" in message and str(path) in message and "['question', 'answer']" in message


def test_empty_required_value_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                                  {"prompt": "p", "chosen": "", "rejected": "b"}])
    with pytest.raises(DataError, match=r"column 'chosen' is empty in 1 of 2 rows \(first at row 1\)"):
        load_datasets(DataConfig(dataset_name=str(path)), required=PREFERENCE_COLUMNS)


def test_load_datasets_with_eval_source_and_limits(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", PLAIN_ROWS * 5)
    test = write_jsonl(tmp_path / "test.jsonl", PLAIN_ROWS)
    train_rows, eval_rows = load_datasets(DataConfig(dataset_name=str(train), eval_dataset_name=str(test),
                                                     max_train_samples=3))
    assert len(train_rows) == 3 and len(eval_rows) == 2
    assert load_datasets(DataConfig(dataset_name=str(train)))[1] is None


def test_render_prompt_strings_and_chat(tokenizer):
    assert render_prompt("plain text", tokenizer) == "plain text"
    messages = [{"role": "user", "content": "What is 7+1?"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_prompt(messages, tokenizer) == expected
    assert expected.endswith("<|assistant|>")


def test_render_preference_chat(tokenizer):
    row = {"prompt": [{"role": "user", "content": "2+2?"}],
           "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": [{"role": "assistant", "content": "5"}]}
    text = render_preference(row, tokenizer)
    assert text["prompt"].endswith("<|assistant|>")
    assert text["chosen"].startswith("4") and text["rejected"].startswith("5")


def test_encode_prompts_keeps_the_end_of_long_prompts(tokenizer):
    long_prompt = "x" * 50 + "QUESTION?"
    (ids,) = encode_prompts([long_prompt], tokenizer, max_prompt_length=9)
    assert tokenizer.decode(ids) == "QUESTION?"


def test_pad_left_and_right():
    ids, mask = pad([[1, 2, 3], [4]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad([[1, 2, 3], [4]], pad_id=0, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_prompt_collator_left_pads_and_passes_columns(tokenizer):
    batch = PromptCollator(tokenizer, max_prompt_length=64)(ROWS)
    assert batch["columns"] == {"answer": ["5", "8"]}
    assert batch["prompts"] == [ROWS[0]["prompt"], ROWS[1]["prompt"]]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    # Left padding: every row ends on a real token, so generation continues each prompt directly.
    assert mask[:, -1].tolist() == [1, 1]
    for row, text in zip(range(2), [ROWS[0]["prompt"], render_prompt(ROWS[1]["prompt"], tokenizer)]):
        assert tokenizer.decode(ids[row][mask[row].bool()]) == text
    assert torch.all(ids[mask == 0] == tokenizer.pad_token_id)
