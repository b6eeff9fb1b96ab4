"""Score a rollout with reward functions, and evaluate a policy on a prompt dataset.

`evaluate_policy` is what the online trainer runs every `eval_steps` and what `llmrl eval` runs
on a saved model: one completion per prompt (greedy unless sampling is asked for), every reward
function's mean, `accuracy` when an `accuracy` function is among them, and per-sample rows.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from llmrl.data import PROMPT_COLUMNS, PromptCollator, require_columns
from llmrl.generation.engine import SamplingParams, TransformersEngine
from llmrl.rewards import RewardResult, score_completions
from llmrl.rollout import Rollout, stop_token_ids


def score_rollout(rollout: Rollout, batch: dict, tokenizer, reward_funcs, reward_weights=None,
                  num_generations: int = 1, trainer_state=None) -> tuple[list, list, dict, RewardResult]:
    """Decode a rollout of `batch` (a `PromptCollator` batch) and score it (`trainer_state`: what
    the reward functions get as such, the trainer's `state`).

    Returns (prompts, completions, columns, result), each list one entry per rollout row. Chat
    prompts get their completions as assistant messages, as TRL passes them to reward functions."""
    n = num_generations
    completions = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    prompts = [p for p in batch["prompts"] for _ in range(n)]
    if isinstance(batch["prompts"][0], list):
        completions = [[{"role": "assistant", "content": text}] for text in completions]
    columns = {key: [v for v in values for _ in range(n)] for key, values in batch["columns"].items()}
    ids = [row[mask.bool()].tolist() for row, mask in zip(rollout.completion_ids, rollout.completion_mask)]
    result = score_completions(reward_funcs, reward_weights, prompts, completions, columns, completion_ids=ids,
                               trainer_state=trainer_state)
    return prompts, completions, columns, result


def sample_rows(prompts, completions, columns, result: RewardResult, extra: dict | None = None) -> list[dict]:
    """One JSON-ready dict per completion: prompt, completion, total reward, each function's reward
    (None where it did not apply), the dataset columns and any `extra` per-row values."""
    rows = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        rewards = {name: (None if torch.isnan(value) else float(value))
                   for name, value in zip(result.names, result.rewards[i])}
        total = result.total[i]
        rows.append({"prompt": prompt, "completion": completion,
                     "reward": None if torch.isnan(total) else float(total), "rewards": rewards,
                     **{key: values[i] for key, values in columns.items()},
                     **{key: values[i] for key, values in (extra or {}).items()}})
    return rows


@torch.no_grad()
def evaluate_policy(model, tokenizer, dataset, reward_funcs, *, reward_weights=None, batch_size: int = 8,
                    max_prompt_length: int = 512, max_completion_length: int = 256, do_sample: bool = False,
                    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                    accelerator=None, trainer_state=None, engine=None) -> tuple[dict, list[dict]]:
    """One completion per prompt of `dataset`, scored. Returns (metrics, this process's sample rows).

    With several processes each scores its own shard of the prompts and the metrics are global:
    sums and counts are all-reduced, so every process returns the same metrics. `reward_funcs`
    are resolved `(name, fn)` pairs. Metrics: `reward` (weighted total), `rewards/<name>` (mean over
    the rows the function applied to), `accuracy` (= rewards/accuracy when that function is used),
    `completions/mean_length`, `completions/truncated_ratio`, `num_samples`. `engine`: what samples
    (`llmrl.generation`; default llmrl's own loop over `model`), its weights synced first."""
    require_columns(dataset, PROMPT_COLUMNS, "eval_dataset")
    collate = PromptCollator(tokenizer, max_prompt_length)
    distributed = accelerator is not None and accelerator.num_processes > 1
    shard = dataset.shard(accelerator.num_processes, accelerator.process_index, contiguous=True) if distributed else dataset
    device = next(model.parameters()).device
    engine = engine or TransformersEngine(model)
    engine.sync_weights()
    params = SamplingParams(max_tokens=max_completion_length, stop_token_ids=tuple(stop_token_ids(model, tokenizer)),
                            pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p, top_k=top_k,
                            do_sample=do_sample)
    loader = DataLoader(shard, batch_size=batch_size, collate_fn=collate)
    # Decoding is collective (every process steps until all rows everywhere are done), so every
    # process runs as many batches as the largest shard: a shorter shard decodes a stand-in
    # prompt, whose completion is thrown away, rather than leave the others waiting.
    num_batches = len(loader)
    if distributed:
        num_batches = int(accelerator.reduce(torch.tensor(num_batches, device=accelerator.device), "max"))
    batches = iter(loader)
    names = [name for name, _ in reward_funcs]
    # Sums then counts: total reward, each function, length, truncated.
    sums = torch.zeros(2 * (len(names) + 1) + 3, dtype=torch.float64)
    rows = []
    for _ in range(num_batches):
        batch = next(batches, None)
        stand_in = batch is None
        if stand_in:
            batch = collate([dataset[0]])
        on_device = {**batch, "input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        rollout = engine.generate(on_device, 1, params).to("cpu")
        if stand_in:
            continue
        prompts, completions, columns, result = score_rollout(rollout, batch, tokenizer, reward_funcs, reward_weights,
                                                              trainer_state=trainer_state)
        scores = torch.cat([result.total[:, None], result.rewards], dim=1).double()
        applied = ~torch.isnan(scores)
        sums[: len(names) + 1] += scores.nan_to_num(0.0).sum(0)
        sums[len(names) + 1: 2 * (len(names) + 1)] += applied.sum(0)
        sums[-3] += rollout.completion_lengths.sum()
        sums[-2] += rollout.truncated.sum()
        sums[-1] += len(prompts)
        rows += sample_rows(prompts, completions, columns, result,
                            {**result.extra, "completion_length": rollout.completion_lengths.tolist(),
                             "truncated": rollout.truncated.tolist()})
    if distributed:
        sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
    count = max(float(sums[-1]), 1.0)
    means = [float(s / c) if c > 0 else float("nan")
             for s, c in zip(sums[: len(names) + 1], sums[len(names) + 1: 2 * (len(names) + 1)])]
    metrics = {"reward": means[0], **{f"rewards/{name}": mean for name, mean in zip(names, means[1:])}}
    if "accuracy" in names:
        metrics["accuracy"] = metrics["rewards/accuracy"]
    metrics["completions/mean_length"] = float(sums[-3]) / count
    metrics["completions/truncated_ratio"] = float(sums[-2]) / count
    metrics["num_samples"] = int(sums[-1])
    return metrics, rows


def run_eval(recipe, output_file: str | None = None) -> dict:
    """`llmrl eval`: the recipe's model on its eval split (or, with none set, on `dataset_name`'s
    train split), scored with its `reward_funcs`. Prints the metrics as one JSON line; with
    `output_file`, writes one JSON line per sample there (prompt, completion, rewards, columns)."""
    import json

    from accelerate.utils import gather_object

    from llmrl.config import RLConfig
    from llmrl.data import load_datasets
    from llmrl.generation import make_engine
    from llmrl.models import load_policy, load_tokenizer
    from llmrl.rewards import resolve_reward_funcs
    from llmrl.trainers.common import make_accelerator
    from llmrl.trainers.tracking import append_jsonl

    args = recipe.args
    if not isinstance(args, RLConfig):
        raise ValueError(f"llmrl eval scores completions with reward functions, which algorithm {args.algorithm!r} "
                         "does not have; give an online recipe, or flags only: llmrl eval --model_name_or_path DIR "
                         "--dataset_name FILE --reward_funcs accuracy")
    if not args.reward_funcs:
        raise ValueError("llmrl eval needs reward_funcs (e.g. --reward_funcs accuracy) to score the completions.")
    train_rows, eval_rows = load_datasets(recipe.data, required=PROMPT_COLUMNS)
    dataset = eval_rows if eval_rows is not None else train_rows
    accelerator = make_accelerator()
    tokenizer = load_tokenizer(recipe.model)
    model = load_policy(recipe.model).to(accelerator.device)
    metrics, rows = evaluate_policy(
        model, tokenizer, dataset, resolve_reward_funcs(args.reward_funcs), reward_weights=args.reward_weights,
        batch_size=args.per_device_eval_batch_size, max_prompt_length=args.max_prompt_length,
        max_completion_length=args.max_completion_length, do_sample=args.eval_do_sample,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, accelerator=accelerator,
        engine=make_engine(model, args, accelerator, args.per_device_eval_batch_size))
    if accelerator.num_processes > 1:
        rows = gather_object(rows)
    if accelerator.is_main_process:
        if output_file:
            Path(output_file).unlink(missing_ok=True)
            append_jsonl(output_file, rows)
        print(json.dumps(metrics))
        where = f"; per-sample results in {output_file}" if output_file else ""
        summary = ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()
                            if key == "reward" or key.startswith("rewards/"))
        print(f"{recipe.model.model_name_or_path} on {metrics['num_samples']} prompts: {summary}{where}")
    return metrics
