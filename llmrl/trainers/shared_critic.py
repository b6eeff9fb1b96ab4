"""PPO's critic on the policy's own frozen base (LoRA): a second adapter, "critic", and a value head.

Under `use_peft` the policy is a PeftModel and the reference is that model with its adapter off. The
critic can live there too: a second LoRA adapter on the same frozen base and a linear head on the
backbone's last hidden state, so one base serves policy, reference and critic (`share_critic_base`).
It computes what a separate `AutoModelForTokenClassification` critic with a LoRA adapter computes,
and saves as one (`SharedCriticExport`).

Two traps, both silent:
- peft's `set_adapter` (and the end of `disable_adapter`) leave only the active adapter trainable,
  so `use_adapter` swaps which adapter the LoRA layers run and never touches requires_grad.
- gradient checkpointing recomputes each layer during the backward with whatever adapter is active
  *then* (one backward covers the policy's and the critic's forwards), so the checkpoint's
  `context_fn` restores the adapter its forward ran with.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import safetensors.torch
import torch
from accelerate.utils import DistributedType
from peft import PeftModel, PeftType, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from transformers.modeling_outputs import TokenClassifierOutput

from llmrl.adapters import CRITIC_ADAPTER, Adapter, combine, starting_adapters
from llmrl.models import HEAD_NAMES, enable_checkpointing, lora_config
from llmrl.reference import adapter_is_trained

VALUE_HEAD = "value_head"  # the head's attribute on the policy's PeftModel


def lora_layers(model) -> list[LoraLayer]:
    return [module for module in model.modules() if isinstance(module, LoraLayer)]


@contextlib.contextmanager
def use_adapter(layers: list[LoraLayer], adapters):
    """Run the LoRA `layers` with `adapters` (a name or a list) active; their own come back on exit."""
    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    before = [layer._active_adapter for layer in layers]
    for layer in layers:
        layer._active_adapter = adapters
    try:
        yield
    finally:
        for layer, active in zip(layers, before):
            layer._active_adapter = active


def _why_not_shared(args, model_config, source, peft_config, distributed_type) -> str | None:
    """Why the critic cannot be an adapter on the policy's base, or None when it can."""
    if isinstance(source, PeftModel):
        policy_lora = source.peft_config[source.active_adapter]
    elif model_config.use_peft or peft_config is not None:
        policy_lora = peft_config or lora_config(model_config, "CAUSAL_LM")
    else:
        return "the policy has no LoRA adapter: its own weights train, so there is no frozen base to share (use_peft: true)"
    if policy_lora.peft_type != PeftType.LORA:
        return f"the policy's adapter is {policy_lora.peft_type}, not LoRA"
    if policy_lora.modules_to_save:
        return (f"the policy's adapter trains full copies of {sorted(policy_lora.modules_to_save)} "
                "(lora_modules_to_save), which a critic on the same base would read")
    critic_source = args.value_model_name_or_path or args.reward_model_name_or_path
    if critic_source is not None and critic_source not in (source, model_config.model_name_or_path):
        return (f"the critic starts from {critic_source!r} (value_model_name_or_path, else reward_model_name_or_path), "
                "not from the policy's base")
    if isinstance(source, PeftModel) and adapter_is_trained(source):
        return "the policy's adapter is already trained, so its base is not the policy the critic should start from"
    if distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return f"{distributed_type.value} shards the policy, and the critic reads its backbone outside the sharded forward"
    return None


def critic_shares_base(args, model_config, source, peft_config, distributed_type) -> bool:
    """Whether PPO's critic is an adapter on the policy's base: `share_critic_base`, or when unset
    (None), whenever it can be. Decided before the policy loads (`source` is the policy's name or
    object); share_critic_base: true where it cannot be raises a ValueError that says why."""
    if args.share_critic_base is False:
        return False
    reason = _why_not_shared(args, model_config, source, peft_config, distributed_type)
    if reason is not None and args.share_critic_base:
        raise ValueError(f"share_critic_base: true, but {reason}. Set share_critic_base: false (or leave it unset to "
                         "decide automatically): the critic then gets its own copy of the base.")
    return reason is None


def add_critic(policy: PeftModel, gradient_checkpointing: bool) -> list[torch.nn.Parameter]:
    """Add the critic adapter and a zero value head to `policy`; returns their parameters.

    Call it before `accelerator.prepare(policy)`, so that DDP registers them. The adapter has the
    policy's LoRA settings, as the separate LoRA critic has, and its B matrices start at zero like
    every LoRA: with the zero head, every initial value is 0, as `load_value_model` gives from a
    causal LM.
    """
    config = copy.deepcopy(policy.peft_config[policy.active_adapter])
    # The critic runs the backbone only: a LoRA on the LM head (lora_target_modules naming it) would get
    # no gradient, and DDP fails on a trainable parameter without one.
    base = policy.get_base_model()
    lm_head = next(name for name, module in base.named_modules() if module is base.get_output_embeddings())
    if not isinstance(config.exclude_modules, str):  # a regex is the user's own; a list gains the head
        config.exclude_modules = sorted({*(config.exclude_modules or ()), lm_head})
    policy.add_adapter(CRITIC_ADAPTER, config)
    embeddings = policy.get_input_embeddings().weight
    head = torch.nn.Linear(base.config.get_text_config().hidden_size, 1,
                           device=embeddings.device, dtype=embeddings.dtype)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    policy.add_module(VALUE_HEAD, head)
    layers = lora_layers(policy)
    parameters = [p for layer in layers for name in layer.adapter_layer_names
                  if CRITIC_ADAPTER in getattr(layer, name) for p in getattr(layer, name)[CRITIC_ADAPTER].parameters()]
    parameters += list(head.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)  # add_adapter leaves an inactive adapter frozen
    if gradient_checkpointing:
        def context_fn():  # called at each checkpointed forward: the recompute reruns its adapter
            return contextlib.nullcontext(), use_adapter(layers, list(layers[0].active_adapters))

        enable_checkpointing(policy.get_base_model(), context_fn=context_fn)
    return parameters


class SharedValueModel:
    """The shared critic called like a token-classification model (as `token_values` calls it):
    the policy's backbone with the critic adapter, then the value head; logits [N, T, 1]."""

    def __init__(self, policy: PeftModel):
        base = policy.get_base_model()
        self.backbone = getattr(base, base.base_model_prefix)
        self.head = getattr(policy, VALUE_HEAD)
        self.layers = lora_layers(policy)

    def __call__(self, **inputs):
        with use_adapter(self.layers, CRITIC_ADAPTER):
            hidden = self.backbone(**inputs).last_hidden_state
        return TokenClassifierOutput(logits=self.head(hidden))


class SharedCriticExport:
    """`save_pretrained` of the shared critic as a peft TOKEN_CLS adapter folder: the critic adapter,
    and the value head as the `score` head (modules_to_save). Plain transformers + peft load it:
    `PeftModel.from_pretrained(AutoModelForTokenClassification.from_pretrained(base, num_labels=1), folder)`,
    and so does `value_model_name_or_path`."""

    def __init__(self, policy: PeftModel):
        self.policy = policy

    def save_pretrained(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.policy.peft_config[CRITIC_ADAPTER])
        config.task_type, config.inference_mode = "TOKEN_CLS", True
        config.modules_to_save = list(HEAD_NAMES)
        weights = get_peft_model_state_dict(self.policy, adapter_name=CRITIC_ADAPTER)
        # The keys of a TOKEN_CLS PeftModel: its backbone has the causal LM's name (`model`), its head is `score`.
        head = getattr(self.policy, VALUE_HEAD)
        weights |= {f"base_model.model.{HEAD_NAMES[0]}.weight": head.weight, f"base_model.model.{HEAD_NAMES[0]}.bias": head.bias}
        if starting_adapters(self.policy):  # the critic ran on base + starting adapters, merged: save them with it
            base = self.policy.get_base_model()
            lm_head = next(name for name, module in base.named_modules() if module is base.get_output_embeddings())
            modules = {name for name, _ in base.named_modules() if name.split(".")[0] != lm_head} | {HEAD_NAMES[0]}
            config, weights = combine([*starting_adapters(self.policy), Adapter(config, weights, "the critic")], modules)
        config.save_pretrained(str(folder))
        safetensors.torch.save_file({key: value.detach().cpu().contiguous() for key, value in weights.items()},
                                    str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
