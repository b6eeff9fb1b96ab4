"""What the online update needs from a rollout besides its own forward passes, for `RLTrainer` (a
mixin): log-probs without a graph (old policy, reference), advantages over every process's rows, the
KL to the reference with its adaptive coefficient, and the importance weights of a rollout another
engine sampled (vLLM) with their statistics. The trainer's `args`, `accelerator` and `kl_coef` are
read from `self`."""

from __future__ import annotations

import torch

from llmrl.algos import adaptive_kl_coef, compute_advantages, kl_penalty, masked_sum, masked_whiten, sampler_correction
from llmrl.logprobs import completion_logprobs
from llmrl.rollout import Rollout


class RolloutTerms:
    """Per-rollout terms of the online loss, computed once per rollout (no gradient)."""

    @torch.no_grad()
    def _logprobs_no_grad(self, model, rollout: Rollout) -> torch.Tensor:
        """[R, C] logprobs of the completions, micro-batch by micro-batch, no graph."""
        size = self.args.per_device_train_batch_size
        return torch.cat([
            completion_logprobs(model, rollout.input_ids[i:i + size], rollout.attention_mask[i:i + size],
                                rollout.completion_ids.shape[1], temperature=self.args.temperature)
            for i in range(0, len(rollout.group_ids), size)
        ])

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's rows of `x` ([R] or [R, C], C padded to the longest), in process order."""
        return self.accelerator.gather(self.accelerator.pad_across_processes(x, dim=1) if x.dim() == 2 else x)

    def advantages(self, rollout: Rollout, rewards: torch.Tensor, old_logprobs, ref_logprobs, old_values=None):
        """`(advantages, returns)` [R, C]. Per-token rewards (the sequence reward on the last real
        token, minus kl_coef x KL per token when the KL is in the reward), then the estimator over
        the WHOLE batch of every process, so that batch statistics (whitening, scale_rewards=batch)
        are global; each process keeps its own rows."""
        args, mask = self.args, rollout.completion_mask
        token_rewards = rollout.outcome_rewards(rewards)
        if self.kl_coef > 0 and args.kl_placement == "reward":
            token_rewards = token_rewards - self.kl_coef * kl_penalty(old_logprobs, ref_logprobs, args.kl_estimator) * mask
        group_ids = rollout.group_ids + self.accelerator.process_index * (1 << 32)  # groups never span processes
        gathered_mask = self._gather(mask)
        advantages, returns = compute_advantages(
            args.advantage_estimator, token_rewards=self._gather(token_rewards), mask=gathered_mask,
            group_ids=self._gather(group_ids), values=None if old_values is None else self._gather(old_values),
            gamma=args.gamma, lam=args.lam, scale_rewards=args.scale_rewards)
        if args.whiten_advantages:
            advantages = masked_whiten(advantages, gathered_mask)
        start, width = self.accelerator.process_index * len(rewards), mask.shape[1]
        return advantages[start:start + len(rewards), :width], returns[start:start + len(rewards), :width]

    def _sampler_weights(self, rollout: Rollout, rows, logprobs: torch.Tensor) -> torch.Tensor:
        """The importance weights [len(rows), C] of rows another engine sampled (vLLM): the trainer's
        log-probs of their tokens (`logprobs`, no gradient) against the sampler's. A weight depends
        on its own completion only, so a micro-batch's weights need no other row."""
        return self._sampler_correction(logprobs, rollout.sampler_logprobs[rows], rollout.completion_mask[rows])[0]

    def _sampler_metrics(self, rollout: Rollout, logprobs: torch.Tensor) -> dict:
        """How far the sampler's log-probs were from the trainer's `logprobs` [R, C], and the
        importance weights' statistics, over every process's tokens."""
        _, stats = self._sampler_correction(self._gather(logprobs), self._gather(rollout.sampler_logprobs),
                                            self._gather(rollout.completion_mask))
        names = {"logp_diff_mean": "sampling_logp_difference/mean", "logp_diff_max": "sampling_logp_difference/max"}
        return {f"sampling/{names.get(key, 'importance_sampling_ratio/' + key.removeprefix('ratio_'))}": value.item()
                for key, value in stats.items()}

    def _sampler_correction(self, logprobs, sampler_logprobs, mask):
        """`sampler_correction` with the run's vllm_importance_sampling_* settings."""
        args = self.args
        return sampler_correction(logprobs, sampler_logprobs, mask, args.vllm_importance_sampling_mode,
                                  args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max)

    def _update_kl_coef(self, rollout: Rollout, old_logprobs, ref_logprobs) -> dict:
        """Log the rollout's KL to the reference (k1 summed per sequence, averaged over every
        process's sequences) and the coefficient it used; with kl_target, move the coefficient for
        the next rollout (the adaptive controller)."""
        mask = rollout.completion_mask
        per_seq = masked_sum(old_logprobs - ref_logprobs, mask, dim=-1)
        real = mask.sum(-1) > 0
        totals = self.accelerator.reduce(torch.stack([per_seq[real].sum(), real.sum().float()]), "sum")
        measured, used = float(totals[0] / totals[1].clamp(min=1)), self.kl_coef
        if self.args.kl_target is not None:
            self.kl_coef = adaptive_kl_coef(self.kl_coef, measured, self.args.kl_target, self.args.kl_horizon,
                                            int(totals[1]))
        return {"kl_sequence": measured, "kl_coef": used}
