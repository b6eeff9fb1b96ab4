"""Every setting of llmrl, and every default, in one place (this package).

A recipe is one flat YAML mapping. Its keys are split across three dataclasses: `ModelConfig`
(what to load and how), `DataConfig` (where the rows come from) and the trainer's own config
(`RLConfig`, `DPOConfig`, `RewardConfig` or `SFTConfig`, picked by `algorithm`).

An algorithm name is a *preset*: a bundle of settings from `PRESETS`. Fields a preset controls
default to `None`, meaning "not set"; `__post_init__` fills each unset one from the preset, so
the precedence is field default < preset < recipe YAML < command-line flag.
"""

from __future__ import annotations

from llmrl.config.base import (
    DTYPES,
    LR_SCHEDULERS,
    TRACKERS,
    DataConfig,
    ModelConfig,
    TrainConfig,
    check_choice,
    closest_name,
)
from llmrl.config.offline import DPOConfig, RewardConfig, SFTConfig
from llmrl.config.online import GROUP_ESTIMATORS, KL_PLACEMENTS, PRESETS, RLConfig
from llmrl.config.trl_names import accept_trl_names

for _config in (RLConfig, DPOConfig, SFTConfig, RewardConfig):
    accept_trl_names(_config)  # RLConfig(loss_type="dapo", bf16=False, ...): TRL's names, translated or refused

# Which config (and so which trainer) each algorithm name selects.
ALGORITHMS: dict[str, type[TrainConfig]] = {
    **{name: RLConfig for name in PRESETS},
    "dpo": DPOConfig,
    "reward_model": RewardConfig,
    "sft": SFTConfig,
}

__all__ = [
    "ALGORITHMS", "DTYPES", "GROUP_ESTIMATORS", "KL_PLACEMENTS", "LR_SCHEDULERS", "PRESETS", "TRACKERS",
    "DPOConfig", "DataConfig", "ModelConfig", "RLConfig", "RewardConfig", "SFTConfig", "TrainConfig",
    "check_choice", "closest_name",
]
