"""What the online trainer reports: evaluation (in training and `llmrl eval`), completions.jsonl,
and the report_to trackers."""

import json
import subprocess
import sys

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmrl import RLTrainer
from llmrl.config import RLConfig
from llmrl.evaluation import evaluate_policy
from llmrl.rewards import completion_text


def vowel_count(prompts, completions, **kwargs):
    """A deterministic, text-checkable reward: how many vowels the completion has."""
    return [float(sum(ch in "aeiou" for ch in completion_text(c))) for c in completions]


def ends_with_answer(prompts, completions, answer, **kwargs):
    """1.0 when the completion contains the row's answer, None (not applicable) when it has none."""
    return [None if a is None else float(a in completion_text(c)) for c, a in zip(completions, answer)]


def prompts(n, offset=0):
    return datasets.Dataset.from_list([{"prompt": f"say {i + offset}:", "answer": "a" if i % 2 else None}
                                       for i in range(n)])


def trainer(model_dir, tmp_path, eval_dataset=None, reward_funcs=(vowel_count,), **overrides):
    settings = dict(algorithm="grpo", output_dir=str(tmp_path / "out"), num_generations=4,
                    per_device_train_batch_size=8, per_device_eval_batch_size=3, max_completion_length=6,
                    learning_rate=1e-3, max_steps=4, seed=0, logging_steps=1000, log_completions_steps=0)
    return RLTrainer(model_dir, RLConfig(**{**settings, **overrides}), prompts(16), reward_funcs=list(reward_funcs),
                     eval_dataset=eval_dataset)


def greedy_texts(model_dir, rows):
    """The greedy completions, decoded independently of llmrl: one prompt at a time, no padding."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = []
    for prompt in rows["prompt"]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def test_evaluate_scores_one_greedy_completion_per_prompt(sharp_model_dir):
    rows = prompts(7)
    model = AutoModelForCausalLM.from_pretrained(sharp_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(sharp_model_dir, padding_side="left")
    funcs = [("vowel_count", vowel_count), ("ends_with_answer", ends_with_answer)]
    metrics, samples = evaluate_policy(model, tokenizer, rows, funcs, reward_weights=[1.0, 2.0], batch_size=3,
                                       max_completion_length=6)
    texts = greedy_texts(sharp_model_dir, rows)
    assert len(set(texts)) > 1, "the check needs completions that differ between prompts"
    assert [s["completion"] for s in samples] == texts  # batched, left-padded = one at a time
    vowels = [float(sum(ch in "aeiou" for ch in t)) for t in texts]
    hits = {i: float("a" in t) for i, t in enumerate(texts) if i % 2}
    assert metrics["rewards/vowel_count"] == pytest.approx(sum(vowels) / 7)
    assert metrics["rewards/ends_with_answer"] == pytest.approx(sum(hits.values()) / len(hits))  # None rows skipped
    totals = [v + 2.0 * hits.get(i, 0.0) for i, v in enumerate(vowels)]
    assert metrics["reward"] == pytest.approx(sum(totals) / 7)
    assert metrics["num_samples"] == 7 and "accuracy" not in metrics
    assert [s["rewards"]["ends_with_answer"] for s in samples[:2]] == [None, hits[1]]


def test_eval_runs_every_eval_steps_and_at_the_end(tiny_model_dir, tmp_path):
    history = trainer(tiny_model_dir, tmp_path, eval_dataset=prompts(5, offset=100), eval_steps=3,
                      max_steps=4).train()
    evals = [h for h in history if "eval/reward" in h]
    assert [h["step"] for h in evals] == [3, 4]
    assert all(h["eval/num_samples"] == 5 and "eval/rewards/vowel_count" in h for h in evals)
    assert [h["step"] for h in history if "reward" in h] == [1, 2, 3, 4]


def test_completions_jsonl_holds_scored_samples(tiny_model_dir, tmp_path):
    trainer(tiny_model_dir, tmp_path, log_completions_steps=2, max_steps=4).train()
    lines = [json.loads(line) for line in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert sorted({row["step"] for row in lines}) == [2, 4]
    assert len(lines) == 2 * 8  # every row of the rollout's first generated batch
    for row in lines:
        assert row["rewards"]["vowel_count"] == sum(ch in "aeiou" for ch in row["completion"])
        assert row["reward"] == row["rewards"]["vowel_count"] and row["prompt"].startswith("say ")


def test_tensorboard_receives_the_step_metrics(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = trainer(tiny_model_dir, tmp_path, report_to=["tensorboard"], max_steps=2).train()
    runs = list((tmp_path / "out" / "runs").rglob("events.out.tfevents*"))
    assert runs, "no tensorboard event file under output_dir/runs"
    events = EventAccumulator(str(runs[0].parent)).Reload()
    rewards = events.Scalars("train/reward")  # TRL's tag names, so dashboards of both line up
    assert [e.step for e in rewards] == [1, 2]
    assert [e.value for e in rewards] == pytest.approx([h["reward"] for h in history], abs=1e-6)
    tags = events.Tags()["scalars"]
    assert {"train/rewards/vowel_count/mean", "train/rewards/vowel_count/std", "train/loss", "train/kl"} <= set(tags)


def test_missing_tracker_package_is_named(tiny_model_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here, so the missing-package message cannot be shown")
    with pytest.raises(ValueError, match=r"report_to: wandb needs the 'wandb' package: pip install"):
        trainer(tiny_model_dir, tmp_path, report_to=["wandb"])


# ---- llmrl eval ---------------------------------------------------------------------------------


def test_llmrl_eval_prints_accuracy_and_writes_samples(sharp_model_dir, tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} times", "answer": str(i % 3)}) + "\n" for i in range(6)))
    out = tmp_path / "samples.jsonl"
    result = subprocess.run([sys.executable, "-m", "llmrl", "eval", "--model_name_or_path", sharp_model_dir,
                             "--dataset_name", str(data), "--reward_funcs", "accuracy", "length",
                             "--max_completion_length", "6", "--output_file", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert metrics["num_samples"] == len(rows) == 6
    assert [r["answer"] for r in rows] == [str(i % 3) for i in range(6)]
    assert metrics["accuracy"] == pytest.approx(sum(r["rewards"]["accuracy"] for r in rows) / 6)
    texts = greedy_texts(sharp_model_dir, datasets.Dataset.from_list(rows))
    assert [r["completion"] for r in rows] == texts
    assert "accuracy" in result.stdout.splitlines()[-1] and str(out) in result.stdout


def test_llmrl_eval_on_an_offline_recipe_says_what_to_do(tiny_model_dir, tmp_path):
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump({"algorithm": "dpo", "model_name_or_path": tiny_model_dir,
                                      "dataset_name": "x.jsonl"}))
    result = subprocess.run([sys.executable, "-m", "llmrl", "eval", str(recipe)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "reward functions" in result.stderr and "Traceback" not in result.stderr
