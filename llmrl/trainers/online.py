"""The online RL trainer: one loop for every on-policy preset, read top to bottom in `step()`.

    prompts -> generate n completions each -> score -> [drop flat groups, generate more]
            -> old / reference logprobs, old values -> per-token rewards -> advantages
            -> for iteration, mini-batch, micro-batch: policy loss (+ KL, + value loss) -> backward, step -> log

Generating and scoring a rollout (dynamic sampling included; llmrl's own loop or vLLM with
`use_vllm`) is `llmrl.generation`'s, and the terms computed once per rollout (old and reference
log-probs, advantages, the KL coefficient; vLLM's importance weights, per micro-batch) are
`rollout_terms`': this module is the update. PPO is the same loop with a critic
(`llmrl.trainers.critic`): the GAE estimator reads its values, and its clipped value loss joins the
policy loss in every micro-batch.

The loop never branches on an algorithm's name, only on settings (`beta > 0`, `kl_placement`,
`dynamic_sampling`, ...): the preset chose them.

Batch sizes (per process): a rollout holds R = per_device_train_batch_size x
gradient_accumulation_steps x num_mini_batches completions, R / num_generations prompts. Every
process always trains on R rows; rows that dynamic sampling could not fill are copies of a real
row with an empty completion mask, which every loss and count ignores, so every process runs the
same number of micro-batches.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from llmrl.algos import (
    aggregate_loss,
    kl_penalty,
    loss_counts,
    masked_mean,
    policy_loss,
)
from llmrl.config import ModelConfig, RLConfig
from llmrl.data import PROMPT_COLUMNS, DataError, PromptCollator, load_datasets, require_columns
from llmrl.evaluation import evaluate_policy
from llmrl.generation import SamplingParams, make_engine
from llmrl.generation.collect import RolloutCollector
from llmrl.generation.engine import refuse_quantized_base
from llmrl.logprobs import completion_logprobs
from llmrl.models import disable_dropout, load_policy, load_tokenizer
from llmrl.reference import build_reference
from llmrl.rewards.model import as_list, resolve_rewards
from llmrl.rollout import Rollout
from llmrl.trainers.checkpoint import save_recipe
from llmrl.trainers.common import (
    TrainResult,
    adamw,
    gathered_state_dict,
    loss_scale,
    lr_schedule,
    make_accelerator,
    reduce_metrics,
    replay_batches,
    to_device,
)
from llmrl.trainers.critic import Critic
from llmrl.trainers.guards import NonFiniteGuard, norm_value
from llmrl.trainers.launch import refuse_unsharded_copies
from llmrl.trainers.rollout_terms import RolloutTerms
from llmrl.trainers.saving import SavedRun
from llmrl.trainers.signals import StopOnSignal, stop_if_requested
from llmrl.trainers.tracking import RunLogger, append_jsonl, drop_rows_after

logger = logging.getLogger(__name__)

VALUE_MODEL_DIR = "value_model"  # PPO's critic, inside the output folder and each checkpoint


class RLTrainer(RolloutTerms, SavedRun):
    """Online RL on a causal LM. `RLTrainer(model, args, train_dataset, reward_funcs=...).train()`.

    Args:
        model: a hub name, a local folder or a model object.
        args: an `RLConfig` (its preset already resolved).
        train_dataset: a `datasets.Dataset` with a `prompt` column (string or chat messages); other
            columns go to the reward functions as keyword arguments.
        eval_dataset: prompts scored every `eval_steps` and at the end (one completion each,
            greedy unless `eval_do_sample`).
        reward_funcs: functions, built-in names or 'module:function' strings, added to
            `args.reward_funcs`.
        processing_class: the tokenizer (default: the model's).
        peft_config: a peft `LoraConfig` to train an adapter (or set use_peft in model_config).
        model_config: how to load the model (dtype, LoRA, ...); default: plain float32 loading.
        config: the settings to record with the trackers (default: `args`).
    """

    def __init__(self, model, args: RLConfig, train_dataset, reward_funcs=None, processing_class=None,
                 peft_config=None, model_config: ModelConfig | None = None, eval_dataset=None,
                 config: dict | None = None):
        self.args = args
        self.accelerator = make_accelerator(args)
        set_seed(args.seed, device_specific=True)  # each process samples different completions
        model_config = model_config or ModelConfig(model_name_or_path=model if isinstance(model, str) else None)
        refuse_quantized_base(args.use_vllm and model_config.load_in_4bit)  # before anything loads
        self.tokenizer = processing_class or load_tokenizer(model_config)
        self.tokenizer.padding_side = "left"
        # GAE needs a critic; every other estimator is critic-free. Made before LoRA wraps a policy object in place.
        self.critic = Critic(self.accelerator, args, model_config, model, self.tokenizer,
                             peft_config) if args.advantage_estimator == "gae" else None
        policy = load_policy(model_config, model=model, peft_config=peft_config)
        self.reference = build_reference(policy, model_config, needed=args.uses_kl)
        if self.reference is not None:
            self.reference.autocast = self.accelerator.autocast  # as the prepared policy computes
        if self.reference is not None and not self.reference.shares_policy:
            to_device(self.reference.model, self.accelerator)  # a frozen copy: prepare() moves only the policy
        self.kl_coef = args.beta  # moved by the adaptive controller when kl_target is set
        self.reward_funcs = resolve_rewards([*args.reward_funcs, *as_list(reward_funcs)], args.reward_model_name_or_path,
                                            model_config=model_config, batch_size=args.per_device_train_batch_size,
                                            device=self.accelerator.device)
        refuse_unsharded_copies(self.accelerator, [role for role, held in (
            ("frozen reference copy", self.reference is not None and not self.reference.shares_policy),
            ("reward model", args.reward_model_name_or_path is not None)) if held])
        if not self.reward_funcs:
            raise ValueError("No reward: set reward_funcs in the recipe (e.g. [accuracy]), reward_model_name_or_path, "
                             "or pass reward_funcs=.")
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(args.reward_weights)} values for {len(self.reward_funcs)} "
                             f"rewards {[name for name, _ in self.reward_funcs]}: give one each.")
        require_columns(train_dataset, PROMPT_COLUMNS, "train_dataset")
        if eval_dataset is not None:
            require_columns(eval_dataset, PROMPT_COLUMNS, "eval_dataset")
        self.eval_dataset = eval_dataset

        self.rollout_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.num_mini_batches
        self.prompts_per_rollout = self.rollout_size // args.num_generations
        generator = torch.Generator().manual_seed(args.seed)
        loader = DataLoader(train_dataset, batch_size=self.prompts_per_rollout, shuffle=True, drop_last=True,
                            generator=generator, collate_fn=PromptCollator(self.tokenizer, args.max_prompt_length))
        optimizer = adamw(policy.parameters(), args)
        if self.critic is not None:
            self.critic.attach(policy)  # a shared critic's adapter and head: before prepare, so DDP sees them
        if args.disable_dropout:  # after attach: the critic's adapter brings its own lora_dropout
            for module in (policy, self.reference and self.reference.model, self.critic and self.critic.model):
                if module is not None:
                    disable_dropout(module)
        self.model, self.optimizer, self.loader = self.accelerator.prepare(policy, optimizer, loader)
        if len(self.loader) == 0:  # else replay_batches would loop for ever over an empty loader
            raise DataError(
                f"train_dataset has {len(train_dataset)} prompts, fewer than one rollout draws: "
                f"{self.prompts_per_rollout} per process x {self.accelerator.num_processes} process(es) (a rollout is "
                "per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches completions, "
                "num_generations per prompt). Add prompts, or lower one of those settings.")
        unwrapped = self.accelerator.unwrap_model(self.model)
        engine = make_engine(unwrapped, args, self.accelerator, max(self.rollout_size, args.per_device_eval_batch_size))
        self.collector = RolloutCollector(engine, SamplingParams.of(args, unwrapped, self.tokenizer), args,
                                          self.tokenizer, self.reward_funcs, self.accelerator, self.rollout_size)
        self.max_steps = self._total_steps()
        self.scheduler = lr_schedule(self.optimizer, args, self.max_steps)
        if self.critic is not None:
            self.critic.prepare(self.model, self.max_steps)
        self._config = config if config is not None else vars(args)
        self.logger: RunLogger | None = None
        self.guard = NonFiniteGuard(self.accelerator)
        self.global_step = 0
        self.batches_consumed = 0  # prompt batches drawn so far: the data position a resume restores

    def _total_steps(self) -> int:
        """Optimizer steps: max_steps, or epochs over the prompts (num_mini_batches x num_iterations each)."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        rollouts = math.ceil(self.args.num_train_epochs * len(self.loader))
        return rollouts * self.args.num_mini_batches * self.args.num_iterations

    # ---- generate and score (llmrl.generation) ------------------------------------------------

    def generate_and_score(self, batches) -> tuple[Rollout, torch.Tensor, dict]:
        """One rollout of R rows, generated and scored (`RolloutCollector.collect`): the rollout, the
        reward of each row [R] and the rollout's metrics. `batches` yields (batches consumed, batch)."""
        def drawn():
            for self.batches_consumed, batch in batches:  # the data position, as each batch is drawn
                yield batch

        rollout, rewards, metrics = self.collector.collect(drawn(), trainer_state=lambda: self.state)
        self.samples = self.collector.samples
        return rollout, rewards, metrics

    # ---- the update -------------------------------------------------------------------------

    def _micro_loss(self, rollout: Rollout, rows, old_logprobs, ref_logprobs, advantages, counts,
                    trainer_logprobs=None):
        """The policy loss of one micro-batch, normalised by the whole optimizer step's counts.
        `trainer_logprobs` [R, C]: given when another engine sampled the rollout (vLLM), to correct
        the loss by importance weights; the old log-probs of these rows are written into it."""
        args, mask = self.args, rollout.completion_mask[rows]
        logprobs, entropy = completion_logprobs(self.model, rollout.input_ids[rows], rollout.attention_mask[rows],
                                                mask.shape[1], temperature=args.temperature, with_entropy=True)
        old = logprobs.detach() if old_logprobs is None else old_logprobs[rows]
        per_token, metrics = policy_loss(args.policy_loss, logprobs=logprobs, old_logprobs=old,
                                         advantages=advantages[rows], mask=mask, epsilon=args.epsilon,
                                         epsilon_high=args.epsilon_high, dual_clip=args.dual_clip)
        if trainer_logprobs is not None:  # the sampler was not exactly the policy (vLLM): importance weights
            trainer_logprobs[rows] = old
            per_token = per_token * self._sampler_weights(rollout, rows, old)
        if self.kl_coef > 0 and args.kl_placement == "loss":
            kl = kl_penalty(logprobs, ref_logprobs[rows], args.kl_estimator)
            per_token = per_token + self.kl_coef * kl
            metrics["kl"] = masked_mean(kl.detach(), mask)
        loss = aggregate_loss(per_token, mask, args.loss_agg_mode, num_tokens=counts[0], num_seqs=counts[1],
                              max_len=args.max_completion_length)
        metrics["entropy"] = masked_mean(entropy.detach(), mask)
        return loss, metrics

    def _policy_parameters(self):
        """What the policy's gradient clipping covers: its module, less a shared critic's adapter and head."""
        if self.critic is not None and self.critic.shared:
            return [p for group in self.optimizer.param_groups for p in group["params"]]
        return self.model.parameters()  # under FSDP, accelerate clips only a prepared model's own parameters()

    def _step_counts(self, mask: torch.Tensor) -> torch.Tensor:
        """(num_tokens, num_seqs) of one optimizer step's rows, summed over every process."""
        return self.accelerator.reduce(torch.stack(loss_counts(mask)).float(), "sum")

    def _means(self, step_metrics: dict[str, list]) -> dict[str, float]:
        """Each metric's mean over the step's micro-batches. Kept on the device until here and read
        in one transfer: a `float()` per metric per micro-batch would make the host wait for the
        GPU each time, leaving it idle while the next micro-batch's kernels are launched."""
        device = self.accelerator.device
        means = torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach()
                                          for v in values]).mean() for values in step_metrics.values()])
        return dict(zip(step_metrics, means.tolist()))

    def step(self, batches) -> dict:
        """One rollout and its updates; returns the metrics to log."""
        args, start = self.args, time.perf_counter()
        rollout, rewards, metrics = self.generate_and_score(batches)
        rollout = rollout.to(self.accelerator.device)
        rewards = rewards.to(self.accelerator.device)
        updates = args.num_iterations * args.num_mini_batches
        if self.guard.first_nonfinite(reward=rewards) is not None:  # e.g. a reward that overflowed
            return self._skip_rollout(metrics, updates, nonfinite="reward")
        if self._step_counts(rollout.completion_mask)[1] == 0:
            if metrics["rewards/scorable_rows"] == 0:
                logger.warning(
                    "step %d: every reward function returned None (not applicable) for every completion, so "
                    "nothing can be learned; skipping this update. Check that the reward functions apply to "
                    "this dataset's rows (their columns, e.g. 'answer').", self.global_step)
            else:
                logger.warning(
                    "step %d: no completion was kept (every group's rewards were equal in %d generated batches); "
                    "skipping this update. Raise max_gen_batches or num_generations, or check the reward functions.",
                    self.global_step, metrics["dynamic_sampling/gen_batches"])
            return self._skip_rollout(metrics, updates)
        on_policy = args.num_iterations == 1 and args.num_mini_batches == 1
        # Exactly on-policy, the old logprobs are the detached current ones (no extra pass), unless
        # the KL must be known before the update: in the reward, or for the adaptive controller.
        # vLLM's importance weights need no extra pass either: each row's weight is its own
        # tokens' old log-probs against vLLM's, and on-policy those come from the update's forward.
        kl_first = self.reference is not None and (args.kl_placement == "reward" or args.kl_target is not None)
        needs_old = not on_policy or kl_first
        size = args.per_device_train_batch_size
        old_logprobs = self._logprobs_no_grad(self.model, rollout) if needs_old else None
        corrected = rollout.sampler_logprobs is not None and args.vllm_importance_sampling_correction
        trainer_logprobs = torch.zeros_like(rollout.sampler_logprobs) if corrected else None
        ref_logprobs = self._logprobs_no_grad(self.reference, rollout) if self.reference is not None else None
        old_values = self.critic.values(rollout, size) if self.critic is not None else None
        advantages, returns = self.advantages(rollout, rewards, old_logprobs, ref_logprobs, old_values)
        valid = rollout.completion_mask.bool()
        if self.guard.first_nonfinite(advantages=advantages[valid]) is not None:
            return self._skip_rollout(metrics, updates, nonfinite="advantages")
        if old_logprobs is not None and ref_logprobs is not None:  # after: this rollout used the old coefficient
            metrics.update(self._update_kl_coef(rollout, old_logprobs, ref_logprobs))
        metrics["advantages/mean"] = advantages[valid].mean().item() if valid.any() else 0.0
        metrics["advantages/std"] = advantages[valid].std().item() if valid.sum() > 1 else 0.0
        if self.critic is not None:
            metrics.update(Critic.rollout_metrics(old_values, returns, rollout.completion_mask))

        self.model.train()
        accum = args.gradient_accumulation_steps
        models = self._trained_models()
        step_metrics: dict[str, list] = {}
        for _ in range(args.num_iterations):
            order = torch.randperm(self.rollout_size) if args.num_mini_batches > 1 else torch.arange(self.rollout_size)
            for mb in range(args.num_mini_batches):
                rows = order[mb * size * accum:(mb + 1) * size * accum]
                counts = self._step_counts(rollout.completion_mask[rows])
                if counts[1] == 0:  # only filler rows (dynamic sampling fell short): AdamW's momentum and
                    self._skip_update()  # weight decay would still move the weights with no data
                    continue
                losses = {}  # this process's share of the step's loss (and value loss)
                for k in range(accum):
                    micro = rows[k * size:(k + 1) * size]
                    # accelerate's accumulation contract: gradients sync (DDP, FSDP) and DeepSpeed's
                    # engine steps on the last micro-batch of the step only (sync_gradients).
                    with self.accelerator.accumulate(*models):
                        loss, m = self._micro_loss(rollout, micro, old_logprobs, ref_logprobs, advantages, counts,
                                                   trainer_logprobs)
                        losses["loss"] = losses.get("loss", 0.0) + loss.detach()
                        if self.critic is not None:
                            critic_loss, critic_metrics = self.critic.loss(rollout, micro, old_values, returns, counts)
                            loss = loss + args.vf_coef * critic_loss
                            losses["critic/value_loss"] = losses.get("critic/value_loss", 0.0) + critic_loss.detach()
                            m.update(critic_metrics)
                        self.accelerator.backward(loss * loss_scale(self.accelerator))
                    for key, value in m.items():
                        step_metrics.setdefault(key, []).append(value)
                # The step's loss is the sum of every micro-batch's share on every process; train()
                # averages metrics over processes, so each reports its sum times the process count.
                for key, value in losses.items():
                    step_metrics.setdefault(key, []).append(value * self.accelerator.num_processes)
                max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")  # inf: measure, do not clip
                grad_norm = norm_value(self.accelerator.clip_grad_norm_(self._policy_parameters(), max_norm))
                term = self.guard.first_nonfinite(loss=losses["loss"], value_loss=losses.get("critic/value_loss"),
                                                  gradient=grad_norm)
                if term is not None:  # the weights, Adam's moments and the critic stay as they are
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.critic is not None:
                        self.critic.optimizer.zero_grad(set_to_none=True)
                    self.guard.skipped(self.global_step + 1, term.replace("_", " "))
                    self._skip_update()
                    continue
                self.guard.passed()
                if grad_norm is not None:  # DeepSpeed clips inside its step and may not report a norm
                    step_metrics.setdefault("grad_norm", []).append(grad_norm)
                step_metrics.setdefault("learning_rate", []).append(self.scheduler.get_last_lr()[0])
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.critic is not None:
                    for key, value in self.critic.step().items():
                        step_metrics.setdefault(key, []).append(value)
                self.global_step += 1
        if step_metrics:
            metrics.update(self._means(step_metrics))
        if trainer_logprobs is not None:
            metrics.update(self._sampler_metrics(rollout, trainer_logprobs))
        real = rollout.attention_mask * (rollout.completion_mask.sum(-1, keepdim=True) > 0)  # filler rows aside
        tokens = self.accelerator.reduce(real.sum().float(), "sum")  # every process's prompts and completions
        elapsed = time.perf_counter() - start
        metrics["step_time"] = elapsed
        metrics["tokens_per_second"] = float(tokens) / elapsed
        return metrics

    def _skip_rollout(self, metrics: dict, updates: int, nonfinite: str | None = None) -> dict:
        """Every update of this rollout skipped; a `nonfinite` term counts towards stopping the run."""
        for _ in range(updates):
            if nonfinite is not None:
                self.guard.skipped(self.global_step + 1, nonfinite)
            self._skip_update()
        return {**metrics, "skipped": 1.0}

    def _skip_update(self):
        """An optimizer step with nothing to learn from: the weights stay, the step count and the
        schedule (which follows it) move on."""
        with warnings.catch_warnings():  # torch warns of a scheduler step with no optimizer step yet: intended
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
            if self.critic is not None:
                self.critic.scheduler.step()
        self.global_step += 1

    def _crosses(self, every: int, before: int) -> bool:
        """Did the last rollout's updates (steps before+1 .. global_step) reach a multiple of `every`?"""
        return every > 0 and self.global_step // every > before // every

    def train(self) -> TrainResult:
        """Train to `max_steps`; returns the log history (train and `eval/` records)."""
        resumed = self._resume()
        skip = resumed["batches_consumed"] if resumed else 0
        if resumed:
            self.kl_coef = resumed.get("kl_coef", self.kl_coef)
            if self.accelerator.is_main_process:
                drop_rows_after(Path(self.args.output_dir) / "completions.jsonl", self.global_step)
        self.logger = RunLogger(self.accelerator, self.args, self.max_steps, self._config, self.global_step)
        batches = replay_batches(self.loader, skip)
        self.model.train()
        with self.logger, StopOnSignal() as stop:
            while self.global_step < self.max_steps:
                before = self.global_step
                metrics = self.step(batches)
                metrics = reduce_metrics(self.accelerator, metrics)
                self.logger.log(metrics, self.global_step)
                if self._crosses(self.args.log_completions_steps, before) and self.accelerator.is_main_process:
                    append_jsonl(Path(self.args.output_dir) / "completions.jsonl",
                                 [{"step": self.global_step, **row} for row in self.samples])
                if self.eval_dataset is not None and self._crosses(self.args.eval_steps, before):
                    self.evaluate()
                checkpoint = self.save_checkpoint() if self._crosses(self.args.save_steps, before) else None
                stop_if_requested(self, stop, checkpoint)
        if self.eval_dataset is not None and not self._crosses(self.args.eval_steps, self.global_step - 1):
            self.evaluate()
        self.logger.close()
        self.save_model(self.args.output_dir)
        return TrainResult(self.log_history, self.global_step)

    def evaluate(self, dataset=None) -> dict:
        """Score one completion per prompt of `dataset` (default: the eval dataset); logs and
        returns the metrics prefixed `eval/`."""
        args = self.args
        dataset = dataset if dataset is not None else self.eval_dataset
        metrics, _ = evaluate_policy(
            self.accelerator.unwrap_model(self.model), self.tokenizer, dataset, self.reward_funcs,
            reward_weights=args.reward_weights, batch_size=args.per_device_eval_batch_size,
            max_prompt_length=args.max_prompt_length, max_completion_length=args.max_completion_length,
            do_sample=args.eval_do_sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            accelerator=self.accelerator, trainer_state=self.state, engine=self.collector.engine)
        if self.logger is None:
            return {f"eval/{key}": value for key, value in metrics.items()}
        record = self.logger.log(metrics, self.global_step, prefix="eval/")
        return {key: value for key, value in record.items() if key != "step"}

    def _exports(self, folder: str) -> dict:
        """The policy's folder (`SavedRun._exports`) and PPO's critic at value_model/."""
        exports = super()._exports(folder)
        if self.critic is not None:
            critic = self.critic.model if not self.critic.shared else self.model
            exports[VALUE_MODEL_DIR] = (self.critic.export(), gathered_state_dict(self.accelerator, critic))
        return exports

    def _trained_models(self) -> list:
        """The prepared models whose weights train: the policy, and a separate critic."""
        return [self.model] + ([self.critic.model] if self.critic is not None and not self.critic.shared else [])

    def _schedulers(self) -> list:
        """The run's LR schedules, in the order checkpoints keep them: the policy's, then the critic's."""
        return [self.scheduler] + ([self.critic.scheduler] if self.critic is not None else [])

    def _checkpoint_state(self) -> dict:
        return {**super()._checkpoint_state(), "kl_coef": self.kl_coef}


def run(recipe):
    """`llmrl train` for the online presets: the recipe's data and model through `RLTrainer`."""
    train_rows, eval_rows = load_datasets(recipe.data, required=PROMPT_COLUMNS)
    trainer = RLTrainer(recipe.model.model_name_or_path, recipe.args, train_rows, model_config=recipe.model,
                        eval_dataset=eval_rows, config=recipe.to_dict())
    save_recipe(recipe, trainer.accelerator)
    return trainer.train()
