"""Datasets in TRL's formats: loading, column checks, chat templates, prompt batches, preference pairs.

Rows are prompt-only (`prompt` plus any extra columns, which reward functions receive) or
preference rows (`prompt`, `chosen`, `rejected`). Each field is a plain string or a list of chat
messages; chat messages are rendered with the tokenizer's chat template (TRL's own helper, so a
TRL dataset renders the same here as in TRL).

A file that cannot be read, and a value TRL cannot read where it sits, stop the run before it
starts with a DataError naming the file, the line (JSON Lines) or row, the column and the fix
(`llmrl.data_checks`: `require_columns` is the one check every trainer's columns go through).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import datasets
import torch
from jinja2 import TemplateError
from trl.data_utils import common_prefix_length, is_conversational, maybe_apply_chat_template, maybe_extract_prompt

from llmrl.config import DataConfig
from llmrl.data_checks import DataError, is_empty, json_problem, require_columns  # trainers import the first two from here

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
PROMPT_COLUMNS = ("prompt",)
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


def load_rows(source: str, *, config: str | None = None, split: str = "train", max_samples: int | None = None):
    """A `datasets.Dataset` from a hub name, a dataset folder, or a json/jsonl/parquet/csv file.

    A single file holds one split, so `split` is ignored for it. A folder made by
    `Dataset.save_to_disk` is loaded as saved; any other folder goes to `datasets.load_dataset`,
    which finds files named after their splits (train.jsonl, test.jsonl, ...).
    """
    path = Path(source)
    if path.suffix.lower() in FILE_BUILDERS:
        rows = _load_file(path, source)
    elif path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        rows = datasets.load_from_disk(str(path))
        if isinstance(rows, datasets.DatasetDict):
            rows = _pick_split(rows, split, source)
    else:
        try:
            rows = datasets.load_dataset(str(source), config, split=split)
        except Exception as err:  # a bad file in a folder, a hub or network error, an unknown split
            raise _load_error(source, split, err) from None
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    return rows


def _load_file(path: Path, source: str) -> datasets.Dataset:
    """One local file as a dataset. A missing, empty or unparsable file is a DataError naming it
    (and, for JSON, the line): datasets would raise StopIteration, or a parser error without either."""
    if not path.is_file():
        raise DataError(f"Dataset file {source!r} does not exist (working directory: {os.getcwd()}).")
    if _is_blank(path):
        raise DataError(_empty(source))
    builder = FILE_BUILDERS[path.suffix.lower()]
    try:
        with _quiet("datasets.packaged_modules.json.json"):
            rows = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # any parser's error: the file is what the user has to fix
        hint = " (one JSON object per line)" if builder == "json" else ""
        raise DataError(_file_problem(path, source) or f"Dataset file {source!r} could not be read as {builder}: "
                        f"{_root_cause(err)}. Check that it is a {builder} file{hint}.") from None
    if len(rows) == 0:
        raise DataError(_empty(source))
    return rows


def _load_error(source: str, split: str, err: Exception) -> DataError:
    """The DataError for a hub name or folder datasets failed to load: a folder's bad file with its line."""
    if Path(source).is_dir():
        for path in sorted(Path(source).rglob("*")):  # datasets builds every split, so any file can be the one
            if path.suffix.lower() in FILE_BUILDERS and (problem := _file_problem(path, str(path))):
                return DataError(problem)
    if isinstance(err, ValueError):  # datasets' "Unknown split" and friends
        return DataError(f"Could not load split {split!r} of dataset {source!r}: {err}")
    if isinstance(err, OSError):  # FileNotFoundError, ConnectionError among them
        return DataError(f"Could not load dataset {source!r} (split {split!r}): {err}. Give a local file or folder, "
                         "or check the hub name and your network.")
    return DataError(f"Could not load dataset {source!r} (split {split!r}): {_root_cause(err)}.")


def _file_problem(path: Path, source: str) -> str | None:
    """Why a local file cannot be loaded, if it can be told: empty, a CSV header alone, or (JSON) the wrong line."""
    if _is_blank(path):
        return _empty(source)
    if path.suffix.lower() == ".csv" and len(path.read_bytes().strip().splitlines()) <= 1:
        return _empty(source).replace("no rows.", "no rows (only a header).")
    return json_problem(path, source) if FILE_BUILDERS[path.suffix.lower()] == "json" else None


def _empty(source: str) -> str:
    return (f"Dataset file {source!r} is empty: it holds no rows. Write the rows into it (a .jsonl file holds "
            'one JSON object per line, e.g. {"prompt": "..."}), or give another file.')


def _is_blank(path: Path) -> bool:
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            if chunk.strip():
                return False
    return True


@contextlib.contextmanager
def _quiet(logger_name: str):
    """datasets' JSON loader logs its parser's error before raising; the DataError raised instead
    says it with the file and line, so the user reads one line, not two."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return " ".join(f"{type(err).__name__}: {err}".split())


def _pick_split(splits: datasets.DatasetDict, split: str, source: str) -> datasets.Dataset:
    if split not in splits:
        raise DataError(f"Dataset {source!r} has no split {split!r}; it has {sorted(splits)}.")
    return splits[split]


def load_datasets(data: DataConfig, required: tuple[str, ...] = PROMPT_COLUMNS, optional: tuple[str, ...] = ()):
    """The (train, eval or None) datasets of a recipe, with the `required` columns, and the
    `optional` ones that are present, checked here, where errors can name the file and line."""
    if not data.dataset_name:
        raise DataError("No training data: set dataset_name in the recipe (a hub name, folder or file).")
    train = load_rows(data.dataset_name, config=data.dataset_config, split=data.dataset_train_split,
                      max_samples=data.max_train_samples)
    require_columns(train, required + _present(optional, train), data.dataset_name)
    eval_rows = None
    if data.eval_dataset_name or data.dataset_test_split:
        source = data.eval_dataset_name or data.dataset_name
        eval_rows = load_rows(source, config=data.dataset_config, split=data.dataset_test_split or "test",
                              max_samples=data.max_eval_samples)
        require_columns(eval_rows, required + _present(optional, eval_rows), source)
    return train, eval_rows


def _present(columns: tuple[str, ...], rows) -> tuple[str, ...]:
    return tuple(column for column in columns if column in rows.column_names)


def render_prompt(prompt, tokenizer) -> str:
    """A prompt as the model sees it: strings as they are, chat messages through the chat
    template with the generation prompt added."""
    return _apply_chat_template({"prompt": prompt}, tokenizer)["prompt"]


def render_preference(row: dict, tokenizer) -> dict[str, str]:
    """`prompt`, `chosen`, `rejected` as text, chat messages rendered (chosen and rejected are the
    continuations after the rendered prompt)."""
    return _apply_chat_template({k: row[k] for k in PREFERENCE_COLUMNS}, tokenizer)


def _apply_chat_template(example: dict, tokenizer) -> dict[str, str]:
    """TRL's rendering. A template may refuse what TRL accepts (a role the model never saw, such
    as Gemma's 'system' or a 'tool' turn): that is a DataError, not a jinja traceback."""
    try:
        return maybe_apply_chat_template(example, tokenizer)
    except TemplateError as err:
        shown = repr(example) if len(repr(example)) <= 200 else repr(example)[:200] + "..."
        raise DataError(f"The model's chat template cannot render {shown}: {err}. Keep to the roles and message "
                        "shapes this model's chat template knows.") from None


def encode_preference(row: dict, tokenizer, max_prompt_length: int | None = None,
                      max_length: int | None = None) -> dict[str, list[int]]:
    """`prompt_ids`, `chosen_ids`, `rejected_ids` of one preference row, tokenized as TRL's DPOTrainer does.

    Chat messages go through the chat template (which writes any BOS and end-of-turn tokens); plain
    strings get the tokenizer's special tokens and EOS after each answer, so the model learns to stop.
    Each answer is tokenized together with its prompt and starts where those tokens leave the
    prompt's own (a merge across the boundary moves the start left): the model is trained on the
    tokens it reads at inference, not on a boundary that tokenizing apart would invent.

    Truncation: the prompt keeps its last `max_prompt_length` tokens, then each answer its first
    `max_length - len(prompt)` tokens. With a prompt that fits, this is TRL's `keep_start`.
    """
    conversational = is_conversational(row)
    text = render_preference(row, tokenizer)
    if not conversational:
        text = {key: value if key == "prompt" or value.endswith(tokenizer.eos_token) else value + tokenizer.eos_token
                for key, value in text.items()}
    special = not conversational  # the chat template already wrote any BOS

    def encode(string):
        return tokenizer(string, add_special_tokens=special)["input_ids"]

    prompt = encode(text["prompt"])
    chosen, rejected = encode(text["prompt"] + text["chosen"]), encode(text["prompt"] + text["rejected"])
    start = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    prompt = prompt[:start][-max_prompt_length:] if max_prompt_length else prompt[:start]
    room = max_length - len(prompt) if max_length else None
    return {"prompt_ids": prompt, "chosen_ids": chosen[start:][:room], "rejected_ids": rejected[start:][:room]}


def tokenize_preferences(rows, tokenizer, source: str, max_prompt_length: int | None = None,
                         max_length: int | None = None):
    """Preference rows -> a dataset of `prompt_ids`, `chosen_ids`, `rejected_ids` (`encode_preference`).

    Rows without a `prompt` column hold whole texts or conversations in chosen/rejected: what they
    share at the start (the first messages, or the text up to the last space before they differ)
    is the prompt (TRL's implicit-prompt format). Missing columns and empty answers are errors that
    name `source`, the column and the row.
    """
    require_columns(rows, PREFERENCE_COLUMNS if "prompt" in rows.column_names else ("chosen", "rejected"), source)
    if len(rows) == 0:
        raise DataError(f"Dataset {source!r} has no rows.")

    def encode(row, index):
        row = maybe_extract_prompt(row)
        for column in PREFERENCE_COLUMNS:
            if is_empty(row[column]):
                raise DataError(
                    f"Dataset {source!r}, row {index}: {column!r} is empty once the messages shared by chosen and "
                    f"rejected are taken as the prompt. Give both answers after the shared prompt, or a 'prompt' column."
                )
        return encode_preference(row, tokenizer, max_prompt_length, max_length)

    return rows.map(encode, with_indices=True, remove_columns=rows.column_names, desc=f"Tokenizing {source}")


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


# Columns reward functions do not get, as in TRL: the prompt (they get `prompts`), and a dataset's
# own `completion` / `completion_ids`, which the generated completions replace.
NOT_REWARD_COLUMNS = ("prompt", "completion", "completion_ids")


class PromptCollator:
    """Collates prompt-only rows into a left-padded batch for generation, keeping every other
    column (but `NOT_REWARD_COLUMNS`) as a list: reward functions get them as keyword arguments."""

    def __init__(self, tokenizer, max_prompt_length: int):
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length

    def __call__(self, rows: list[dict]) -> dict:
        prompts = [row["prompt"] for row in rows]
        ids = encode_prompts(prompts, self.tokenizer, self.max_prompt_length)
        input_ids, attention_mask = pad(ids, self.tokenizer.pad_token_id, side="left")
        columns = {key: [row[key] for row in rows] for key in rows[0] if key not in NOT_REWARD_COLUMNS}
        return {"prompts": prompts, "input_ids": input_ids, "attention_mask": attention_mask, "columns": columns}


class PreferenceCollator:
    """Collates tokenized pairs (`tokenize_preferences`) into one batch of 2B sequences, the B
    chosen first, then the B rejected, so both answers go through the model in one forward pass.

    Sequences are `prompt + answer`, left-padded, so every answer ends in the last column:
    `answer_mask` [2B, C] marks each answer's tokens in the last C columns (C = the longest
    answer), which is what `llmrl.logprobs.completion_logprobs` reads. Columns
    `ref_chosen_logps` and `ref_rejected_logps` (precomputed reference log-probs) become
    `ref_logps` [2B], in the same chosen-then-rejected order.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        answers = [row["chosen_ids"] for row in rows] + [row["rejected_ids"] for row in rows]
        prompts = [row["prompt_ids"] for row in rows] * 2
        input_ids, attention_mask = pad([p + a for p, a in zip(prompts, answers)], self.pad_token_id, side="left")
        _, answer_mask = pad(answers, self.pad_token_id, side="left")
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask}
        if "ref_chosen_logps" in rows[0]:
            batch["ref_logps"] = torch.tensor([row["ref_chosen_logps"] for row in rows]
                                              + [row["ref_rejected_logps"] for row in rows], dtype=torch.float32)
        return batch
