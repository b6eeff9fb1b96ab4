"""LoRA after LoRA: what a run saves when its model started from LoRA adapter folders.

Given an adapter folder, llmrl loads the adapter's base and merges the adapter in
(`models._load_merged_adapter`); with use_peft a new LoRA then trains on top. Saving that new
adapter alone would name the bare base and silently drop the starting adapter. So the model records
the adapters it was merged from (`STARTING_ADAPTERS`, base first, a chain of any length), and the
export writes ONE LoRA on the true base that computes exactly what was trained.

Two LoRAs on one weight add s1 B1 A1 + s2 B2 A2 = [s1 B1, s2 B2] @ [A1; A2] (s = lora_alpha / r, or
lora_alpha / sqrt(r) with rsLoRA): one LoRA of rank r1 + r2 with the scales folded into B and
lora_alpha = r (scale 1) -- peft's `add_weighted_adapter(combination_type="cat")`. A module only
one of them adapts gets zero blocks, so every module shares one rank. A module one adapter trains
in full (modules_to_save) keeps the later full copy, which already contains everything before it.

Why one adapter and not the starting adapter's base folder name plus a stack: plain
`AutoPeftModelForCausalLM.from_pretrained(folder)` loads one adapter onto one full base, and a
merged full model would cost the base's size on every save. The ranks add up, which costs little
next to the base. What cannot be folded exactly (DoRA, LoRA on embeddings, LoRA biases, ...) is
refused when the model loads, not at the first save.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from peft.utils.other import get_pattern_key

STARTING_ADAPTERS = "llmrl_starting_adapters"  # attribute of a model merged from adapter folders
CRITIC_ADAPTER = "critic"  # PPO's shared critic (shared_critic.py): never part of the policy's folder
PREFIX = "base_model.model."  # peft's saved keys: PREFIX + module name + LoRA part
_LORA_KEY = re.compile(rf"^{re.escape(PREFIX)}(?P<module>.+)\.(?P<part>lora_[AB])\.weight$")

# LoraConfig fields whose non-default value changes what a LoRA computes beyond s * B @ A.
_UNFOLDABLE = {"use_dora": False, "lora_bias": False, "bias": "none", "use_qalora": False,
               "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
               "alora_invocation_tokens": None, "arrow_config": None}


@dataclass(frozen=True)
class Adapter:
    """One LoRA as peft saves it: its config and weights (keys without the adapter's name)."""

    config: LoraConfig
    weights: dict[str, torch.Tensor]
    source: str  # a folder, or "the new adapter": named in errors


def read_adapter(folder) -> Adapter:
    """The adapter saved in `folder` (adapter_config.json, adapter_model.safetensors)."""
    folder = Path(folder)
    raw = json.loads((folder / "adapter_config.json").read_text())
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{folder} is a {raw.get('peft_type')} adapter; only LoRA adapters can start a LoRA run "
                         "(use_peft). Merge it into a full model (merge_and_unload, save_pretrained) and start from that.")
    weights = safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))
    return Adapter(LoraConfig.from_pretrained(str(folder)), weights, str(folder))


def record_start(model, inner, folder) -> None:
    """Record on `model` that it is `inner`'s starting adapters plus the adapter in `folder`, merged."""
    setattr(model, STARTING_ADAPTERS, (*starting_adapters(inner), read_adapter(folder)))


def starting_adapters(model) -> tuple[Adapter, ...]:
    """The adapters merged into `model`'s weights when it loaded (its base model's, for a PeftModel)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return getattr(base, STARTING_ADAPTERS, ())


def _check_foldable(adapter: Adapter) -> None:
    for field, plain in _UNFOLDABLE.items():
        value = getattr(adapter.config, field, plain)
        if value != plain and value not in (None, False, [], {}):
            raise ValueError(
                f"{adapter.source}: its LoRA sets {field}={value!r}, which llmrl cannot fold into one LoRA on the base "
                f"when a new adapter trains on top (use_peft); set {field} to {plain!r}, or merge the starting adapter "
                "into a full model (merge_and_unload, save_pretrained) and start from that folder.")


def _split(adapter: Adapter, module_names: set[str]):
    """(LoRA pairs {module: (A, B * scale)}, full copies {module: {key: tensor}}) of the modules the
    model has (a causal LM's lm_head LoRA does not exist in a reward model built from it)."""
    pairs, full = {}, {}
    saved_in_full = adapter.config.modules_to_save or []
    for key, tensor in adapter.weights.items():
        match = _LORA_KEY.match(key)
        module = match["module"] if match else key[len(PREFIX):].rsplit(".", 1)[0]
        if not key.startswith(PREFIX) or (not match and not any(module == m or module.endswith(f".{m}")
                                                                for m in saved_in_full)):
            raise ValueError(
                f"{adapter.source}: its adapter holds {key!r}, which is not a LoRA on a linear layer nor a module "
                "of modules_to_save (LoRA on embeddings, lora_target_modules naming embed_tokens, cannot be folded); "
                "merge the starting adapter into a full model (merge_and_unload, save_pretrained) and start from that.")
        if module not in module_names:
            continue
        if match:
            pairs.setdefault(module, {})[match["part"]] = tensor.float()
        else:
            full.setdefault(module, {})[key] = tensor
    scaled = {}
    for module, parts in pairs.items():
        alpha_key = get_pattern_key(adapter.config.alpha_pattern.keys(), module)
        alpha = adapter.config.alpha_pattern.get(alpha_key, adapter.config.lora_alpha)
        rank = parts["lora_A"].shape[0]
        scale = alpha / math.sqrt(rank) if adapter.config.use_rslora else alpha / rank
        scaled[module] = (parts["lora_A"], parts["lora_B"] * scale)
    return scaled, full


def combine(adapters: list[Adapter], module_names: set[str]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """One LoRA equal to `adapters` applied one after the other (the last one's settings, scale 1).

    `module_names`: the model's module names; LoRAs on modules it lacks are dropped. A module one
    adapter saves in full replaces everything earlier adapters did to it; a later LoRA on a module
    an earlier adapter saved in full cannot be written on the base and is refused.
    """
    for adapter in adapters:
        _check_foldable(adapter)
    blocks: list[dict] = []  # per adapter: {module: (A, scaled B)}
    full: dict[str, dict] = {}
    for adapter in adapters:
        pairs, copies = _split(adapter, module_names)
        clash = sorted(set(pairs) & set(full))
        if clash:
            raise ValueError(f"{adapter.source}: its LoRA adapts {clash[0]}, which an earlier adapter trained in full "
                             "(lora_modules_to_save); keep that module in lora_modules_to_save, or leave it out of "
                             "lora_target_modules.")
        for earlier in blocks:
            for module in copies:
                earlier.pop(module, None)
        full |= copies
        blocks.append(pairs)
    ranks = [max((a.shape[0] for a, _ in pairs.values()), default=0) for pairs in blocks]
    dtype = next(iter(adapters[-1].weights.values())).dtype
    weights = {}
    for module in sorted({module for pairs in blocks for module in pairs}):
        shape_a, shape_b = next(pairs[module] for pairs in blocks if module in pairs)
        a_parts, b_parts = [], []
        for pairs, rank in zip(blocks, ranks):
            a, b = pairs.get(module, (shape_a.new_zeros(0, *shape_a.shape[1:]), shape_b.new_zeros(shape_b.shape[0], 0)))
            pad = rank - a.shape[0]  # zero rows of A and columns of B add nothing
            a_parts.append(torch.cat([a, a.new_zeros(pad, *a.shape[1:])]))
            b_parts.append(torch.cat([b, b.new_zeros(b.shape[0], pad, *b.shape[2:])], dim=1))
        weights[f"{PREFIX}{module}.lora_A.weight"] = torch.cat(a_parts).to(dtype)
        weights[f"{PREFIX}{module}.lora_B.weight"] = torch.cat(b_parts, dim=1).to(dtype)
    for copies in full.values():
        weights |= copies

    config = copy.deepcopy(adapters[-1].config)
    rank = sum(ranks)
    config.r, config.lora_alpha, config.use_rslora = rank, rank, False
    config.rank_pattern, config.alpha_pattern = {}, {}
    # Full module names: peft matches a list entry by name suffix, so each names exactly one module.
    config.target_modules = sorted({key[len(PREFIX):].rsplit(".", 2)[0] for key in weights if ".lora_A." in key})
    config.exclude_modules = config.layers_to_transform = config.layers_pattern = None
    config.modules_to_save = sorted(full) or None
    config.base_model_name_or_path = adapters[0].config.base_model_name_or_path
    config.inference_mode = True
    return config, weights


def trained_adapter(model: PeftModel, adapter_name: str, state_dict: dict | None = None) -> Adapter:
    """The adapter `adapter_name` of a live PeftModel, as `save_pretrained` would write it (from
    `state_dict`, the gathered full state, when the model's parameters are sharded)."""
    weights = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name)
    return Adapter(model.peft_config[adapter_name], weights, f"the new adapter {adapter_name!r}")


def combined_adapter(model: PeftModel, adapter_name: str | None = None, state_dict: dict | None = None):
    """(config, weights) of the one LoRA on the true base equal to `model`'s starting adapters plus
    its adapter `adapter_name` (default: the active one)."""
    adapter_name = adapter_name or model.active_adapter
    module_names = {name for name, _ in model.get_base_model().named_modules()}
    return combine([*starting_adapters(model), trained_adapter(model, adapter_name, state_dict)], module_names)


def check_chain(model) -> None:
    """Raise now, not at the first save, when a PeftModel that started from adapter folders cannot
    be saved as one adapter on the true base (call it right after adding the new adapter)."""
    if isinstance(model, PeftModel) and starting_adapters(model):
        combined_adapter(model)


class CombinedAdapter:
    """`save_pretrained` of a policy that started from adapter folders: one adapter on the true base."""

    def __init__(self, model: PeftModel, adapter_name: str | None = None):
        self.model, self.adapter_name = model, adapter_name

    def save_pretrained(self, folder, state_dict: dict | None = None, **kwargs) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config, weights = combined_adapter(self.model, self.adapter_name, state_dict)
        config.save_pretrained(str(folder))
        safetensors.torch.save_file({key: value.detach().cpu().contiguous() for key, value in weights.items()},
                                    str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


class PolicyAdapters:
    """`save_pretrained` of a PeftModel's policy adapter(s) only: the critic's goes to value_model/."""

    def __init__(self, policy: PeftModel):
        self.policy = policy

    def save_pretrained(self, folder, **kwargs) -> None:
        adapters = [name for name in self.policy.peft_config if name != CRITIC_ADAPTER]
        self.policy.save_pretrained(folder, selected_adapters=adapters, **kwargs)


def policy_export(policy):
    """What saves as the policy's folder, in every trainer's checkpoints and final output_dir (and as
    a separate LoRA critic's): one adapter on the true base when the model started from adapter
    folders, else the model itself or its adapters less a shared critic's."""
    if isinstance(policy, PeftModel) and starting_adapters(policy):
        return CombinedAdapter(policy)
    if isinstance(policy, PeftModel) and CRITIC_ADAPTER in policy.peft_config:
        return PolicyAdapters(policy)
    return policy
