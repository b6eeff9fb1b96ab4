"""Settings every run has: the model, the data, and what all trainers share (optimisation,
batching, logging, checkpoints); plus the small helpers that validation messages use."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


def closest_name(name: str, valid) -> str:
    """The valid name closest to `name`, for 'did you mean' messages (empty if none is close)."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return match[0] if match else ""


def check_ranges(owner: str, config, ranges: dict) -> None:
    """Each field of `ranges` ({name: (kind, low, high, what)}) is a finite number of `kind`
    (int or float) with low <= value <= high (None: unbounded); else a ValueError that names the
    field, the rule and what the field does. A bad value met later would be a torch or DataLoader
    traceback that names no setting, a hang (num_iterations: 0) or a silent misuse (a negative
    max_prompt_length cuts every prompt's first tokens)."""
    import math

    for name, (kind, low, high, what) in ranges.items():
        value = getattr(config, name)
        if value is None:
            continue
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        fits = numeric and (kind is float or float(value).is_integer()) and math.isfinite(value)
        fits = fits and (low is None or value >= low) and (high is None or value <= high)
        if not fits:
            bounds = " and ".join(part for part in (f">= {low}" if low is not None else "",
                                                    f"<= {high}" if high is not None else "") if part)
            kind_name = "an integer" if kind is int else "a finite number"
            raise ValueError(f"{owner}.{name}={value!r} is not valid: it must be {kind_name}"
                             f"{' ' + bounds if bounds else ''} ({what}).")


def check_choice(owner: str, name: str, value, valid) -> None:
    if value not in valid:
        hint = closest_name(str(value), [str(v) for v in valid])
        hint = f" Did you mean {hint!r}?" if hint else ""
        raise ValueError(f"{owner}.{name}={value!r} is not valid; choose one of {sorted(map(str, valid))}.{hint}")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISIONS = ("no", "bf16", "fp16")


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

# The numeric settings every trainer shares: (kind, low, high, what the field does); see check_ranges.
TRAIN_RANGES = {
    "learning_rate": (float, 0.0, None, "AdamW's peak learning rate"),
    "warmup_steps": (int, 0, None, "warmup steps"),
    "weight_decay": (float, 0.0, None, "AdamW's weight decay"),
    "adam_beta1": (float, 0.0, 0.999999, "AdamW's beta1, in [0, 1)"),
    "adam_beta2": (float, 0.0, 0.999999, "AdamW's beta2, in [0, 1)"),
    "adam_epsilon": (float, 1e-30, None, "AdamW's epsilon, > 0"),
    "max_grad_norm": (float, 0.0, None, "gradient clipping norm; 0 = no clipping"),
    "num_train_epochs": (float, 0.0, None, "passes over the training data"),
    "max_steps": (int, -1, None, "optimizer steps; -1 = num_train_epochs"),
    "logging_steps": (int, 1, None, "log every N optimizer steps"),
    "eval_steps": (int, 0, None, "evaluate every N steps; 0 = only at the end"),
    "save_steps": (int, 0, None, "checkpoint every N steps; 0 = only the final model"),
    "save_total_limit": (int, 1, None, "checkpoints kept; unset = all"),
}
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
    overwrite_output_dir: bool = field(
        default=False,
        metadata=_help("Let a fresh run replace the checkpoints, model and samples of a previous run in output_dir "
                       "(else it stops; resume_from_checkpoint: true continues the previous run)."),
    )
    logging_dir: str | None = field(default=None, metadata=_help("Tracker log folder; defaults to output_dir/runs."))
    disable_tqdm: bool = field(default=False, metadata=_help("Hide the progress bar."))
    mixed_precision: str | None = field(
        default=None,
        metadata=_help("Autocast the forward passes: bf16, fp16 (CUDA only) or no, over float32 weights (TRL's "
                       "bf16/fp16: true); None = as `accelerate launch --mixed_precision` says.",
                       choices=list(MIXED_PRECISIONS)),
    )

    def __post_init__(self):
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        for tracker in self.report_to:
            check_choice(self.algorithm, "report_to", tracker, TRACKERS)
        check_choice(self.algorithm, "lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        if self.mixed_precision is not None:
            check_choice(self.algorithm, "mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        check_ranges(self.algorithm, self, TRAIN_RANGES)
        if self.max_steps == 0:
            raise ValueError(f"{self.algorithm}.max_steps=0 would train nothing: give a number of optimizer steps, "
                             "or -1 to train num_train_epochs passes.")
        if self.run_name is None:
            self.run_name = self.output_dir.rstrip("/").split("/")[-1]
