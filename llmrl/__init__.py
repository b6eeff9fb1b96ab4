"""llmrl: post-train small causal language models with RL and preference optimisation.

The public names load lazily, so `import llmrl.algos` costs only torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "llmrl.config",
    "DataConfig": "llmrl.config",
    "TrainConfig": "llmrl.config",
    "RLConfig": "llmrl.config",
    "DPOConfig": "llmrl.config",
    "RewardConfig": "llmrl.config",
    "SFTConfig": "llmrl.config",
    "PRESETS": "llmrl.config",
    "ALGORITHMS": "llmrl.config",
    "Recipe": "llmrl.recipe",
    "load_recipe": "llmrl.recipe",
    "train": "llmrl.trainers",
    "RLTrainer": "llmrl.trainers.online",
    "DPOTrainer": "llmrl.trainers.dpo",
    "SFTTrainer": "llmrl.trainers.sft",
    "RewardTrainer": "llmrl.trainers.reward",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmrl' has no attribute {name!r}")
