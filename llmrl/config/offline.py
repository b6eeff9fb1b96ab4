"""Settings of the offline trainers: DPO, reward model, SFT."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmrl.config.base import TrainConfig, _help, check_choice


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation and its loss variants, on prompt/chosen/rejected rows."""

    algorithm: str = field(default="dpo", metadata=_help("Always 'dpo' for this trainer."))
    loss_type: str = field(default="sigmoid", metadata=_help("Preference loss: sigmoid (DPO), ipo, hinge or robust."))
    beta: float = field(default=0.1, metadata=_help("Strength of the implicit KL to the reference."))
    label_smoothing: float = field(
        default=0.0,
        metadata=_help("Probability that a label is flipped: robust DPO, and cDPO for sigmoid (which TRL 1.16 does not "
                       "smooth); ipo and hinge ignore it."),
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata=_help("Compute the reference log-probs once before training, then free the reference.")
    )
    max_prompt_length: int | None = field(
        default=None, metadata=_help("Prompts longer than this keep their last tokens; None = half of max_length."))
    max_length: int = field(default=1024, metadata=_help("Most tokens of prompt + answer; answers are cut at the end."))
    average_log_prob: bool | None = field(
        default=None,
        metadata=_help("Average each answer's log-probs over its tokens in the loss instead of summing them (IPO's "
                       "length normalisation, as TRL and the IPO authors use it); None = on for ipo only. The logged "
                       "rewards stay on summed log-probs."),
    )
    disable_dropout: bool = field(
        default=True,
        metadata=_help("Turn off every dropout of the policy and reference (LoRA's lora_dropout included), so the "
                       "policy and reference log-probs of an untrained policy are equal and the first loss is ln 2 "
                       "(TRL's name)."),
    )

    def __post_init__(self):
        from llmrl.algos import PREFERENCE_LOSSES

        check_choice("dpo", "loss_type", self.loss_type, PREFERENCE_LOSSES)
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0 for DPO, got {self.beta}.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} must be positive and below max_length="
                             f"{self.max_length}, so that every answer keeps at least one token after its prompt.")
        if self.average_log_prob is None:
            self.average_log_prob = self.loss_type == "ipo"
        super().__post_init__()


@dataclass
class RewardConfig(TrainConfig):
    """Bradley-Terry reward-model training on prompt/chosen/rejected rows."""

    algorithm: str = field(default="reward_model", metadata=_help("Always 'reward_model' for this trainer."))
    learning_rate: float = field(default=1e-5, metadata=_help("Peak learning rate of AdamW."))
    max_length: int = field(
        default=1024,
        metadata=_help("Most tokens of prompt + answer; a pair whose chosen or rejected side is longer is dropped "
                       "(a cut answer would be scored at a token that is not its end)."),
    )
    center_rewards_coefficient: float | None = field(
        default=None, metadata=_help("Weight of the penalty (r_c + r_r)^2 that keeps rewards centred at 0.")
    )


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on prompt/completion or chat rows, the warm-start before RL."""

    algorithm: str = field(default="sft", metadata=_help("Always 'sft' for this trainer."))
    learning_rate: float = field(default=2e-5, metadata=_help("Peak learning rate of AdamW."))
    max_length: int = field(default=1024, metadata=_help("Most tokens per example (longer ones keep their start); "
                                                         "with packing, the length of a packed row."))
    completion_only_loss: bool = field(
        default=True,
        metadata=_help("Loss on the completion of prompt/completion rows and on the assistant turns of 'messages' "
                       "rows only; plain 'text' rows train on every token."),
    )
    packing: bool = field(default=False, metadata=_help("Pack several examples into one row of max_length tokens "
                                                        "(each still attends only to itself)."))
    neftune_noise_alpha: float | None = field(default=None, metadata=_help("NEFTune embedding noise; None = off."))
