"""Datasets in TRL's formats: loading, column checks, chat templates, prompt batches.

Rows are prompt-only (`prompt` plus any extra columns, which reward functions receive) or
preference rows (`prompt`, `chosen`, `rejected`). Each field is a plain string or a list of chat
messages; chat messages are rendered with the tokenizer's chat template (TRL's own helper, so a
TRL dataset renders the same here as in TRL).
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import torch
from trl.data_utils import maybe_apply_chat_template

from llmrl.config import DataConfig

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
PROMPT_COLUMNS = ("prompt",)
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


class DataError(ValueError):
    """A dataset the user has to fix; the message names the source and the column."""


def load_rows(source: str, *, config: str | None = None, split: str = "train", max_samples: int | None = None):
    """A `datasets.Dataset` from a hub name, a dataset folder, or a json/jsonl/parquet/csv file.

    A single file holds one split, so `split` is ignored for it. A folder made by
    `Dataset.save_to_disk` is loaded as saved; any other folder goes to `datasets.load_dataset`,
    which finds files named after their splits (train.jsonl, test.jsonl, ...).
    """
    path = Path(source)
    if path.suffix.lower() in FILE_BUILDERS:
        if not path.is_file():
            raise DataError(f"Dataset file {source!r} does not exist (working directory: {os.getcwd()}).")
        rows = datasets.load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=str(path), split="train")
    elif path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        rows = datasets.load_from_disk(str(path))
        if isinstance(rows, datasets.DatasetDict):
            rows = _pick_split(rows, split, source)
    else:
        try:
            rows = datasets.load_dataset(str(source), config, split=split)
        except (FileNotFoundError, ConnectionError, OSError) as err:
            raise DataError(
                f"Could not load dataset {source!r} (split {split!r}): {err}. Give a local file or folder, "
                "or check the hub name and your network."
            ) from None
        except ValueError as err:  # datasets' "Unknown split" and friends
            raise DataError(f"Could not load split {split!r} of dataset {source!r}: {err}") from None
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    return rows


def _pick_split(splits: datasets.DatasetDict, split: str, source: str) -> datasets.Dataset:
    if split not in splits:
        raise DataError(f"Dataset {source!r} has no split {split!r}; it has {sorted(splits)}.")
    return splits[split]


def load_datasets(data: DataConfig, required: tuple[str, ...] = PROMPT_COLUMNS):
    """The (train, eval or None) datasets of a recipe, with the `required` columns checked."""
    if not data.dataset_name:
        raise DataError("No training data: set dataset_name in the recipe (a hub name, folder or file).")
    train = load_rows(data.dataset_name, config=data.dataset_config, split=data.dataset_train_split,
                      max_samples=data.max_train_samples)
    require_columns(train, required, data.dataset_name)
    eval_rows = None
    if data.eval_dataset_name or data.dataset_test_split:
        source = data.eval_dataset_name or data.dataset_name
        eval_rows = load_rows(source, config=data.dataset_config, split=data.dataset_test_split or "test",
                              max_samples=data.max_eval_samples)
        require_columns(eval_rows, required, source)
    return train, eval_rows


def _is_empty(value) -> bool:
    return value is None or (isinstance(value, (str, list)) and len(value) == 0)


def require_columns(rows, columns: tuple[str, ...], source: str) -> None:
    """Fail with the column, the source and the columns present when a required column is
    missing, or when one of its values is empty."""
    present = list(rows.column_names)
    for column in columns:
        if column not in present:
            raise DataError(
                f"Dataset {source!r} has no column {column!r} (its columns: {present}). "
                f"Rename the column holding the {column}s to {column!r}."
            )
        empty = [i for i, value in enumerate(rows[column]) if _is_empty(value)]
        if empty:
            raise DataError(
                f"Dataset {source!r}: column {column!r} is empty in {len(empty)} of {len(rows)} rows "
                f"(first at row {empty[0]}). Fill or drop those rows."
            )


def render_prompt(prompt, tokenizer) -> str:
    """A prompt as the model sees it: strings as they are, chat messages through the chat
    template with the generation prompt added."""
    return maybe_apply_chat_template({"prompt": prompt}, tokenizer)["prompt"]


def render_preference(row: dict, tokenizer) -> dict[str, str]:
    """`prompt`, `chosen`, `rejected` as text, chat messages rendered (chosen and rejected are the
    continuations after the rendered prompt)."""
    return maybe_apply_chat_template({k: row[k] for k in PREFERENCE_COLUMNS}, tokenizer)


def encode_prompts(prompts: list, tokenizer, max_prompt_length: int) -> list[list[int]]:
    """Token ids of rendered prompts, left-truncated to the last `max_prompt_length` tokens (the end
    of a prompt, where the question and the generation prompt are, matters most)."""
    texts = [render_prompt(p, tokenizer) for p in prompts]
    # The chat template already wrote any BOS; plain strings get none, as in TRL.
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [seq[-max_prompt_length:] for seq in ids]


def pad(sequences: list[list[int]], pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids [N, L], attention_mask [N, L])` padded to the longest sequence on `side`."""
    length = max((len(s) for s in sequences), default=0)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        input_ids[i, span] = torch.tensor(seq, dtype=torch.long)
        mask[i, span] = 1
    return input_ids, mask


class PromptCollator:
    """Collates prompt-only rows into a left-padded batch for generation, keeping every other
    column as a list (reward functions get them as keyword arguments)."""

    def __init__(self, tokenizer, max_prompt_length: int):
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length

    def __call__(self, rows: list[dict]) -> dict:
        prompts = [row["prompt"] for row in rows]
        ids = encode_prompts(prompts, self.tokenizer, self.max_prompt_length)
        input_ids, attention_mask = pad(ids, self.tokenizer.pad_token_id, side="left")
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        return {"prompts": prompts, "input_ids": input_ids, "attention_mask": attention_mask, "columns": columns}
