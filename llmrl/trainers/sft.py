"""Supervised fine-tuning (`algorithm: sft`): TRL's `SFTTrainer` behind llmrl's config, models and data.

    trainer = SFTTrainer("path/to/model", args=SFTConfig(max_steps=100), train_dataset=rows)
    history = trainer.train()      # resumes, evaluates, saves output_dir; returns the log history

Why TRL's trainer: it already does everything SFT needs here, and does it the way TRL users expect
-- tokenising prompt/completion and chat rows with the chat template, labels of -100 outside the
completion (prompt/completion rows) or outside the assistant turns (`{% generation %}` blocks of
the chat template, for `messages` rows), EOS appended to plain-text completions, best-fit packing
with per-example positions (transformers then keeps packed examples from attending to each other),
NEFTune through `transformers.Trainer`, and memory-light log-probs. This module only maps llmrl's
settings onto it:

- the model comes from `llmrl.models.load_policy` (dtype, LoRA, 4-bit, gradient checkpointing) and
  the tokenizer from `load_tokenizer`, exactly as the online trainer loads them;
- `completion_only_loss` means "loss on what the model must produce": the completion of
  prompt/completion rows, the assistant turns of `messages` rows (TRL's `assistant_only_loss`);
  plain `text` rows have no completion, so every token carries loss there;
- `SFTConfig.packing` uses TRL's default best-fit-decreasing packing with `max_length`;
- the shared `TrainConfig` fields go through `llmrl.trainers.hf.training_arguments`.
"""

from __future__ import annotations

import logging

import trl
from transformers import set_seed

from llmrl.config import ModelConfig, SFTConfig
from llmrl.data import DataError, load_datasets, require_columns
from llmrl.models import load_policy, load_tokenizer
from llmrl.trainers.checkpoint import save_recipe
from llmrl.trainers.hf import HFRunMixin, training_arguments

logger = logging.getLogger(__name__)

# The row formats SFT accepts (TRL's), by the columns that identify them.
SFT_FORMATS = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",), "text": ("text",)}


def sft_format(rows, source: str) -> str:
    """Which SFT format `rows` are in ('prompt_completion', 'messages' or 'text'), after checking
    that its columns are present and filled; a DataError names the column and the fix otherwise."""
    columns = list(rows.column_names)
    if "prompt" in columns or "completion" in columns:
        found = "prompt_completion"
    elif "messages" in columns:
        found = "messages"
    elif "text" in columns:
        found = "text"
    else:
        raise DataError(
            f"Dataset {source!r} has no SFT columns (its columns: {columns}). SFT trains on 'prompt' + 'completion' "
            "rows (strings or chat messages), on chat rows in a 'messages' column (a list of {role, content}), or on "
            "plain 'text' rows: rename your columns to one of these."
        )
    require_columns(rows, SFT_FORMATS[found], source)
    return found


class SFTTrainer(HFRunMixin, trl.SFTTrainer):
    """SFT of a causal LM: `SFTTrainer(model, args=SFTConfig(...), train_dataset=rows).train()`.

    Args:
        model: a hub name, a local folder or a model object (default: model_config's model).
        args: llmrl's `SFTConfig` (defaults if None).
        train_dataset / eval_dataset: `datasets.Dataset`s of prompt/completion, `messages` or `text`
            rows (strings or chat messages; see `sft_format`); both in the same format.
        processing_class: the tokenizer (default: the model's, via `llmrl.models.load_tokenizer`).
        peft_config: a peft `LoraConfig` to train an adapter (or set use_peft in model_config).
        model_config: how to load the model (dtype, LoRA, 4-bit, gradient checkpointing).
        trainer_kwargs: passed on to `trl.SFTTrainer` (e.g. callbacks, formatting_func).

    After `__init__`, `trainer.args` is the TRL/transformers config this run uses and
    `trainer.train_config` the llmrl one.
    """

    def __init__(self, model=None, args: SFTConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, model_config: ModelConfig | None = None, **trainer_kwargs):
        args = args or SFTConfig()
        if train_dataset is None:
            raise ValueError("SFTTrainer needs a train_dataset (prompt/completion, messages or text rows).")
        row_format = sft_format(train_dataset, "train_dataset")
        if eval_dataset is not None and sft_format(eval_dataset, "eval_dataset") != row_format:
            raise DataError(f"eval_dataset is in the {sft_format(eval_dataset, 'eval_dataset')!r} format but "
                            f"train_dataset in {row_format!r}; give both in the same format.")
        if args.completion_only_loss and row_format == "text":
            logger.warning("completion_only_loss is set, but 'text' rows have no completion: every token carries "
                           "loss. Use prompt/completion or messages rows to train on the answers only.")
        self.train_config = args
        model_config = model_config or ModelConfig(model_name_or_path=model if isinstance(model, str) else None)
        tokenizer = processing_class or load_tokenizer(model_config)
        set_seed(args.seed)  # a LoRA adapter's initial weights are random
        policy = load_policy(model_config, model=model, peft_config=peft_config)

        hf_args = training_arguments(
            args, model_config, trl.SFTConfig, has_eval_data=eval_dataset is not None,
            max_length=args.max_length,
            packing=args.packing,
            neftune_noise_alpha=args.neftune_noise_alpha,
            completion_only_loss=args.completion_only_loss,
            # For chat rows "the completion" is every assistant turn.
            assistant_only_loss=args.completion_only_loss and row_format == "messages",
        )
        super().__init__(model=policy, args=hf_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, **trainer_kwargs)
        self._use_logging_dir()


def run(recipe):
    """`llmrl train` for `algorithm: sft`: the recipe's data and model through `SFTTrainer`."""
    train_rows, eval_rows = load_datasets(recipe.data, required=())
    sft_format(train_rows, recipe.data.dataset_name)  # errors name the file, not "train_dataset"
    if eval_rows is not None:
        sft_format(eval_rows, recipe.data.eval_dataset_name or recipe.data.dataset_name)
    trainer = SFTTrainer(recipe.model.model_name_or_path, recipe.args, train_rows, eval_rows,
                         model_config=recipe.model)
    save_recipe(recipe, trainer.accelerator)
    return trainer.train()
