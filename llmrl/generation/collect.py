"""One rollout of the online trainer: generate, score, shape, and (dynamic sampling) keep only
informative groups, generating more prompt batches until the rollout is full.

    collector = RolloutCollector(engine, params, args, tokenizer, reward_funcs, accelerator, rollout_size)
    rollout, rewards, metrics = collector.collect(batches, trainer_state=lambda: trainer.state)

The update loop (`llmrl.trainers.online`) only sees the finished rollout: R rows, the reward of
each, and the generation metrics of every process's completions.
"""

from __future__ import annotations

import time

import torch

from llmrl.evaluation import sample_rows, score_rollout
from llmrl.rewards import overlong_penalty
from llmrl.rollout import Rollout, concat_rollouts, informative_groups


class RolloutCollector:
    """Makes rollouts of `rollout_size` rows per process with `engine` (`llmrl.generation.engine`)."""

    def __init__(self, engine, params, args, tokenizer, reward_funcs: list, accelerator, rollout_size: int):
        self.engine, self.params, self.args = engine, params, args
        self.tokenizer, self.reward_funcs, self.accelerator = tokenizer, reward_funcs, accelerator
        self.rollout_size = rollout_size
        self.prompts_per_rollout = rollout_size // args.num_generations
        names = [name for name, _ in reward_funcs]
        if args.dynamic_sampling_metric not in ("reward", *names):
            raise ValueError(f"dynamic_sampling_metric={args.dynamic_sampling_metric!r} must be 'reward' (the total, "
                             f"shaping included) or the name of a reward function: {names}.")
        # Which reward decides that a group is flat: the shaped total by default (a flat total means
        # zero advantages), or one function, e.g. accuracy as in the DAPO paper.
        self.filter_column = None if args.dynamic_sampling_metric == "reward" else names.index(
            args.dynamic_sampling_metric)
        self.samples: list[dict] = []  # the first batch's scored rows, for completions.jsonl

    def score(self, batch: dict, rollout: Rollout, trainer_state=None):
        """`(total [N], per_function [N, F], metrics, samples)`: the weighted reward with overlong and
        missing-EOS shaping, each function's rewards (NaN = not applicable), the shaping's mean and
        what the functions logged, and the rows for completions.jsonl."""
        args = self.args
        prompts, completions, columns, result = score_rollout(rollout, batch, self.tokenizer, self.reward_funcs,
                                                              args.reward_weights, args.num_generations, trainer_state)
        total = result.total.to(rollout.completion_mask.device)
        metrics = dict(result.metrics)  # what the reward functions logged with log_metric
        if args.overlong_penalty_factor > 0:
            lengths = torch.where(rollout.truncated, args.max_completion_length + 1, rollout.completion_lengths)
            penalty = overlong_penalty(lengths, args.max_completion_length, args.overlong_buffer_len,
                                       args.overlong_penalty_factor).to(total.device)
            total = total + penalty
            metrics["rewards/overlong_penalty"] = penalty.mean().item()
        if args.missing_eos_penalty:
            total = total - args.missing_eos_penalty * rollout.truncated.float()
        samples = sample_rows(prompts, completions, columns, result,
                              {**result.extra, "shaped_reward": total.tolist(), "truncated": rollout.truncated.tolist()})
        return total, result.rewards.to(total.device), metrics, samples

    def collect(self, batches, trainer_state=lambda: None) -> tuple[Rollout, torch.Tensor, dict]:
        """One rollout of R rows from the prompt batches `batches` draws: generate, score, and
        (dynamic sampling) keep only informative groups, generating more batches until R rows are
        kept or max_gen_batches is reached. `trainer_state()`: what reward functions get as such.

        Returns the rollout padded to R rows (filler rows have an empty completion mask), the reward
        of each row [R] (0 on filler) and the rollout's metrics."""
        args = self.args
        kept, kept_rewards, generated_rows, shaping = [], [], [], []
        generated = 0
        start = time.perf_counter()
        self.engine.sync_weights()  # an engine with its own copy of the weights samples from the updated policy
        sync_time, generation_time = time.perf_counter() - start, 0.0
        while True:
            batch = next(batches)
            start = time.perf_counter()
            rollout = self.engine.generate(batch, args.num_generations, self.params)
            generation_time += time.perf_counter() - start
            rewards, per_function, shaping_metrics, samples = self.score(batch, rollout, trainer_state())
            if generated == 0:
                self.samples = samples
            rollout.group_ids = rollout.group_ids + generated * self.prompts_per_rollout  # unique per batch
            generated += 1
            generated_rows.append(torch.cat([rewards[:, None], per_function, rollout.completion_lengths[:, None].float(),
                                             rollout.truncated[:, None].float()], dim=1))
            shaping.append(shaping_metrics)
            keep = ~rewards.isnan()  # a row no reward function applied to is not a sample
            if args.dynamic_sampling:
                metric = rewards if self.filter_column is None else per_function[:, self.filter_column]
                keep &= informative_groups(metric.nan_to_num(0.0), rollout.group_ids)
            kept.append(rollout.select(keep))
            kept_rewards.append(rewards[keep])
            filler = rollout
            full = sum(len(r) for r in kept_rewards) >= self.rollout_size
            done = not args.dynamic_sampling or full or generated >= args.max_gen_batches
            # Every process generates the same number of batches: generation is a collective under
            # FSDP / ZeRO-3, and the update that follows must be entered together.
            if self.accelerator.reduce(torch.tensor(float(not done), device=self.accelerator.device), "sum") == 0:
                break
        pad_id = self.tokenizer.pad_token_id
        num_kept = sum(len(r) for r in kept_rewards)
        rewards = torch.cat(kept_rewards)[: self.rollout_size]
        rollout = concat_rollouts(kept, pad_id).select(slice(0, self.rollout_size)).pad_rows(
            self.rollout_size, filler, pad_id)
        metrics = self.generation_metrics(torch.cat(generated_rows))
        metrics.update({key: sum(m[key] for m in shaping) / len(shaping) for key in shaping[0]})
        metrics["dynamic_sampling/kept_ratio"] = num_kept / (generated * self.rollout_size)  # before the cut to R
        metrics["dynamic_sampling/gen_batches"] = generated
        metrics["generation_time"], metrics["weight_sync_time"] = generation_time, sync_time
        metrics["dynamic_sampling/kept_rows"] = len(rewards)
        return rollout, torch.nn.functional.pad(rewards, (0, self.rollout_size - len(rewards))), metrics

    def generation_metrics(self, rows: torch.Tensor) -> dict:
        """Reward, per-function and length statistics over every completion generated for this
        rollout by every process. `rows` [N, 1 + F + 2]: total reward, each function's reward (NaN
        = not applicable), length, truncated. Gathered first, so the std and max are the whole
        batch's, not an average of each process's."""
        rows = self.accelerator.gather(rows.to(self.accelerator.device)).cpu().double()
        names = ["reward", *(f"rewards/{name}" for name, _ in self.reward_funcs)]
        metrics = {"rewards/scorable_rows": int((~rows[:, 0].isnan()).sum())}
        for column, name in enumerate(names):
            values = rows[:, column][~rows[:, column].isnan()]
            metrics[name] = values.mean().item() if len(values) else float("nan")
            metrics[f"{name}_std" if column else "reward_std"] = values.std().item() if len(values) > 1 else float("nan")
        lengths, truncated = rows[:, -2], rows[:, -1]
        metrics.update({"completions/mean_length": lengths.mean().item(), "completions/max_length": lengths.max().item(),
                        "completions/truncated_ratio": truncated.mean().item()})
        return metrics
