"""A trained reward model used as a reward function (TRL's signature), for PPO and evaluation.

    reward = RewardModelReward("outputs/reward_model")      # AutoModelForSequenceClassification, 1 label
    reward(prompts=["2+2="], completions=["4"])              # -> [score]

The pair is tokenized exactly as the reward trainer (TRL's `RewardTrainer` data preparation) did
in training, with the reward model's own tokenizer: plain text is `prompt + completion + EOS`
through the tokenizer (special tokens as it adds them); chat rows are the chat template of the
prompt messages followed by the assistant's completion. The score is read at the last real token
(`llmrl.models.reward_scores`), the position the reward trainer trained.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llmrl.data import pad


def is_reward_model_spec(spec) -> bool:
    """Does a `reward_funcs` entry name a reward model (TRL accepts one there) rather than a
    function? A folder that holds a saved model, or a hub id `org/name`; never a built-in name
    (which has no '/') nor `package.module:function` (which has a ':')."""
    if not isinstance(spec, (str, os.PathLike)) or ":" in str(spec):
        return False
    path = Path(spec)
    if path.is_dir():
        return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    return str(spec).count("/") == 1 and not path.suffix


def _as_messages(completion) -> list[dict]:
    if isinstance(completion, list):
        return completion
    return [{"role": "assistant", "content": completion}]


class RewardModelReward:
    """Score (prompt, completion) pairs with a sequence-classification reward model.

    Args:
        model: a folder / hub name (loaded with `llmrl.models.load_reward_model`) or a loaded model.
        tokenizer: the reward model's tokenizer (default: loaded from `model`'s folder).
        model_config: dtype and loading options for a folder.
        batch_size: pairs per forward pass.
        device: where to run it (default: where the model is).
    """

    __name__ = "reward_model"

    def __init__(self, model, tokenizer=None, model_config=None, batch_size: int = 16, device=None):
        from llmrl.config import ModelConfig
        from llmrl.model_sources import check_model_source
        from llmrl.models import load_reward_model, load_tokenizer

        if isinstance(model, str):
            check_model_source(model, "reward_model_name_or_path")
            tokenizer = tokenizer or load_tokenizer(ModelConfig(model_name_or_path=model))
            model = load_reward_model(model, model_config, pad_token_id=tokenizer.pad_token_id)
        if tokenizer is None:
            raise ValueError("RewardModelReward needs the reward model's tokenizer when given a model object.")
        self.model, self.tokenizer, self.batch_size = model.eval().requires_grad_(False), tokenizer, batch_size
        if device is not None:
            self.model.to(device)

    def encode(self, prompt, completion) -> list[int]:
        """The token ids of one pair, as the reward trainer saw them."""
        if isinstance(prompt, list):
            return self.tokenizer.apply_chat_template([*prompt, *_as_messages(completion)], tokenize=True,
                                                      return_dict=True)["input_ids"]
        text = prompt + completion
        eos = self.tokenizer.eos_token
        return self.tokenizer(text if text.endswith(eos) else text + eos)["input_ids"]

    @torch.no_grad()
    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        from llmrl.models import reward_scores

        device = next(self.model.parameters()).device
        encoded = [self.encode(p, c) for p, c in zip(prompts, completions)]
        scores = []
        for i in range(0, len(encoded), self.batch_size):
            ids, mask = pad(encoded[i:i + self.batch_size], self.tokenizer.pad_token_id, side="left")
            scores += reward_scores(self.model, ids.to(device), mask.to(device)).tolist()
        return scores


def as_list(reward_funcs) -> list:
    """`reward_funcs=` as a list: TRL takes one function (or name) alone as well as a list."""
    if reward_funcs is None:
        return []
    return [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str) else list(reward_funcs)


def resolve_rewards(specs: list, reward_model_name_or_path=None, *, model_config=None, batch_size: int = 16,
                    device=None) -> list[tuple[str, object]]:
    """`(name, fn)` of each reward, in order: functions, built-in names, 'module:function', and
    reward models, named in `reward_funcs` (a folder or hub id, as TRL accepts; named by the
    folder) or as `reward_model_name_or_path` (the last reward, as reward_weights counts it)."""
    from .builtins import resolve_reward_funcs

    def reward_model(path):
        return RewardModelReward(path, model_config=model_config, batch_size=batch_size, device=device)

    models = {i: reward_model(spec) for i, spec in enumerate(specs) if is_reward_model_spec(spec)}
    functions = iter(resolve_reward_funcs([spec for i, spec in enumerate(specs) if i not in models]))
    rewards = [(Path(str(specs[i])).name, models[i]) if i in models else next(functions) for i in range(len(specs))]
    if reward_model_name_or_path:
        rewards.append(("reward_model", reward_model(reward_model_name_or_path)))
    return rewards
