"""Online RL settings (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++, REINFORCE++-baseline, PPO) and the
presets of DESIGN.md that fill them."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmrl.config.base import TrainConfig, _help, check_choice, check_ranges

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
    kl_estimator=None,  # None = the estimator of the placement (KL_ESTIMATOR_FOR)
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
# The estimator a KL term gets when neither the preset nor the recipe names one for its placement:
# in the reward, k1 (the unbiased per-token log-ratio, as PPO-RLHF and REINFORCE++ use it); in the
# loss, k3 (TRL's and verl's low-variance choice). k1 is never put in the loss: see _check_kl.
KL_ESTIMATOR_FOR = {"reward": "k1", "loss": "k3"}

# The online numeric settings: (kind, low, high, what the field does); see check_ranges.
ONLINE_RANGES = {
    "num_generations": (int, 1, None, "completions per prompt"),
    "max_prompt_length": (int, 1, None, "prompt tokens kept (the last ones)"),
    "max_completion_length": (int, 1, None, "most tokens generated per completion"),
    "top_k": (int, 0, None, "sample from the k likeliest tokens; 0 = off"),
    "num_mini_batches": (int, 1, None, "optimizer steps per rollout and iteration"),
    "num_iterations": (int, 1, None, "passes over each rollout"),
    "max_gen_batches": (int, 1, None, "most prompt batches generated to fill one rollout"),
    "gamma": (float, 0.0, 1.0, "discount factor"),
    "lam": (float, 0.0, 1.0, "GAE lambda"),
    "overlong_penalty_factor": (float, 0.0, None, "soft overlong punishment; 0 = off"),
    "vf_coef": (float, 0.0, None, "weight of the value loss"),
    "cliprange_value": (float, 0.0, None, "clip range of the value loss"),
    "value_learning_rate": (float, 0.0, None, "the critic's learning rate"),
    "kl_horizon": (int, 1, None, "adaptive KL controller horizon"),
    "missing_eos_penalty": (float, None, None, "subtracted from completions without EOS"),
    "log_completions_steps": (int, 0, None, "write sample completions every N steps; 0 = never"),
}


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

    # the generation engine (TRL's names): llmrl's own loop, or vLLM beside the trainer
    use_vllm: bool = field(
        default=False,
        metadata=_help("Sample rollouts (and evaluation) with vLLM, colocated in each training process, its weights "
                       "reloaded from the policy before every rollout (pip install 'llmrl[vllm]'). false = llmrl's "
                       "own KV-cache loop over the policy, exactly on-policy."),
    )
    vllm_mode: str = field(
        default="colocate", metadata=_help("Where vLLM runs: colocate, inside each training process (llmrl's only mode).")
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata=_help("Share of the GPU's memory vLLM takes for its weights and KV cache (CUDA).")
    )
    vllm_enable_sleep_mode: bool = field(
        default=False,
        metadata=_help("Between generate calls, park vLLM's weights in CPU memory and free its KV cache, so the "
                       "update has that GPU memory (CUDA; costs a copy each way)."),
    )
    vllm_max_model_length: int | None = field(
        default=None, metadata=_help("vLLM's longest sequence; unset = max_prompt_length + max_completion_length.")
    )
    vllm_model_impl: str = field(
        default="vllm", metadata=_help("vLLM's own model code (vllm) or transformers' through vLLM (transformers).")
    )
    vllm_importance_sampling_correction: bool = field(
        default=True,
        metadata=_help("Weight each sampled token's policy loss by pi_old / pi_vllm, bounded (vLLM's samples are "
                       "slightly off-policy: its own kernels and weight copy). Costs one log-prob pass per rollout."),
    )
    vllm_importance_sampling_mode: str = field(
        default="sequence_mask",
        metadata=_help("token_truncate / sequence_truncate clamp the ratio into [clip_min, clip_max]; token_mask / "
                       "sequence_mask drop tokens (sequences) whose ratio is outside. sequence_*: one ratio per "
                       "completion, the product of its tokens'."),
    )
    vllm_importance_sampling_clip_min: float | None = field(
        default=None, metadata=_help("Lower bound of the importance ratio; None = none.")
    )
    vllm_importance_sampling_clip_max: float | None = field(
        default=3.0, metadata=_help("Upper bound of the importance ratio; None = none.")
    )

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
    kl_estimator: str | None = field(
        default=None,
        metadata=_preset("k1, k2 or k3. Unset, with kl_placement changed from the preset's: k3 in the loss, k1 in the "
                         "reward. k1 in the loss is refused (its expected gradient is zero)."),
    )
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
    vf_coef: float = field(
        default=0.1,
        metadata=_help("Weight of the value loss in the shared backward. The critic has its own AdamW, which all but "
                       "undoes a constant scale of its gradient: its step size is value_learning_rate; vf_coef "
                       "matters through the critic's gradient clipping (max_grad_norm)."),
    )
    cliprange_value: float = field(default=0.2, metadata=_help("Clip range of the value loss around the old values."))
    value_model_name_or_path: str | None = field(
        default=None, metadata=_help("Initial critic weights; unset = the reward model if any, else the policy.")
    )
    value_learning_rate: float | None = field(default=None, metadata=_help("Critic learning rate; unset = learning_rate."))
    share_critic_base: bool | None = field(
        default=None,
        metadata=_help("With LoRA, train the critic as a second adapter and a value head on the policy's frozen base "
                       "(one base for policy, reference and critic). None = whenever it can: use_peft and the critic "
                       "starts from the policy (no value_model_name_or_path or reward_model_name_or_path, or "
                       "value_model_name_or_path = the policy)."),
    )
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
    disable_dropout: bool = field(
        default=True,
        metadata=_help("Turn off every dropout of the policy, reference and critic (LoRA's lora_dropout included), so "
                       "that rollout, old, reference and new log-probs of one sequence agree and the first update's "
                       "ratio is exactly 1 (TRL's name)."),
    )

    def __post_init__(self):
        check_choice("algorithm", "algorithm", self.algorithm, PRESETS)
        preset = PRESETS[self.algorithm]
        if self.kl_estimator is None and self.kl_placement not in (None, preset["kl_placement"]):
            # The KL moved to another place without naming an estimator: the preset's estimator was
            # chosen for its own placement, so take the one for the new place.
            self.kl_estimator = KL_ESTIMATOR_FOR.get(self.kl_placement)
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.kl_estimator is None:
            self.kl_estimator = KL_ESTIMATOR_FOR.get(self.kl_placement)
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.overlong_buffer_len is None:
            self.overlong_buffer_len = self.max_completion_length // 5
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        super().__post_init__()
        self._validate()

    def _validate(self):
        from llmrl.algos import (
            ADVANTAGE_ESTIMATORS,
            KL_ESTIMATORS,
            LOSS_AGG_MODES,
            POLICY_LOSSES,
            REWARD_SCALES,
        )

        where = f"algorithm {self.algorithm!r}"
        self._check_vllm(where)
        check_choice(where, "advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        check_choice(where, "policy_loss", self.policy_loss, POLICY_LOSSES)
        check_choice(where, "loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        check_choice(where, "kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice(where, "kl_placement", self.kl_placement, KL_PLACEMENTS)
        check_choice(where, "scale_rewards", self.scale_rewards, REWARD_SCALES)
        check_ranges(where, self, ONLINE_RANGES)
        if not isinstance(self.reward_funcs, (list, tuple)) or not all(isinstance(spec, str) for spec in self.reward_funcs):
            raise ValueError(f"reward_funcs={self.reward_funcs!r} is not valid: it must be a list of reward names (e.g. "
                             "[accuracy]) or 'package.module:function' strings; functions themselves go to "
                             "RLTrainer(reward_funcs=...).")
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
        if self.uses_kl and self.kl_placement == "loss" and self.kl_estimator == "k1":
            raise ValueError(
                "kl_estimator: k1 with kl_placement: loss: k1 is log pi - log pi_ref, whose gradient is grad log pi, "
                "and that has expectation zero over tokens sampled from pi, so in the loss it only adds noise and "
                "never pulls toward the reference. Use kl_estimator: k3 (TRL, verl) or k2 (the exact gradient of "
                "the reverse KL) in the loss, or kl_placement: reward for k1."
            )
        if self.kl_target is not None and (self.kl_target <= 0 or self.beta == 0):
            raise ValueError(
                f"kl_target={self.kl_target} turns on the adaptive KL controller, which scales beta up or down: it "
                f"needs kl_target > 0 and a starting beta > 0 (got beta={self.beta})."
            )
        if self.share_critic_base and self.advantage_estimator != "gae":
            raise ValueError(
                f"share_critic_base: true, but advantage_estimator {self.advantage_estimator!r} uses no critic (only "
                "gae does, as in algorithm: ppo). Remove share_critic_base."
            )
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
        from llmrl.rewards import resolve_reward_func
        from llmrl.rewards.model import is_reward_model_spec

        for spec in self.reward_funcs:
            if ":" not in spec and not is_reward_model_spec(spec):  # built-in names are checked now; user functions
                resolve_reward_func(spec)  # import in the trainer, reward models load there
        n_rewards = len(self.reward_funcs) + (self.reward_model_name_or_path is not None)
        # With no reward named here, the functions come in code (RLTrainer(reward_funcs=...)), which checks.
        if self.reward_weights is not None and n_rewards and len(self.reward_weights) != n_rewards:
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values but there are {n_rewards} rewards "
                f"({self.reward_funcs}{' + reward model' if self.reward_model_name_or_path else ''}): give one each."
            )

    def _check_vllm(self, where: str):
        from llmrl.algos import SAMPLER_CORRECTIONS

        if self.vllm_mode == "server":
            raise ValueError("vllm_mode: server (TRL's `trl vllm-serve` beside the trainer) is not in llmrl: vLLM runs "
                             "colocated in each training process. Set vllm_mode: colocate.")
        check_choice(where, "vllm_mode", self.vllm_mode, ["colocate"])
        check_choice(where, "vllm_model_impl", self.vllm_model_impl, ["vllm", "transformers", "auto"])
        check_choice(where, "vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, SAMPLER_CORRECTIONS)
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}.")
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if low is not None and high is not None and low > high:
            raise ValueError(f"vllm_importance_sampling_clip_min={low} is above vllm_importance_sampling_clip_max={high}.")
        if self.vllm_max_model_length is not None and self.vllm_max_model_length < self.max_completion_length + 1:
            raise ValueError(f"vllm_max_model_length={self.vllm_max_model_length} leaves no room for a prompt and "
                             f"max_completion_length={self.max_completion_length} tokens; raise it or leave it unset.")

    @property
    def uses_kl(self) -> bool:
        return self.beta > 0 or self.kl_target is not None
