"""Reward-model training (`algorithm: reward_model`): Bradley-Terry on prompt/chosen/rejected rows.

    trainer = RewardTrainer("path/to/model", args=RewardConfig(max_steps=100), train_dataset=pairs)
    history = trainer.train()      # resumes, evaluates, saves output_dir; returns the log history

The model is an `AutoModelForSequenceClassification` with one label (`llmrl.models.load_reward_model`;
a causal LM gets a fresh `score` head), optionally with a LoRA adapter (task SEQ_CLS; peft then
trains and saves the `score` head in full). The loss per pair is

    -log sigmoid(r_c - r_r - margin)  +  center_rewards_coefficient * (r_c + r_r)^2

averaged over the pairs (`bradley_terry_loss`); `margin` is the row's optional `margin` column
(0 without it). Metrics, on train and eval data: loss, accuracy (share of pairs with r_c > r_r),
margin (mean r_c - r_r) and mean_reward.

Why TRL's `RewardTrainer` underneath, with our own `compute_loss`: TRL already prepares the data
the way TRL users expect (chat templates, implicit or explicit prompts, EOS after plain-text
answers, pairs longer than `max_length` dropped, a `margin` column batched along), wraps the LoRA
adapter, turns dropout off and runs the Trainer's loop, checkpoints and logging. But its loss reads
the score where the model's own forward pools: the last token that is not `pad_token_id`. When pad
== EOS (a tokenizer without a pad token, see `load_tokenizer`) and an answer ends with EOS, that is
the token *before* EOS, while `llmrl.models.reward_scores` -- which PPO and evaluation use -- reads
the last real token of the attention mask. A head trained at one position and read at another
gives scores it was never trained to give. So `compute_loss` is ours: it reads the head's output at
the mask's last real token, the position `reward_scores` reads, whatever the pad token is.
"""

from __future__ import annotations

import logging
import math
import numbers

import torch
import torch.nn.functional as F
import trl
from peft import PeftModel
from transformers import set_seed

from llmrl.adapters import check_chain
from llmrl.config import ModelConfig, RewardConfig
from llmrl.data import DataError, load_datasets, require_columns
from llmrl.models import HEAD_NAMES, last_token_index, load_reward_model, load_tokenizer, lora_config, padded_forward
from llmrl.trainers.checkpoint import save_recipe
from llmrl.trainers.hf import HFRunMixin, training_arguments

logger = logging.getLogger(__name__)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None,
                       center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_c - r_r - margin) + c * (r_c + r_r)^2: [P], [P], [P] -> scalar.

    The margin asks the chosen answer to win by at least that much (Llama 2's reward models); the
    centring term (c = `center_rewards_coefficient`, off when None) keeps scores near 0, which the
    BT loss alone leaves free (it sees only differences).
    """
    difference = chosen_scores - rejected_scores
    if margin is not None:
        difference = difference - margin.to(difference)
    loss = -F.logsigmoid(difference).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_scores + rejected_scores) ** 2).mean()
    return loss


def check_preference_rows(rows, source: str) -> None:
    """`chosen` and `rejected` filled in every row; `prompt` optional (TRL's implicit-prompt rows
    carry it inside chosen and rejected); `margin`, when present, a finite number in every row."""
    require_columns(rows, ("chosen", "rejected"), source)
    if "prompt" in rows.column_names:
        require_columns(rows, ("prompt",), source)
    if "margin" in rows.column_names:
        bad = [i for i, value in enumerate(rows["margin"])
               if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value)]
        if bad:
            raise DataError(f"Dataset {source!r}: column 'margin' must hold a finite number in every row; row {bad[0]} "
                            f"holds {rows[bad[0]]['margin']!r} ({len(bad)} such rows). Fix or drop those rows, or "
                            "remove the column to train without margins.")


def _scalar_head(model) -> torch.nn.Module:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    for name in HEAD_NAMES:
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return getattr(base, name)
    raise ValueError(f"{type(base).__name__} has no scalar head named one of {HEAD_NAMES}; load the reward model with "
                     "llmrl.models.load_reward_model.")


class RewardTrainer(HFRunMixin, trl.RewardTrainer):
    """Reward-model training: `RewardTrainer(model, args=RewardConfig(...), train_dataset=pairs).train()`.

    Args:
        model: a hub name, local folder or model object: a causal LM (a fresh score head is added)
            or a sequence classifier with one label (default: model_config's model).
        args: llmrl's `RewardConfig` (defaults if None).
        train_dataset / eval_dataset: `datasets.Dataset`s with `chosen` and `rejected` (strings or
            chat messages), usually `prompt`, and optionally a numeric `margin`.
        processing_class: the tokenizer (default: the model's, via `llmrl.models.load_tokenizer`).
        peft_config: a peft `LoraConfig` (task SEQ_CLS) to train an adapter (or set use_peft in
            model_config).
        model_config: how to load the model (dtype, LoRA, gradient checkpointing).
        trainer_kwargs: passed on to `trl.RewardTrainer` (e.g. callbacks).
    """

    def __init__(self, model=None, args: RewardConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, model_config: ModelConfig | None = None, **trainer_kwargs):
        args = args or RewardConfig()
        if train_dataset is None:
            raise ValueError("RewardTrainer needs a train_dataset of prompt/chosen/rejected rows.")
        check_preference_rows(train_dataset, "train_dataset")
        if eval_dataset is not None:
            check_preference_rows(eval_dataset, "eval_dataset")
        self.train_config = args
        model_config = model_config or ModelConfig(model_name_or_path=model if isinstance(model, str) else None)
        model = model if model is not None else model_config.model_name_or_path
        if model is None:
            raise ValueError("No reward model to load: set model_name_or_path in the recipe, or pass model=.")
        if model_config.load_in_4bit:
            raise ValueError("load_in_4bit is not supported for reward-model training yet; set load_in_4bit: false "
                             "(LoRA on bfloat16 weights, use_peft: true, fits a 0.5B-3B model on a laptop GPU).")
        tokenizer = processing_class or load_tokenizer(model_config)
        set_seed(args.seed)  # a fresh score head and a LoRA adapter start from random weights
        reward_model = load_reward_model(model, model_config, pad_token_id=tokenizer.pad_token_id)
        if isinstance(reward_model, PeftModel):
            peft_config = None  # already adapted
        elif peft_config is None and model_config.use_peft:
            peft_config = lora_config(model_config, "SEQ_CLS")

        hf_args = training_arguments(args, model_config, trl.RewardConfig, has_eval_data=eval_dataset is not None,
                                     max_length=args.max_length,
                                     center_rewards_coefficient=args.center_rewards_coefficient)
        super().__init__(model=reward_model, args=hf_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, peft_config=peft_config, **trainer_kwargs)
        self._use_logging_dir()
        check_chain(self.model)
        self._score_head = _scalar_head(self.model)
        self._report_dropped(len(train_dataset), self.train_dataset, "train_dataset")
        if eval_dataset is not None:
            self._report_dropped(len(eval_dataset), self.eval_dataset, "eval_dataset")

    def _report_dropped(self, given: int, prepared, name: str) -> None:
        """TRL drops pairs whose chosen or rejected sequence is longer than max_length: say so."""
        kept = len(prepared)
        if kept == 0:
            raise DataError(f"{name}: all {given} pairs are longer than max_length={self.args.max_length} tokens "
                            "(prompt + answer), so none is left to train on. Raise max_length.")
        if kept < given:
            logger.warning("%s: %d of %d pairs are longer than max_length=%d tokens (prompt + answer) and were "
                           "dropped.", name, given - kept, given, self.args.max_length)

    def last_token_scores(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The head's score at each row's last real token: [N, T] -> [N] float32, with gradients.

        Equal to `llmrl.models.reward_scores`, but through `model(...)` itself, so a DDP-wrapped
        model synchronises its gradients: a forward hook keeps the head's per-position output,
        which the model's own forward would pool at a pad-id-dependent position.
        """
        outputs = []
        hook = self._score_head.register_forward_hook(lambda module, inputs, output: outputs.append(output))
        try:
            padded_forward(model, input_ids, attention_mask)
        finally:
            hook.remove()
        per_position = outputs[-1][..., 0].float()  # [N, T]
        rows = torch.arange(per_position.shape[0], device=per_position.device)
        return per_position[rows, last_token_index(attention_mask).to(per_position.device)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL's collator stacks the chosen rows, then the rejected rows, in one batch.
        scores = self.last_token_scores(model, inputs["input_ids"], inputs["attention_mask"])
        chosen, rejected = scores.chunk(2)
        loss = bradley_terry_loss(chosen, rejected, inputs.get("margin"), self.args.center_rewards_coefficient)

        # TRL's `log` averages `self._metrics[mode]` over the logging interval and adds them to the logs.
        mode = "train" if model.training else "eval"
        chosen_all = self.accelerator.gather_for_metrics(chosen.detach())
        rejected_all = self.accelerator.gather_for_metrics(rejected.detach())
        self._metrics[mode]["accuracy"].append((chosen_all > rejected_all).float().mean().item())
        self._metrics[mode]["margin"].append((chosen_all - rejected_all).mean().item())
        self._metrics[mode]["mean_reward"].append(torch.cat([chosen_all, rejected_all]).mean().item())
        if return_outputs:
            return loss, {"chosen_scores": chosen.detach(), "rejected_scores": rejected.detach()}
        return loss


def run(recipe):
    """`llmrl train` for `algorithm: reward_model`: the recipe's data and model through `RewardTrainer`."""
    train_rows, eval_rows = load_datasets(recipe.data, required=())
    check_preference_rows(train_rows, recipe.data.dataset_name)  # errors name the file
    if eval_rows is not None:
        check_preference_rows(eval_rows, recipe.data.eval_dataset_name or recipe.data.dataset_name)
    trainer = RewardTrainer(recipe.model.model_name_or_path, recipe.args, train_rows, eval_rows,
                            model_config=recipe.model)
    save_recipe(recipe, trainer.accelerator)
    return trainer.train()
