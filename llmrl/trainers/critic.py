"""PPO's critic: a value model with its own optimizer and schedule, trained in the policy's loop.

The critic gives a value per token: the states before each completion token (`llmrl.models.token_values`).
It takes one of two forms, chosen by `share_critic_base` (`llmrl.trainers.shared_critic.critic_shares_base`):

- shared (LoRA, by default when the critic starts from the policy): a second LoRA adapter and a
  zero value head on the policy's own PeftModel, so policy, reference and critic share one frozen
  base. It saves as a TOKEN_CLS adapter folder, the same form as the separate LoRA critic.
- separate: an `AutoModelForTokenClassification` with one label (`llmrl.models.load_value_model`),
  initialised from `value_model_name_or_path`, else the reward model, else the policy's weights;
  with `use_peft` it trains its own LoRA adapter (task TOKEN_CLS, head trained in full) on its own
  frozen copy of the base.

Either way it has its own AdamW (`value_learning_rate`), gradient clipping and schedule. `values()`
gives the rollout's old values; `loss()` the clipped value loss of one micro-batch, normalised by
the whole step's counts like the policy loss, and added to it for one backward; `step()` the optimizer.

The trainer builds it in three steps, because LoRA wraps a policy object in place and DDP must see
every trainable parameter: `Critic(...)` before the policy loads (a separate critic copies its
source while it is still plain), `attach(policy)` before `accelerator.prepare(policy)`, then
`prepare(model, max_steps)`.
"""

from __future__ import annotations

import torch
from accelerate.utils import DistributedType
from peft import get_peft_model

from llmrl.adapters import check_chain, policy_export
from llmrl.algos import aggregate_loss, explained_variance, masked_mean, value_loss, value_loss_metrics
from llmrl.models import enable_checkpointing, load_value_model, lora_config, token_values
from llmrl.trainers.common import adamw, lr_schedule
from llmrl.trainers.shared_critic import SharedCriticExport, SharedValueModel, add_critic, critic_shares_base


def _check_same_tokens(source: str, tokenizer) -> None:
    """The critic reads the policy's token ids; one initialised from a model with another vocabulary
    (a reward model of another family) would read them as other tokens, silently."""
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return  # no tokenizer saved with it: nothing to compare (its embedding size is checked on load)
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"The critic would start from {source!r}, whose tokenizer differs from the policy's, but it reads the "
            "policy's token ids. Set value_model_name_or_path to the policy's model (the critic then starts from "
            "the policy), or use a reward model trained from the policy's family.")


class Critic:
    """The value model of one run (prepared by `accelerator`), its AdamW and LR schedule."""

    def __init__(self, accelerator, args, model_config, policy_source, tokenizer, peft_config=None):
        self.accelerator, self.args, self.model_config = accelerator, args, model_config
        self.shared = critic_shares_base(args, model_config, policy_source, peft_config, accelerator.distributed_type)
        if not self.shared and accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError(
                "PPO with a separate critic under DeepSpeed: accelerate would wrap the policy and the critic in two "
                "DeepSpeed engines, which llmrl's one backward does not drive. Launch with the ddp or fsdp2 config "
                "(recipes/accelerate/), or use LoRA with a critic that starts from the policy (share_critic_base).")
        self._parameters = None  # a shared critic's adapter and head, once attached
        self.model = None if self.shared else self._own_model(policy_source, tokenizer)

    def _own_model(self, policy_source, tokenizer):
        args, model_config = self.args, self.model_config
        source = args.value_model_name_or_path or args.reward_model_name_or_path or policy_source
        if source is not policy_source:
            _check_same_tokens(source, tokenizer)
        model = load_value_model(source, model_config, pad_token_id=tokenizer.pad_token_id)
        if model_config.gradient_checkpointing:
            enable_checkpointing(model)
        if model_config.use_peft:
            model = get_peft_model(model, lora_config(model_config, "TOKEN_CLS"))
            check_chain(model)
            if model_config.gradient_checkpointing:
                model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need a grad input
        return model

    def attach(self, policy) -> None:
        """A shared critic adds its adapter and head to the (unprepared) policy; a separate one does nothing."""
        self._parameters = add_critic(policy, self.model_config.gradient_checkpointing) if self.shared else None

    def prepare(self, policy_model, max_steps: int) -> None:
        """The optimizer and schedule, once the policy is prepared (`policy_model`, which a shared critic runs)."""
        args, accelerator = self.args, self.accelerator
        optimizer = adamw(self._parameters or self.model.parameters(), args, lr=args.value_learning_rate)
        if self.shared:
            # `model` is the policy's module (one DDP wrapper, one no_sync); the critic's forward bypasses
            # the wrapper, and its gradients are still all-reduced: the policy's forward through the
            # wrapper, in the same micro-batch, arms DDP's hooks for every parameter of the module.
            self.model, self.optimizer = policy_model, accelerator.prepare(optimizer)
            self.value_model = SharedValueModel(accelerator.unwrap_model(policy_model))
        else:
            self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
            self.value_model = self.model
        self.scheduler = lr_schedule(self.optimizer, args, max_steps)

    @torch.no_grad()
    def values(self, rollout, batch_size: int) -> torch.Tensor:
        """[R, C] values of the states before each completion token, no graph."""
        num_completion = rollout.completion_ids.shape[1]
        return torch.cat([
            token_values(self.value_model, rollout.input_ids[i:i + batch_size], rollout.attention_mask[i:i + batch_size],
                         num_completion)
            for i in range(0, len(rollout.group_ids), batch_size)
        ])

    def loss(self, rollout, rows, old_values, returns, counts) -> tuple[torch.Tensor, dict]:
        """The clipped value loss of micro-batch `rows`, aggregated like the policy loss (its share
        of the step's value loss), and its clip fraction."""
        mask = rollout.completion_mask[rows]
        values = token_values(self.value_model, rollout.input_ids[rows], rollout.attention_mask[rows], mask.shape[1])
        per_token = value_loss(values, old_values[rows], returns[rows], mask, self.args.cliprange_value)
        loss = aggregate_loss(per_token, mask, self.args.loss_agg_mode, num_tokens=counts[0], num_seqs=counts[1],
                              max_len=self.args.max_completion_length)
        metrics = value_loss_metrics(values, old_values[rows], returns[rows], mask, self.args.cliprange_value)
        return loss, {"critic/vf_clipfrac": metrics["vf_clipfrac"]}  # the trainer logs the step's value loss

    def step(self) -> dict:
        """Clip, step and zero the critic's gradients (after the policy's backward)."""
        metrics = {}
        if self.args.max_grad_norm > 0:
            # A shared critic clips its own parameters only; a separate one its whole module (FSDP needs that).
            parameters = self._parameters if self.shared else self.model.parameters()
            norm = self.accelerator.clip_grad_norm_(parameters, self.args.max_grad_norm)
            metrics["critic/grad_norm"] = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    @staticmethod
    def rollout_metrics(old_values, returns, mask) -> dict:
        """How well the values at rollout time predict the returns they are trained towards."""
        return {"critic/explained_variance": float(explained_variance(old_values, returns, mask)),
                "critic/value_mean": float(masked_mean(old_values, mask)),
                "critic/returns_mean": float(masked_mean(returns, mask))}

    def export(self):
        """What `save_pretrained` writes as value_model/: the unwrapped value model, or the shared
        critic as a TOKEN_CLS adapter folder."""
        if self.shared:
            return SharedCriticExport(self.accelerator.unwrap_model(self.model))
        return policy_export(self.accelerator.unwrap_model(self.model))  # from an adapter folder: one adapter
