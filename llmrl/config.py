"""Every setting of llmrl, and every default, in one place.

A recipe is one flat YAML mapping. Its keys are split across three dataclasses: `ModelConfig`
(what to load and how), `DataConfig` (where the rows come from) and the trainer's own config
(`RLConfig`, `DPOConfig`, `RewardConfig` or `SFTConfig`, picked by `algorithm`).

An algorithm name is a *preset*: a bundle of settings from `PRESETS`. Fields a preset controls
default to `None`, meaning "not set"; `__post_init__` fills each unset one from the preset, so
the precedence is field default < preset < recipe YAML < command-line flag.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


def closest_name(name: str, valid) -> str:
    """The valid name closest to `name`, for 'did you mean' messages (empty if none is close)."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return match[0] if match else ""


def check_choice(owner: str, name: str, value, valid) -> None:
    if value not in valid:
        hint = closest_name(str(value), [str(v) for v in valid])
        hint = f" Did you mean {hint!r}?" if hint else ""
        raise ValueError(f"{owner}.{name}={value!r} is not valid; choose one of {sorted(map(str, valid))}.{hint}")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """What model to load, in what precision, and whether to train a LoRA adapter on it."""

    model_name_or_path: str | None = field(
        default=None, metadata=_help("Hub name or local folder of the policy (a causal LM).")
    )
    model_revision: str = field(default="main", metadata=_help("Hub revision (branch, tag or commit)."))
    tokenizer_name_or_path: str | None = field(
        default=None, metadata=_help("Tokenizer to load; defaults to model_name_or_path.")
    )
    dtype: str = field(
        default="auto",
        metadata=_help(
            "Weights dtype: auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16, float16.",
            choices=list(DTYPES),
        ),
    )
    attn_implementation: str | None = field(
        default=None, metadata=_help("Attention kernel: eager, sdpa, flash_attention_2; None lets transformers pick.")
    )
    trust_remote_code: bool = field(
        default=False, metadata=_help("Run modelling code shipped with the checkpoint. Off unless you trust it.")
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("Recompute activations in the backward pass: less memory, ~30% slower.")
    )
    use_peft: bool = field(default=False, metadata=_help("Train a LoRA adapter instead of all weights."))
    lora_r: int = field(default=16, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA scaling numerator (scale = lora_alpha / lora_r)."))
    lora_dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA input."))
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata=_help("Modules to adapt: 'all-linear' or a list of names (e.g. q_proj v_proj). None = all-linear."),
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata=_help("Modules trained in full and saved with the adapter (e.g. score for a reward model).")
    )
    load_in_4bit: bool = field(
        default=False, metadata=_help("Load the base weights in 4 bit (bitsandbytes, CUDA only); use with use_peft (QLoRA).")
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata=_help("4-bit quantisation type.", choices=["nf4", "fp4"]))
    use_bnb_nested_quant: bool = field(default=False, metadata=_help("Quantise the 4-bit quantisation constants too."))

    def __post_init__(self):
        check_choice("model", "dtype", self.dtype, DTYPES)
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        if self.load_in_4bit and not self.use_peft:
            raise ValueError(
                "load_in_4bit: true needs use_peft: true: 4-bit weights cannot be trained directly, "
                "only a LoRA adapter on top of them (QLoRA). Set use_peft: true in the recipe."
            )
        if self.lora_r <= 0:
            raise ValueError(f"lora_r must be a positive integer, got {self.lora_r}.")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the training and evaluation rows come from (TRL's column conventions)."""

    dataset_name: str | None = field(
        default=None,
        metadata=_help("Hub name, local dataset folder, or a .json/.jsonl/.parquet/.csv file (or a folder of them)."),
    )
    dataset_config: str | None = field(default=None, metadata=_help("Dataset configuration (subset) name."))
    dataset_train_split: str = field(default="train", metadata=_help("Split to train on."))
    dataset_test_split: str | None = field(
        default=None, metadata=_help("Split of dataset_name to evaluate on; None = no evaluation split.")
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata=_help("A separate source for evaluation rows (same forms as dataset_name); uses its 'train' split "
                       "for a single file, else dataset_test_split."),
    )
    max_train_samples: int | None = field(default=None, metadata=_help("Keep only the first N training rows."))
    max_eval_samples: int | None = field(default=None, metadata=_help("Keep only the first N evaluation rows."))


# --------------------------------------------------------------------------------------------
# Training: what every trainer shares
# --------------------------------------------------------------------------------------------

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
TRACKERS = ("none", "tensorboard", "wandb", "trackio")


@dataclass
class TrainConfig:
    """Settings every trainer shares: optimisation, batching, logging, checkpoints."""

    algorithm: str = field(default="grpo", metadata=_help("Preset name; picks the trainer (see PRESETS)."))
    output_dir: str = field(default="outputs/llmrl", metadata=_help("Where checkpoints, logs and the model go."))
    run_name: str | None = field(default=None, metadata=_help("Name shown by trackers; defaults to output_dir's name."))
    seed: int = field(default=42, metadata=_help("Seed for python, numpy, torch and the data order."))
    learning_rate: float = field(default=1e-6, metadata=_help("Peak learning rate of AdamW."))
    lr_scheduler_type: str = field(
        default="linear", metadata=_help("Learning-rate schedule after warmup.", choices=list(LR_SCHEDULERS))
    )
    warmup_ratio: float = field(default=0.0, metadata=_help("Fraction of steps spent warming up (if warmup_steps is 0)."))
    warmup_steps: int = field(default=0, metadata=_help("Warmup steps; overrides warmup_ratio when > 0."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Clip the gradient norm to this; 0 = no clipping."))
    num_train_epochs: float = field(default=1.0, metadata=_help("Passes over the training prompts/rows."))
    max_steps: int = field(default=-1, metadata=_help("Optimizer steps to run; overrides num_train_epochs when > 0."))
    per_device_train_batch_size: int = field(
        default=8, metadata=_help("Sequences per micro-batch per process (completions for online RL, pairs for DPO).")
    )
    per_device_eval_batch_size: int = field(default=8, metadata=_help("Sequences per evaluation batch per process."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    logging_steps: int = field(default=1, metadata=_help("Log metrics every N optimizer steps."))
    eval_steps: int = field(default=0, metadata=_help("Evaluate every N optimizer steps; 0 = only at the end."))
    save_steps: int = field(default=500, metadata=_help("Write checkpoint-<step> every N steps; 0 = only the final model."))
    save_total_limit: int | None = field(default=None, metadata=_help("Keep only the newest N checkpoints."))
    resume_from_checkpoint: str | None = field(
        default=None, metadata=_help("'true' = resume from the newest checkpoint in output_dir, or a checkpoint path.")
    )
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata=_help(f"Trackers to log to: {', '.join(TRACKERS)}."),
    )
    logging_dir: str | None = field(default=None, metadata=_help("Tracker log folder; defaults to output_dir/runs."))
    disable_tqdm: bool = field(default=False, metadata=_help("Hide the progress bar."))

    def __post_init__(self):
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        for tracker in self.report_to:
            check_choice(self.algorithm, "report_to", tracker, TRACKERS)
        check_choice(self.algorithm, "lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.run_name is None:
            self.run_name = self.output_dir.rstrip("/").split("/")[-1]


# --------------------------------------------------------------------------------------------
# Online RL: the presets of DESIGN.md, and the config they fill
# --------------------------------------------------------------------------------------------

# The values every online preset starts from; each preset then states only what differs.
_ONLINE_BASE = dict(
    num_generations=8,
    advantage_estimator="grpo",
    scale_rewards="group",
    gamma=1.0,
    lam=1.0,
    whiten_advantages=False,
    policy_loss="ppo_clip",
    epsilon=0.2,
    epsilon_high=None,  # None = epsilon (symmetric clip)
    loss_agg_mode="token_mean",
    beta=0.0,
    kl_estimator="k1",
    kl_placement="loss",
    dynamic_sampling=False,
    overlong_penalty_factor=0.0,
)

PRESETS: dict[str, dict] = {
    "ppo": {**_ONLINE_BASE, "num_generations": 1, "advantage_estimator": "gae", "lam": 0.95,
            "whiten_advantages": True, "beta": 0.05, "kl_estimator": "k1", "kl_placement": "reward"},
    "grpo": {**_ONLINE_BASE, "loss_agg_mode": "seq_mean_token_mean", "beta": 0.04, "kl_estimator": "k3"},
    "dr_grpo": {**_ONLINE_BASE, "scale_rewards": "none", "loss_agg_mode": "seq_mean_token_sum_norm"},
    "dapo": {**_ONLINE_BASE, "epsilon_high": 0.28, "dynamic_sampling": True, "overlong_penalty_factor": 1.0},
    # REINFORCE++ (2501.03262): KL per token in the reward, returns whitened over the batch.
    "reinforce_pp": {**_ONLINE_BASE, "advantage_estimator": "reinforce_pp", "beta": 0.01,
                     "kl_estimator": "k1", "kl_placement": "reward"},
    "reinforce_pp_baseline": {**_ONLINE_BASE, "advantage_estimator": "reinforce_pp_baseline", "beta": 0.01,
                              "kl_estimator": "k2", "kl_placement": "loss"},
    "rloo": {**_ONLINE_BASE, "advantage_estimator": "rloo", "beta": 0.05, "kl_estimator": "k1",
             "kl_placement": "reward"},
}

GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_pp_baseline")
KL_PLACEMENTS = ("loss", "reward")


def _preset(text: str, **extra) -> dict:
    return _help(f"{text} Unset = the algorithm preset's value.", **extra)


@dataclass
class RLConfig(TrainConfig):
    """Online RL (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++, REINFORCE++-baseline, PPO).

    Fields whose default is `None` are filled from `PRESETS[algorithm]` when left unset.
    """

    algorithm: str = field(default="grpo", metadata=_help("Online preset.", choices=list(PRESETS)))

    # generation
    num_generations: int | None = field(default=None, metadata=_preset("Completions sampled per prompt."))
    max_prompt_length: int = field(default=512, metadata=_help("Prompts longer than this keep their last tokens."))
    max_completion_length: int = field(default=256, metadata=_help("Most tokens generated per completion."))
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature (also applied to the logprobs)."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass; 1.0 = off."))
    top_k: int = field(default=0, metadata=_help("Sample from the k likeliest tokens; 0 = off."))
    num_mini_batches: int = field(
        default=1,
        metadata=_help("Optimizer steps per rollout and iteration. A rollout holds per_device_train_batch_size x "
                       "gradient_accumulation_steps x num_mini_batches completions per process."),
    )
    num_iterations: int = field(default=1, metadata=_help("Passes (PPO epochs) over each rollout."))

    # rewards
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata=_help("Reward functions: built-in names (llmrl.rewards.REWARD_FUNCTIONS) or 'package.module:function'."),
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata=_help("One weight per reward function, then one for the reward model if any; None = all 1.0."),
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata=_help("A sequence-classification reward model (one label) to score completions.")
    )

    # advantages and losses (preset-controlled)
    advantage_estimator: str | None = field(default=None, metadata=_preset("gae, grpo, rloo, reinforce_pp or reinforce_pp_baseline."))
    scale_rewards: str | None = field(
        default=None, metadata=_preset("GRPO scaling: divide by the group std, the batch std, or none (Dr. GRPO).")
    )
    gamma: float | None = field(default=None, metadata=_preset("Discount factor."))
    lam: float | None = field(default=None, metadata=_preset("GAE lambda."))
    whiten_advantages: bool | None = field(default=None, metadata=_preset("Whiten advantages over the batch (PPO)."))
    policy_loss: str | None = field(default=None, metadata=_preset("ppo_clip, vanilla_pg or gspo."))
    epsilon: float | None = field(default=None, metadata=_preset("Lower clip range: ratio >= 1 - epsilon."))
    epsilon_high: float | None = field(
        default=None, metadata=_preset("Upper clip range: ratio <= 1 + epsilon_high (DAPO clip-higher); default epsilon.")
    )
    dual_clip: float | None = field(
        default=None, metadata=_help("Dual-clip bound c > 1 on the loss of negative advantages; None = off.")
    )
    loss_agg_mode: str | None = field(
        default=None,
        metadata=_preset("token_mean, seq_mean_token_mean, seq_mean_token_sum or seq_mean_token_sum_norm."),
    )
    beta: float | None = field(default=None, metadata=_preset("KL coefficient; 0 = no KL and no reference model."))
    kl_estimator: str | None = field(default=None, metadata=_preset("k1, k2 or k3."))
    kl_placement: str | None = field(default=None, metadata=_preset("Where the KL goes: 'reward' (per token) or 'loss'."))

    # DAPO
    dynamic_sampling: bool | None = field(
        default=None, metadata=_preset("Drop groups whose rewards are all equal; generate more until the batch is full.")
    )
    dynamic_sampling_metric: str = field(
        default="reward", metadata=_help("Per-completion metric whose flat groups are dropped (a reward name or 'reward').")
    )
    max_gen_batches: int = field(default=10, metadata=_help("Most prompt batches generated to fill one rollout."))
    overlong_penalty_factor: float | None = field(
        default=None, metadata=_preset("Soft overlong punishment at max_completion_length; 0 = off.")
    )
    overlong_buffer_len: int | None = field(
        default=None,
        metadata=_help("Length of the soft-punishment zone before max_completion_length; "
                       "unset = max_completion_length // 5 (the paper's 4096 of 20480)."),
    )

    # PPO critic
    vf_coef: float = field(default=0.1, metadata=_help("Weight of the value loss."))
    cliprange_value: float = field(default=0.2, metadata=_help("Clip range of the value loss around the old values."))
    value_model_name_or_path: str | None = field(
        default=None, metadata=_help("Initial critic weights; unset = the reward model if any, else the policy.")
    )
    value_learning_rate: float | None = field(default=None, metadata=_help("Critic learning rate; unset = learning_rate."))
    kl_target: float | None = field(default=None, metadata=_help("Adaptive KL controller target; None = fixed beta."))
    kl_horizon: int = field(default=10000, metadata=_help("Adaptive KL controller horizon (samples)."))
    missing_eos_penalty: float | None = field(
        default=None, metadata=_help("Subtracted from the reward of completions that end without EOS.")
    )

    # logging and evaluation
    log_completions_steps: int = field(
        default=10, metadata=_help("Write sample completions to output_dir/completions.jsonl every N steps; 0 = never.")
    )
    eval_do_sample: bool = field(default=False, metadata=_help("Sample at evaluation (else greedy decoding)."))

    def __post_init__(self):
        check_choice("algorithm", "algorithm", self.algorithm, PRESETS)
        for name, value in PRESETS[self.algorithm].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.overlong_buffer_len is None:
            self.overlong_buffer_len = self.max_completion_length // 5
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        super().__post_init__()
        self._validate()

    def _validate(self):
        from llmrl.algos import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGG_MODES, POLICY_LOSSES, REWARD_SCALES

        where = f"algorithm {self.algorithm!r}"
        check_choice(where, "advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        check_choice(where, "policy_loss", self.policy_loss, POLICY_LOSSES)
        check_choice(where, "loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        check_choice(where, "kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice(where, "kl_placement", self.kl_placement, KL_PLACEMENTS)
        check_choice(where, "scale_rewards", self.scale_rewards, REWARD_SCALES)
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be at least 1, got {self.num_generations}.")
        if self.num_generations < 2 and self.advantage_estimator in GROUP_ESTIMATORS:
            raise ValueError(
                f"num_generations={self.num_generations} with advantage_estimator {self.advantage_estimator!r}: this "
                "estimator's baseline compares completions of the same prompt, so each prompt needs at least 2. "
                "Set num_generations: 4 (or more), or pick a critic or batch estimator (gae, reinforce_pp)."
            )
        if self.num_generations < 2 and self.dynamic_sampling:
            raise ValueError(
                "dynamic_sampling drops groups whose completions all scored the same, which needs num_generations >= 2."
            )
        if self.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}.")
        if self.epsilon_high < self.epsilon:
            raise ValueError(
                f"epsilon_high={self.epsilon_high} is below epsilon={self.epsilon}: clip-higher (DAPO) widens the upper "
                "clip range to let unlikely tokens grow; a narrower upper range is almost certainly a typo."
            )
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(
                f"dual_clip={self.dual_clip} must be > 1: it bounds the loss of negative advantages at c x advantage, "
                "above the normal clip (which sits at 1 - epsilon < 1). Use e.g. 3.0, or leave it unset."
            )
        if self.beta < 0:
            raise ValueError(f"beta (the KL coefficient) must be >= 0, got {self.beta}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (greedy decoding is eval_do_sample: false), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.overlong_penalty_factor > 0 and not 0 < self.overlong_buffer_len < self.max_completion_length:
            raise ValueError(
                f"overlong_buffer_len={self.overlong_buffer_len} must be between 1 and max_completion_length-1 "
                f"({self.max_completion_length - 1}) for the soft overlong punishment."
            )
        rollout = self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches
        if rollout % self.num_generations:
            raise ValueError(
                f"A rollout holds per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches = "
                f"{rollout} completions per process, which is not a multiple of num_generations={self.num_generations}: "
                "every prompt's group must fit whole. Change one of them."
            )
        n_rewards = len(self.reward_funcs) + (self.reward_model_name_or_path is not None)
        if self.reward_weights is not None and len(self.reward_weights) != n_rewards:
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values but there are {n_rewards} rewards "
                f"({self.reward_funcs}{' + reward model' if self.reward_model_name_or_path else ''}): give one each."
            )

    @property
    def uses_kl(self) -> bool:
        return self.beta > 0 or self.kl_target is not None


# --------------------------------------------------------------------------------------------
# Offline trainers
# --------------------------------------------------------------------------------------------


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation and its loss variants, on prompt/chosen/rejected rows."""

    algorithm: str = field(default="dpo", metadata=_help("Always 'dpo' for this trainer."))
    loss_type: str = field(default="sigmoid", metadata=_help("Preference loss: sigmoid (DPO), ipo, hinge or robust."))
    beta: float = field(default=0.1, metadata=_help("Strength of the implicit KL to the reference."))
    label_smoothing: float = field(default=0.0, metadata=_help("Probability that a label is flipped (robust / cDPO)."))
    precompute_ref_log_probs: bool = field(
        default=False, metadata=_help("Compute the reference log-probs once before training, then free the reference.")
    )
    max_prompt_length: int = field(default=512, metadata=_help("Prompts longer than this keep their last tokens."))
    max_length: int = field(default=1024, metadata=_help("Most tokens of prompt + answer; answers are cut at the end."))

    def __post_init__(self):
        from llmrl.algos import PREFERENCE_LOSSES

        check_choice("dpo", "loss_type", self.loss_type, PREFERENCE_LOSSES)
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0 for DPO, got {self.beta}.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        super().__post_init__()


@dataclass
class RewardConfig(TrainConfig):
    """Bradley-Terry reward-model training on prompt/chosen/rejected rows."""

    algorithm: str = field(default="reward_model", metadata=_help("Always 'reward_model' for this trainer."))
    learning_rate: float = field(default=1e-5, metadata=_help("Peak learning rate of AdamW."))
    max_length: int = field(default=1024, metadata=_help("Most tokens of prompt + answer; answers are cut at the end."))
    center_rewards_coefficient: float | None = field(
        default=None, metadata=_help("Weight of the penalty (r_c + r_r)^2 that keeps rewards centred at 0.")
    )


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on prompt/completion or chat rows, the warm-start before RL."""

    algorithm: str = field(default="sft", metadata=_help("Always 'sft' for this trainer."))
    learning_rate: float = field(default=2e-5, metadata=_help("Peak learning rate of AdamW."))
    max_length: int = field(default=1024, metadata=_help("Most tokens per example."))
    completion_only_loss: bool = field(default=True, metadata=_help("Loss on completion (assistant) tokens only."))
    packing: bool = field(default=False, metadata=_help("Pack several examples into one sequence."))
    neftune_noise_alpha: float | None = field(default=None, metadata=_help("NEFTune embedding noise; None = off."))


# Which config (and so which trainer) each algorithm name selects.
ALGORITHMS: dict[str, type[TrainConfig]] = {
    **{name: RLConfig for name in PRESETS},
    "dpo": DPOConfig,
    "reward_model": RewardConfig,
    "sft": SFTConfig,
}
