"""TRL's config fields in an llmrl recipe or constructor: each accepted with TRL's meaning, or
refused with what llmrl does instead.

A TRL user's `GRPOConfig` / `DPOConfig` / `SFTConfig` / `RewardConfig` settings (TrainingArguments
included) fall in three kinds here:

- llmrl has a field of the same name and meaning: it is used as it is (a few take TRL's values too,
  e.g. `scale_rewards: true` is "group");
- `RENAMED`: llmrl names it differently, and the value is translated (`loss_type: dapo` ->
  `loss_agg_mode: token_mean`, `steps_per_generation` -> `num_mini_batches`, ...);
- `REFUSED` (by name or by prefix group): llmrl has no such setting. The field is accepted while it
  holds TRL's default or says "off" (None, False), since it then changes nothing; any other value
  is refused with the reason and what to use instead.

`translate(config_class, values)` applies this to a recipe's or a constructor's values and reports
every problem at once. `python -m llmrl.config.trl_names` writes the table in docs/trl_fields.md;
tests/test_trl_names.py keeps it in sync with the installed TRL's dataclasses.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

TRL_CLASSES = ("GRPOConfig", "DPOConfig", "SFTConfig", "RewardConfig")


class TRLFieldError(TypeError):
    """TRL fields llmrl cannot take as given; the message lists each one with what to do instead."""


@dataclasses.dataclass(frozen=True)
class Renamed:
    """A TRL field llmrl names otherwise: `convert(value, values)` -> {llmrl field: value}, or a
    string saying why this value cannot be taken. `meaning` is the table's text."""

    convert: Callable
    meaning: str
    wins: bool = False  # its value replaces the field it sets (save_strategy: "no" with save_steps: 100 saves none)


def _to(field: str, mapping: dict | None = None):
    def convert(value, values):
        if mapping is None:
            return {field: value}
        if value not in mapping:
            return f"llmrl takes {sorted(map(str, mapping))} here (as {field}), not {value!r}"
        return {field: mapping[value]}
    return convert


def _steps_per_generation(value, values):
    accumulation = values.get("gradient_accumulation_steps", 1)
    if value is None:
        return {}
    if int(value) % int(accumulation):
        return (f"steps_per_generation={value} must be a multiple of gradient_accumulation_steps={accumulation}: "
                "llmrl makes num_mini_batches = steps_per_generation / gradient_accumulation_steps optimizer steps "
                "from each rollout")
    return {"num_mini_batches": int(value) // int(accumulation)}


def _strategy(field: str):
    """save_strategy / eval_strategy: "no" turns the periodic one off, "steps" keeps `field`."""
    def convert(value, values):
        if value in ("no", None, False):  # YAML reads a bare no as false
            return {field: 0}
        if value == "steps":
            return {}
        return f"llmrl saves and evaluates every N steps ({field}: N), or not at all ({field}: 0); not by {value!r}"
    return convert


def _log_completions(value, values):
    return {"log_completions_steps": values.get("logging_steps", 10) if value else 0}


MODEL_INIT_KEYS = {"dtype": "dtype", "torch_dtype": "dtype", "attn_implementation": "attn_implementation",
                   "trust_remote_code": "trust_remote_code", "revision": "model_revision"}


def _model_init_kwargs(value, values):
    if not value:
        return {}
    unknown = sorted(set(value) - set(MODEL_INIT_KEYS))
    if unknown:
        return f"llmrl loads models with the model fields {sorted(set(MODEL_INIT_KEYS.values()))}; {unknown} have none"
    return {MODEL_INIT_KEYS[key]: (str(v).replace("torch.", "") if "dtype" in key else v) for key, v in value.items()}


def _precision(name: str):
    """bf16 / fp16: true -> `mixed_precision` (autocast over float32 weights, TRL's meaning); false
    leaves it to the launcher (TRL's bf16 default is None: "if the machine supports it")."""
    def convert(value, values):
        if not value:
            return {}
        other = "fp16" if name == "bf16" else "bf16"
        if values.get(other):
            return "bf16 and fp16 are both true; choose one"
        return {"mixed_precision": name}
    return convert


def _importance_sampling_cap(value, values):
    return {} if value is None else {"vllm_importance_sampling_clip_max": value}


def _assistant_only_loss(value, values):
    if not value:
        return {}
    return {"completion_only_loss": True}


# TRL's GRPO loss types -> llmrl's loss aggregation modes (llmrl.algos.aggregate).
GRPO_LOSS_TYPES = {"dapo": "token_mean", "bnpo": "token_mean", "grpo": "seq_mean_token_mean",
                   "dr_grpo": "seq_mean_token_sum_norm"}

RENAMED: dict[str, Renamed] = {
    "loss_type": Renamed(_to("loss_agg_mode", GRPO_LOSS_TYPES),
                         "GRPO: `loss_agg_mode` (dapo, bnpo -> token_mean; grpo -> seq_mean_token_mean; dr_grpo -> "
                         "seq_mean_token_sum_norm). DPO, SFT: the same name"),
    "steps_per_generation": Renamed(_steps_per_generation,
                                    "`num_mini_batches` = steps_per_generation / gradient_accumulation_steps"),
    "delta": Renamed(_to("dual_clip"), "`dual_clip`: the ratio of a negative-advantage token is capped at delta"),
    "bf16": Renamed(_precision("bf16"), "`mixed_precision: bf16` (autocast over float32 weights) when true"),
    "fp16": Renamed(_precision("fp16"), "`mixed_precision: fp16` (CUDA only) when true"),
    "activation_checkpointing": Renamed(_to("gradient_checkpointing"), "`gradient_checkpointing` (a model field)"),
    "save_strategy": Renamed(_strategy("save_steps"), '"no" -> `save_steps: 0`; "steps" -> `save_steps`', wins=True),
    "eval_strategy": Renamed(_strategy("eval_steps"), '"no" -> `eval_steps: 0`; "steps" -> `eval_steps`', wins=True),
    "log_completions": Renamed(_log_completions, "`log_completions_steps` (= logging_steps when true, 0 when false)"),
    "model_init_kwargs": Renamed(_model_init_kwargs, "the model fields `dtype`, `attn_implementation`, "
                                 "`trust_remote_code`, `model_revision`"),
    "vllm_importance_sampling_cap": Renamed(_importance_sampling_cap, "`vllm_importance_sampling_clip_max` (TRL's "
                                            "newer name for it)"),
    "assistant_only_loss": Renamed(_assistant_only_loss, "`completion_only_loss` (with `messages` rows: the "
                                   "assistant turns)"),
}

# Fields llmrl has under the same name that also take TRL's values.
SAME_NAME_VALUES = {"scale_rewards": {True: "group", False: "none"}}

LAUNCHER = ("processes, sharding and the backend come from the launcher: `accelerate launch --config_file "
            "recipes/accelerate/fsdp2.yaml -m llmrl train ...` (or ddp, zero2, zero3)")
VLLM = ("llmrl generates with its own KV-cache loop or, with use_vllm: true, with vLLM colocated in each training "
        "process (vllm_mode: colocate): no vLLM server, tensor parallelism or guided decoding")
HUB = "llmrl writes output_dir only; upload it with `hf upload <repo> <output_dir>`"
PRECISION = ("precision is the model's `dtype` (bfloat16 loads bf16 weights, auto picks it on a GPU) and "
             "`mixed_precision` (bf16 or fp16 autocast of every forward pass)")
OPTIMIZER = ("llmrl trains with torch.optim.AdamW (`learning_rate`, `adam_beta1`, `adam_beta2`, `adam_epsilon`, "
             "`weight_decay`) on the `lr_scheduler_type` schedule")
LOADER = "llmrl's loaders run in the training process and keep every column (reward functions read them)"
EVAL = ("llmrl evaluates every `eval_steps` steps and at the end (`eval_dataset_name`), and `llmrl eval` scores a "
        "saved model")
LOGGING = "llmrl logs every `logging_steps` steps on the main process, to stdout and `report_to`"
CHECKPOINTS = ("llmrl's checkpoints always hold the model, optimizer, schedule, RNG and data position, and a "
               "resume restores them all")
NOT_HERE = "llmrl has no such setting"

# By name, then by prefix (the first that matches); accepted while TRL's default or "off".
REFUSED: dict[str, str] = {
    **dict.fromkeys(("tf32", "bf16_full_eval", "fp16_full_eval", "cast_lm_head_to_fp32"), PRECISION),
    **dict.fromkeys(("deepspeed", "fsdp", "fsdp_config", "accelerator_config", "parallelism_config", "local_rank",
                     "use_cpu", "ds3_gather_for_generation", "average_tokens_across_devices"), LAUNCHER),
    **dict.fromkeys(("use_transformers_paged", "use_transformers_continuous_batching",
                     "transformers_continuous_batching_config", "cache_implementation", "generation_kwargs",
                     "use_cache"), VLLM),
    "generation_batch_size": ("set steps_per_generation or num_mini_batches: llmrl's rollout is "
                              "per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches per process"),
    "min_p": "llmrl samples with temperature, top_p and top_k only (the trainer's log-probs use the same)",
    "repetition_penalty": "llmrl samples with temperature, top_p and top_k only (the trainer's log-probs use the same)",
    "push_to_hub": HUB,
    **dict.fromkeys(("optim", "optim_args", "optim_target_modules", "lr_scheduler_kwargs"), OPTIMIZER),
    **dict.fromkeys(("do_train", "do_eval", "do_predict", "eval_delay", "eval_on_start", "eval_accumulation_steps",
                     "batch_eval_metrics", "eval_do_concat_batches", "eval_use_gather_object", "prediction_loss_only",
                     "include_for_metrics", "label_names", "metric_for_best_model", "greater_is_better",
                     "load_best_model_at_end", "num_generations_eval", "eval_packing"), EVAL),
    **dict.fromkeys(("logging_strategy", "logging_first_step", "log_level", "log_level_replica", "log_on_each_node",
                     "logging_nan_inf_filter", "skip_memory_metrics", "include_num_input_tokens_seen",
                     "num_completions_to_print", "log_unique_prompts", "log_multimodal", "log_completions_hub_repo",
                     "project", "trackio_bucket_id", "trackio_space_id", "trackio_static_space_id", "debug"), LOGGING),
    **dict.fromkeys(("save_only_model", "save_on_each_node", "restore_callback_states_from_checkpoint",
                     "ignore_data_skip", "enable_jit_checkpoint"), CHECKPOINTS),
    **dict.fromkeys(("remove_unused_columns", "length_column_name", "train_sampling_strategy", "data_seed",
                     "dataset_num_proc", "dataset_kwargs", "shuffle_dataset", "pad_to_multiple_of", "padding_free",
                     "dataloader_in_order"), LOADER),
    "full_determinism": "llmrl seeds python, numpy and torch from `seed`; one-process runs resume bit-exactly",
    "auto_find_batch_size": "set per_device_train_batch_size (and gradient_accumulation_steps) yourself",
    "torch_empty_cache_steps": "llmrl does not empty the CUDA cache between steps",
    "label_smoothing_factor": "DPO's `label_smoothing` is llmrl's; SFT trains on plain cross-entropy",
    "gradient_checkpointing_kwargs": "llmrl uses non-reentrant gradient checkpointing (`gradient_checkpointing`)",
    "activation_checkpointing_kwargs": "llmrl uses non-reentrant gradient checkpointing (`gradient_checkpointing`)",
    "activation_offloading": "llmrl does not offload activations; use gradient_checkpointing",
    "use_liger_kernel": "llmrl computes log-probs and entropy in chunks without a full float32 log-softmax",
    "liger_kernel_config": "llmrl computes log-probs and entropy in chunks without a full float32 log-softmax",
    "router_aux_loss_coef": "llmrl adds no mixture-of-experts router loss",
    "disable_dropout": "this trainer keeps the model's dropout as its config sets it",
    "neftune_noise_alpha": "NEFTune is a setting of SFT runs only (algorithm: sft)",
    "importance_sampling_level": "llmrl's ratios are per token (TRL's 'token'); sequence-level GSPO is not there",
    "mask_truncated_completions": "llmrl scores truncated completions; penalise them with missing_eos_penalty or "
                                  "overlong_penalty_factor",
    "chat_template_kwargs": "llmrl renders prompts with the tokenizer's chat template as it is",
    "chat_template_path": "llmrl renders with the tokenizer's own chat template; save the template into the "
                          "tokenizer folder (tokenizer_name_or_path)",
    "top_entropy_quantile": "llmrl trains on every completion token",
    "use_bias_correction_kl": "llmrl's KL estimators are k1, k2, k3 (kl_estimator), in the reward or the loss",
    "off_policy_mask_threshold": "llmrl's rollouts are on-policy (num_iterations reuses each one a set number of times)",
    "max_tool_calling_iterations": "llmrl has no tool calling in rollouts",
    "multi_objective_aggregation": "llmrl sums the rewards with reward_weights",
    "truncation_mode": "llmrl keeps a preference prompt's last max_prompt_length tokens and each answer's start "
                       "(TRL's keep_start); SFT keeps each example's start",
    "packing_strategy": "llmrl packs with TRL's best-fit decreasing (packing: true)",
    "dataset_text_field": "SFT reads the 'text' column; rename yours to 'text'",
    "eos_token": "the tokenizer's own EOS ends each answer",
    "pad_token": "the tokenizer's pad token pads (EOS when it has none)",
    "precompute_ref_batch_size": "precomputed reference log-probs use per_device_eval_batch_size",
    "loss_weights": "llmrl trains one DPO loss (loss_type)",
    **dict.fromkeys(("f_divergence_type", "f_alpha_divergence_coef", "discopop_tau", "ld_alpha", "use_weighting"),
                    "llmrl's DPO losses are sigmoid, ipo, hinge and robust (loss_type)"),
    **dict.fromkeys(("sync_ref_model", "ref_model_sync_steps", "ref_model_mixup_alpha"),
                    "llmrl's reference is the policy as it starts, fixed for the run"),
}
REFUSED_PREFIXES: dict[str, str] = {
    "vllm_": VLLM,
    "hub_": HUB,
    "dataloader_": LOADER,
    "ddp_": LAUNCHER,
    "torch_compile": "llmrl does not compile the model",
    "entropy_": "llmrl adds no entropy bonus (entropy is logged)",
    "use_adaptive_entropy": "llmrl adds no entropy bonus (entropy is logged)",
    "sapo_": "llmrl's policy losses are PPO-clip with clip-higher and dual-clip (epsilon, epsilon_high, dual_clip)",
    "vespo_": "llmrl's policy losses are PPO-clip with clip-higher and dual-clip (epsilon, epsilon_high, dual_clip)",
}


def refusal(name: str) -> str | None:
    """What llmrl does instead of TRL's `name` (None if the field is not a refused one)."""
    if name in REFUSED:
        return REFUSED[name]
    return next((reason for prefix, reason in REFUSED_PREFIXES.items() if name.startswith(prefix)), None)


@functools.cache
def trl_defaults() -> dict[str, dict]:
    """{TRL class name: {field: default}} of the installed TRL (TrainingArguments' fields included)."""
    import trl

    def default(f):
        if f.default is not dataclasses.MISSING:
            return f.default
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else None

    return {name: {f.name: default(f) for f in dataclasses.fields(getattr(trl, name))} for name in TRL_CLASSES}


TRL_CLASS_OF = {"RLConfig": "GRPOConfig", "DPOConfig": "DPOConfig", "SFTConfig": "SFTConfig",
                "RewardConfig": "RewardConfig"}


def _inert(name: str, value, trl_class: str) -> bool:
    """A refused field that changes nothing: it holds TRL's default, or says off."""
    if value is None or value is False:
        return True
    defaults = trl_defaults()
    default = defaults.get(trl_class, {}).get(name, next((d[name] for d in defaults.values() if name in d), None))
    return value == default or (isinstance(default, str) and str(value) == default)


def translate(config_class, values: dict, llmrl_fields, where: str, context: dict | None = None
              ) -> tuple[dict, list[str]]:
    """`values` with TRL's names and values turned into llmrl's, and the problems found (each one a
    sentence naming the field). `llmrl_fields`: every field the run accepts (model, data and the
    trainer's); `context`: the run's other values, which a conversion may read (default `values`).
    Fields that are neither llmrl's nor TRL's are left for the caller to report."""
    context = values if context is None else context
    trl_class = TRL_CLASS_OF.get(config_class.__name__, "GRPOConfig")
    out, winners, problems = {}, {}, []
    for name, value in values.items():
        if name in llmrl_fields:
            mapping = SAME_NAME_VALUES.get(name, {})
            out[name] = mapping.get(value, value) if isinstance(value, bool) else value
        elif name in RENAMED:
            converted = RENAMED[name].convert(value, context)
            if isinstance(converted, str):
                problems.append(f"{name}: {converted}")
            else:
                clash = [key for key in converted if key in values and values[key] != converted[key]]
                if RENAMED[name].wins:
                    winners.update(converted)
                elif clash:
                    problems.append(f"{name}={value!r} is llmrl's {clash[0]}={converted[clash[0]]!r}, but {where} "
                                    f"also sets {clash[0]}={values[clash[0]]!r}; keep one")
                else:
                    out.update({key: v for key, v in converted.items() if key not in values})
        elif refusal(name) is not None:
            if not _inert(name, value, trl_class):
                problems.append(f"{name}={value!r} (TRL's {trl_class}): {refusal(name)}")
        else:
            out[name] = value  # not TRL's either: the caller reports it as unknown
    return {**out, **winners}, problems


def _own(config_class) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def problems_message(where: str, problems: list[str]) -> str:
    """Every problem of one recipe or call, in one line."""
    if len(problems) == 1:
        return f"{where}: {problems[0]}"
    return f"{where}: {len(problems)} fields llmrl cannot take as given: " + "; ".join(
        f"({i}) {problem}" for i, problem in enumerate(problems, 1))


def accept_trl_names(config_class) -> None:
    """Let `config_class(...)` take TRL's field names (`translate`); every field it cannot take is
    reported at once, in one TRLFieldError, instead of Python's bare TypeError for the first."""
    init = config_class.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        own = _own(config_class)
        if any(name not in own for name in kwargs) or any(name in SAME_NAME_VALUES for name in kwargs):
            kwargs, problems = translate(config_class, kwargs, own, f"{config_class.__name__}(...)")
            problems += [unknown_field(name, config_class) for name in kwargs if name not in own]
            if problems:
                raise TRLFieldError(problems_message(f"{config_class.__name__}(...)", problems))
        init(self, *args, **kwargs)

    config_class.__init__ = __init__


def unknown_field(name: str, config_class) -> str:
    """A field of neither llmrl's `config_class` nor TRL's, with where it does belong or the closest name."""
    from llmrl.config import DataConfig, ModelConfig, closest_name

    for other in (ModelConfig, DataConfig):
        if name in _own(other):
            return f"{name} is a {other.__name__} field: pass {other.__name__}({name}=...) to the trainer"
    hint = closest_name(name, _own(config_class))
    return f"{name} is not a field of {config_class.__name__} or of TRL's configs" + (
        f" (did you mean {hint!r}?)" if hint else "")


def table() -> str:
    """docs/trl_fields.md: every field of TRL's four configs and what it is in llmrl."""
    from llmrl.config import DataConfig, DPOConfig, ModelConfig, RewardConfig, RLConfig, SFTConfig

    ours = {"GRPOConfig": RLConfig, "DPOConfig": DPOConfig, "SFTConfig": SFTConfig, "RewardConfig": RewardConfig}
    shared = _own(ModelConfig) | _own(DataConfig)
    defaults = trl_defaults()
    names = sorted({name for fields in defaults.values() for name in fields})
    rows = []
    for name in names:
        where = [cls for cls in TRL_CLASSES if name in defaults[cls]]
        same = [cls for cls in where if name in _own(ours[cls]) | shared]
        if name in RENAMED and len(same) < len(where):
            text = f"renamed: {RENAMED[name].meaning}"
        elif len(same) == len(where):
            text = "same name" + (" (also takes true -> group, false -> none)" if name in SAME_NAME_VALUES else "")
        elif same:
            text = f"same name in {', '.join(same)}; elsewhere refused: {refusal(name) or NOT_HERE}"
        else:
            text = f"refused unless TRL's default or off: {refusal(name) or NOT_HERE}"
        rows.append(f"| `{name}` | {', '.join(c.replace('Config', '') for c in where)} | {text} |")
    return "\n".join([
        "# TRL's config fields in llmrl",
        "",
        "Generated by `python -m llmrl.config.trl_names > docs/trl_fields.md` from the installed TRL; "
        "tests/test_trl_names.py checks it is current. A recipe, a flag or a config constructor may use "
        "any of these names. \"Refused unless TRL's default or off\": the field is accepted, and changes "
        "nothing, while it holds TRL's default (or None / false); another value stops the run with the "
        "reason given here. Every problem of a recipe is reported at once.",
        "",
        "| TRL field | in TRL's | in llmrl |",
        "|---|---|---|",
        *rows,
        "",
    ])


if __name__ == "__main__":
    print(table(), end="")
