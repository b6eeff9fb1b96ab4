"""The frozen reference policy of the KL term (and DPO's reference).

    reference = build_reference(policy, model_config)   # before training
    logits = reference(input_ids=..., attention_mask=...).logits
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from peft import PeftModel

from llmrl.config import ModelConfig

logger = logging.getLogger(__name__)


def adapter_is_trained(model: PeftModel) -> bool:
    """Whether any LoRA update is non-zero (a fresh adapter has B = 0, so it changes nothing yet)."""
    return any(parameter.detach().abs().max() > 0 for name, parameter in model.named_parameters()
               if "lora_B" in name or "lora_embedding_B" in name)


class ReferenceModel:
    """The frozen reference policy, called like a model: `ref(**inputs)` or `ref.forward(**inputs)`.

    Shared with a LoRA policy, it runs the policy with the adapter disabled, which is the base model
    exactly and costs no memory. Otherwise it wraps a frozen copy. Either way it runs in eval mode
    under `torch.no_grad()`. Not `torch.inference_mode()`: its outputs (reference logprobs) enter
    the KL term of the loss later, and inference tensors cannot be saved for backward.
    """

    def __init__(self, model, *, shares_policy: bool, autocast=contextlib.nullcontext):
        self.model = model
        self.shares_policy = shares_policy
        # The run's autocast (`accelerator.autocast`), so that under mixed precision the reference
        # computes exactly as the policy (prepared, hence autocast) does: a frozen copy is not prepared.
        self.autocast = autocast

    @property
    def config(self):
        return self.model.config

    def __call__(self, **inputs):
        adapter_off = self.model.disable_adapter() if self.shares_policy else contextlib.nullcontext()
        # peft re-enables requires_grad of the active adapter only when the context ends; a second adapter
        # (PPO's shared critic) would silently stop training.
        trainable = [p for p in self.model.parameters() if p.requires_grad] if self.shares_policy else []
        was_training = self.model.training
        self.model.eval()  # no dropout: the reference must be deterministic
        try:
            with torch.no_grad(), adapter_off, self.autocast():
                return self.model(**inputs)
        finally:
            self.model.train(was_training)
            for parameter in trainable:
                parameter.requires_grad_(True)

    forward = __call__


def build_reference(policy, model_config: ModelConfig | None = None, needed: bool = True) -> ReferenceModel | None:
    """The reference for the KL term, taken from the policy as it is now (call before training).

    None when `needed` is False (no KL term: nothing is copied). A PeftModel policy whose adapter
    is still the no-op it starts as (every LoRA B zero) is shared with its adapter disabled; any
    other policy, including a PeftModel with an adapter trained before, is deep-copied and frozen.
    """
    if not needed:
        return None
    if isinstance(policy, PeftModel):
        if not adapter_is_trained(policy):
            return ReferenceModel(policy, shares_policy=True)
        logger.warning(
            "The policy is a PeftModel whose adapter was already trained, so the reference (the policy as it "
            "starts) is not the base model with the adapter off: it is a frozen copy of the whole model, base "
            "included. To share one base instead, merge the adapter first (model.merge_and_unload(), or name "
            "the adapter folder as model_name_or_path) and train a new adapter with peft_config.")
    if model_config is not None and model_config.use_peft:
        raise ValueError(
            "use_peft is set but the policy is not a PeftModel, so the reference would be a full second "
            "copy. Load the policy with llmrl.models.load_policy, which adds the LoRA adapter."
        )
    frozen = copy.deepcopy(policy).eval().requires_grad_(False)
    return ReferenceModel(frozen, shares_policy=False)
