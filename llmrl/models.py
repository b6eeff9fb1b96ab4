"""The four model roles of an RL run: policy, reference, reward model and value model (critic).

Every role loads through `load_model`, so the `from_pretrained` arguments (dtype, attention kernel,
revision, safetensors only, remote code) are written once. Every role also accepts a model object
instead of a path, as the trainers' `model=` argument does.

- policy: `AutoModelForCausalLM`, LoRA-wrapped when `use_peft`, 4-bit base when `load_in_4bit`.
- reference: `llmrl.reference.ReferenceModel`, the policy itself with its adapter disabled under
  LoRA (no second copy), else a frozen copy; None when no KL term is used.
- reward: `AutoModelForSequenceClassification`, one label; `reward_scores` reads the last real token.
- value: `AutoModelForTokenClassification`, one label, a scalar per token; from a reward checkpoint
  it keeps the reward head, from a causal LM it gets a zero head (initial values 0).
All of them save with `save_pretrained` and reload with plain transformers. A name that is neither
a model folder nor a hub model is refused first, in one line (`llmrl.model_sources`).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from pathlib import Path

import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
)

from llmrl.adapters import STARTING_ADAPTERS, check_chain, record_start, starting_adapters
from llmrl.config import ModelConfig
from llmrl.model_sources import check_model_source, load_failed
from llmrl.recipe import RecipeError

logger = logging.getLogger(__name__)

# The scalar head on top of the backbone. Every causal-LM *ForSequenceClassification and
# *ForTokenClassification in transformers (Llama, Qwen, Mistral, Gemma, GPT-2, ...) calls it
# `score`; encoder models' `classifier` reads a pooled state, not the last token, so it is not here.
HEAD_NAMES = ("score",)

# peft's task_type of a saved adapter -> the class it was trained on.
ADAPTER_TASK_CLASSES = {"CAUSAL_LM": AutoModelForCausalLM, "SEQ_CLS": AutoModelForSequenceClassification,
                        "TOKEN_CLS": AutoModelForTokenClassification}


# ---- Model inputs --------------------


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: [N, T] mask -> [N, T] long.

    With left padding the first real token must sit at position 0, as it did when the sequence was
    generated alone; otherwise rotary embeddings see shifted positions and outputs depend on how
    much padding the batch needed. Padding gets position 0 (it is masked anyway).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def padded_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """`model(...)` on a padded batch: positions from the mask, no KV cache (nothing decodes next).

    Every llmrl forward over padded sequences goes through here, so left-padded rows give what
    they give alone. `kwargs` go to the model (e.g. logits_to_keep).
    """
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for left or right padding: [N, T] -> [N] long.

    Read from the mask, never from `pad_token_id`, which fails when pad == EOS and the sequence
    ends with EOS.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


# ---- Loading --------------------


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' -> bfloat16 on a CUDA GPU that supports it, else float32; other names as torch dtypes."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {name!r} is not one of auto, float32, bfloat16, float16.")
    return getattr(torch, name)


def load_tokenizer(model_config: ModelConfig, padding_side: str = "left"):
    """The tokenizer of `tokenizer_name_or_path` (default: the model's), with a pad token.

    Left padding is what generation needs. A tokenizer without a pad token gets EOS as pad: llmrl
    reads padding from attention masks, never from the pad id, so pad == EOS is safe here. One with
    neither gets its unknown token; adding a new token would need the embeddings resized.
    """
    path = model_config.tokenizer_name_or_path or model_config.model_name_or_path
    if path is None:
        raise RecipeError("No tokenizer to load: set model_name_or_path (or tokenizer_name_or_path) in the recipe.")
    field = "tokenizer_name_or_path" if model_config.tokenizer_name_or_path else "model_name_or_path"
    check_model_source(path, field, **_revision(path, model_config))
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=model_config.trust_remote_code, **_revision(path, model_config)
        )
    except OSError as error:  # a folder without tokenizer files, a hub name the hub does not have, no network
        raise load_failed(f"the tokenizer of {field}", path, error) from error
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise ValueError(f"The tokenizer of {path!r} has no pad, EOS or unknown token; add a pad token to it.")
    return tokenizer


def _revision(path: str, model_config: ModelConfig) -> dict:
    # model_revision names a commit of the policy's repository; it means nothing for another repo
    # (a reward model loaded with the same ModelConfig), so it applies to that path only.
    return {"revision": model_config.model_revision} if path == model_config.model_name_or_path else {}


def _head_name(model) -> str | None:
    return next((name for name in HEAD_NAMES if isinstance(getattr(model, name, None), torch.nn.Module)), None)


def _is_model(obj) -> bool:
    return isinstance(obj, (PreTrainedModel, PeftModel))


def adapter_base(path) -> str | None:
    """The base model a local LoRA adapter folder (`adapter_config.json`) was trained on, else None."""
    config = Path(str(path)) / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path} is a LoRA adapter folder, but its adapter_config.json names no "
                         "base_model_name_or_path; merge the adapter (merge_and_unload) and save the full model.")
    return base


def _source_config(path_or_model, model_config: ModelConfig):
    """The config of a model object (a copy) or of a hub name / folder (an adapter's: its base's)."""
    if _is_model(path_or_model):
        return copy.deepcopy(path_or_model.config)
    check_model_source(path_or_model, **_revision(path_or_model, model_config))
    base = adapter_base(path_or_model)
    if base is not None:
        check_model_source(base, f"{Path(path_or_model) / 'adapter_config.json'}: base_model_name_or_path")
    path_or_model = base or path_or_model
    try:
        return AutoConfig.from_pretrained(path_or_model, **_hub_kwargs(path_or_model, model_config))
    except OSError as error:  # a folder without config.json, a hub name the hub does not have, no network
        raise load_failed("the model config of", path_or_model, error) from error


def _load_merged_adapter(path: str, base: str, auto_class, model_config, config_overrides, **load_kwargs):
    """A LoRA adapter folder loaded onto its base and merged into it: the model the adapter's run
    ended with, as plain weights (an SFT adapter as the policy to start RL from, a reward-model
    adapter as the frozen reward model or the critic's starting point). The adapter goes onto the
    class it was trained with (its task_type), then converts to `auto_class` if that differs. The
    missing keys are those that neither the base nor the adapter provided (e.g. a fresh head)."""
    task = json.loads((Path(path) / "adapter_config.json").read_text()).get("task_type")
    own = ADAPTER_TASK_CLASSES.get(task, auto_class)
    model, missing = _load_with_missing_keys(base, own, model_config, config_overrides, **load_kwargs)
    merged = PeftModel.from_pretrained(model, path).merge_and_unload()
    # What a new LoRA on top must save with it (llmrl.adapters): the merge itself leaves no trace.
    record_start(merged, model, path)
    saved = safetensors.torch.load_file(str(Path(path) / "adapter_model.safetensors"))
    heads = {head for head in HEAD_NAMES if any(f".{head}." in key for key in saved)}
    missing = {key for key in missing if key.split(".")[0] not in heads}
    if own is auto_class:
        return merged, missing
    converted, more = _load_with_missing_keys(merged, auto_class, model_config, config_overrides)
    setattr(converted, STARTING_ADAPTERS, starting_adapters(merged))
    return converted, missing | more


def _hub_kwargs(path: str, model_config: ModelConfig) -> dict:
    return dict(trust_remote_code=model_config.trust_remote_code, **_revision(path, model_config))


def _load_with_missing_keys(path_or_model, auto_class, model_config, config_overrides, **load_kwargs):
    """`load_model`, also returning the set of parameter names that the source did not provide."""
    model_config = model_config or ModelConfig()
    config = _source_config(path_or_model, model_config)
    for key, value in config_overrides.items():
        setattr(config, key, value)

    base = None if _is_model(path_or_model) else adapter_base(path_or_model)
    if base is not None:
        return _load_merged_adapter(path_or_model, base, auto_class, model_config, config_overrides, **load_kwargs)
    if not _is_model(path_or_model):
        try:
            model, info = auto_class.from_pretrained(
                path_or_model,
                config=config,
                dtype=resolve_dtype(model_config.dtype),
                attn_implementation=model_config.attn_implementation,
                # Pickled .bin checkpoints can run arbitrary code when loaded; safetensors cannot.
                use_safetensors=True,
                output_loading_info=True,
                **_hub_kwargs(path_or_model, model_config),
                **load_kwargs,
            )
        except OSError as error:
            raise RecipeError(
                f"Could not load {path_or_model!r} as {auto_class.__name__}: {' '.join(str(error).split())} llmrl "
                "loads safetensors weights only; check the name or folder, or convert a .bin checkpoint with save_pretrained."
            ) from error
        return model, set(info["missing_keys"])

    expected = auto_class._model_mapping.get(type(config), None)
    if isinstance(path_or_model, PeftModel) or expected is None or isinstance(path_or_model, expected):
        return path_or_model, set()
    # Another head on the same backbone (e.g. a critic from an in-memory policy): build the target
    # class and copy every weight that fits; the backbones share their parameter names.
    model = auto_class.from_config(config).to(device=path_or_model.device, dtype=path_or_model.dtype)
    missing, _ = model.load_state_dict(path_or_model.state_dict(), strict=False)
    return model, set(missing)


def load_model(path_or_model, auto_class, model_config: ModelConfig | None = None, config_overrides=None, **load_kwargs):
    """One model of class `auto_class` (e.g. `AutoModelForCausalLM`) from a hub name, folder or object.

    Args:
        path_or_model: a hub name or local folder, or a model object. An object of the right class
            is returned as is; one of another class with the same backbone (a causal LM asked for as
            a token classifier) is converted, its weights copied.
        model_config: dtype, attention kernel, revision and trust_remote_code; defaults if None.
        config_overrides: attributes set on the model config before building (e.g. num_labels=1).
        load_kwargs: extra `from_pretrained` arguments (e.g. quantization_config).
    """
    return _load_with_missing_keys(path_or_model, auto_class, model_config, config_overrides or {}, **load_kwargs)[0]


def lora_config(model_config: ModelConfig, task_type: str = "CAUSAL_LM") -> LoraConfig:
    """The LoRA adapter settings of `model_config`; task_type CAUSAL_LM, SEQ_CLS or TOKEN_CLS.

    For SEQ_CLS and TOKEN_CLS peft trains the `score` head in full (modules_to_save); 'all-linear'
    must then leave it out, or peft (0.21, TOKEN_CLS) wraps it twice and fails.
    """
    targets = model_config.lora_target_modules
    exclude = None
    if targets is None or list(targets) == ["all-linear"]:
        targets = "all-linear"  # every linear layer except the LM head
        exclude = list(HEAD_NAMES) if task_type != "CAUSAL_LM" else None
    return LoraConfig(
        r=model_config.lora_r,
        lora_alpha=model_config.lora_alpha,
        lora_dropout=model_config.lora_dropout,
        target_modules=targets,
        exclude_modules=exclude,
        modules_to_save=model_config.lora_modules_to_save,
        task_type=task_type,
        bias="none",
    )


def _quantization_config(model_config: ModelConfig) -> BitsAndBytesConfig:
    """The 4-bit settings, after checking the machine can run them (before any weight is read)."""
    if not torch.cuda.is_available():
        raise RecipeError(
            "load_in_4bit: true needs a CUDA GPU (bitsandbytes 4-bit kernels) and none is visible. "
            "Set load_in_4bit: false to train in float32/bfloat16, or run on a GPU machine."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError("load_in_4bit: true needs bitsandbytes, which is not installed: pip install 'llmrl[quant]'.")
    compute_dtype = resolve_dtype(model_config.dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_config.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_config.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        # Storing the packed weights in the compute dtype lets FSDP shard them like other weights.
        bnb_4bit_quant_storage=compute_dtype,
    )


def enable_checkpointing(model, context_fn=None) -> None:
    """Gradient (activation) checkpointing, non-reentrant: the reentrant variant breaks with frozen
    inputs and DDP. transformers 5.23 renamed gradient_checkpointing_enable (now a deprecated alias).
    `context_fn` goes to `torch.utils.checkpoint.checkpoint` (contexts for the forward and the recompute)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False} | ({"context_fn": context_fn} if context_fn is not None else {}))


def disable_dropout(model) -> None:
    """Every dropout of `model` off for good: `nn.Dropout` modules (LoRA's lora_dropout among them)
    and the attention-probability dropout that attention modules keep as a float (Llama's
    `attention_dropout`). RL compares log-probs of the same tokens from several forwards (rollout,
    old, reference, new): with dropout on in training mode they differ by noise, and the first
    update's ratio is not 1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def load_policy(model_config: ModelConfig, model=None, *, peft_config: LoraConfig | None = None):
    """The trainable causal LM: `model` (a name, folder or object; default model_name_or_path).

    LoRA-wrapped when `model_config.use_peft` or a `peft_config` is given (an object that is already
    a PeftModel is kept as is); gradient checkpointing with use_reentrant=False when asked.
    """
    model = model if model is not None else model_config.model_name_or_path
    if model is None:
        raise RecipeError("No policy to load: set model_name_or_path in the recipe, or pass model=.")
    load_kwargs = {}
    if model_config.load_in_4bit and not _is_model(model):
        from accelerate import PartialState

        load_kwargs = dict(
            quantization_config=_quantization_config(model_config),
            # Quantised weights cannot be moved after loading: each process loads onto its own GPU.
            device_map={"": PartialState().local_process_index},
        )
    policy = load_model(model, AutoModelForCausalLM, model_config, **load_kwargs)

    checkpointing = model_config.gradient_checkpointing
    checkpointing_kwargs = {"use_reentrant": False}  # the reentrant variant breaks with frozen inputs and DDP
    if getattr(policy, "is_loaded_in_4bit", False):
        # Casts norms to float32 and makes the (frozen) input embeddings' output require grad.
        policy = prepare_model_for_kbit_training(
            policy, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=checkpointing_kwargs
        )
    elif checkpointing:
        enable_checkpointing(policy)

    wants_peft = model_config.use_peft or peft_config is not None
    if wants_peft and not isinstance(policy, PeftModel):
        policy = get_peft_model(policy, peft_config or lora_config(model_config, "CAUSAL_LM"))
        check_chain(policy)
        if checkpointing:
            # With frozen embeddings nothing before the first adapter requires grad, and checkpointed
            # blocks would then get no gradient at all.
            policy.enable_input_require_grads()
    return policy


# ---- Reward and value models --------------------


def _scalar_head_overrides(path_or_model, model_config, pad_token_id) -> dict:
    """num_labels=1, and a pad id (the given one, else the config's, else EOS)."""
    if pad_token_id is None:
        config = _source_config(path_or_model, model_config or ModelConfig())
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        if isinstance(pad_token_id, list):
            pad_token_id = pad_token_id[0]
    # pad_token_id lets the model's own forward (used by TRL, or by a user) batch sequences.
    return {"num_labels": 1, "pad_token_id": pad_token_id}


def load_reward_model(path_or_model, model_config: ModelConfig | None = None, *, pad_token_id: int | None = None):
    """An `AutoModelForSequenceClassification` with one label (a fresh head if from a causal LM)."""
    overrides = _scalar_head_overrides(path_or_model, model_config, pad_token_id)
    return load_model(path_or_model, AutoModelForSequenceClassification, model_config, overrides)


def load_value_model(path_or_model, model_config: ModelConfig | None = None, *, pad_token_id: int | None = None):
    """The critic: an `AutoModelForTokenClassification` with one label, a value per token.

    From a reward-model checkpoint the `score` head carries over (same name, same shape), so initial
    values at the last token are the reward model's scores; from a causal LM the head is fresh and
    set to zero, so every initial value is 0. Classifier dropout is 0: values are regression targets.
    """
    overrides = _scalar_head_overrides(path_or_model, model_config, pad_token_id) | {"classifier_dropout": 0.0}
    model, missing = _load_with_missing_keys(path_or_model, AutoModelForTokenClassification, model_config, overrides)
    head = _head_name(model)
    missing_backbone = sorted(key for key in missing if not key.startswith(f"{head}."))
    if missing_backbone:
        raise ValueError(
            f"{path_or_model!r} has no weights for {missing_backbone[:3]}...: it does not look like a causal LM "
            "or reward model of a supported architecture, so the critic would start from random weights."
        )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in missing:
                parameter.zero_()
    return model


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model scores at each sequence's last real token: [N, T] -> [N] float32.

    Runs the backbone, then the head on the hidden state at the last position of the attention
    mask, so left and right padding give the same score and pad == EOS is harmless (the model's own
    forward finds the end from pad_token_id instead). A PeftModel runs with its adapter.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    head = _head_name(base)
    if head is None:
        raise ValueError(
            f"{type(base).__name__} has no scalar head named one of {HEAD_NAMES}; load the reward model "
            "with llmrl.models.load_reward_model (a causal LM's AutoModelForSequenceClassification)."
        )
    backbone = getattr(base, base.base_model_prefix)
    hidden = padded_forward(backbone, input_ids, attention_mask).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last_hidden = hidden[rows, last_token_index(attention_mask).to(hidden.device)]
    return getattr(base, head)(last_hidden)[:, 0].float()


def token_values(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_completion_tokens: int | None = None
) -> torch.Tensor:
    """The critic's value at every position: [N, T] -> [N, T] float32 (padding positions are junk).

    With `num_completion_tokens` C, returns [N, C]: the values of the states *before* each
    completion token (positions P-1 .. P+C-2), aligned with `completion_logprobs`.
    """
    values = padded_forward(model, input_ids, attention_mask).logits[..., 0].float()
    if num_completion_tokens is None:
        return values
    return values[:, -num_completion_tokens - 1 : -1]
