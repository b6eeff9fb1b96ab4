"""The online RL trainer on a real tiny model: every critic-free preset learns, dynamic sampling
counts, gradient invariance end to end, bad input, and the recipe path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from ports import free_port
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmrl import RLTrainer
from llmrl.config import RLConfig
from llmrl.rewards import RewardFunctionError, completion_text


def digit_fraction(prompts, completions, **kwargs):
    """The checkable task: the share of completion characters that are digits (~0.1 at random)."""
    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def chat_prompts(n):
    return datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": f"{i}+{i}="}]} for i in range(n)])


def make_trainer(model_dir, tmp_path, reward_funcs=(digit_fraction,), dataset=None, **overrides):
    settings = dict(algorithm="grpo", output_dir=str(tmp_path / "out"), num_generations=8,
                    per_device_train_batch_size=16, max_completion_length=8, learning_rate=3e-3, max_steps=12,
                    seed=0, logging_steps=1000)
    args = RLConfig(**{**settings, **overrides})
    return RLTrainer(model_dir, args, dataset if dataset is not None else chat_prompts(32),
                     reward_funcs=list(reward_funcs))


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "dapo"])
def test_every_critic_free_preset_learns(tiny_model_dir, tmp_path, algorithm, seed):
    """The reward each preset optimises (for DAPO it includes the soft overlong punishment, which
    most 8-token completions of an untrained model get) rises clearly within 12 steps. Sampling is
    from the whole vocabulary (top_k 0), so the policy must move its own mass onto digits. Windows of
    3 steps, not one rollout, are compared. Measured over seeds 0-5 for every preset (36 runs): the
    mean of the last 3 steps exceeds the first 3 by 0.167 (rloo, seed 2) to 0.80 (dapo)."""
    history = make_trainer(tiny_model_dir, tmp_path, algorithm=algorithm, learning_rate=1e-2, seed=seed).train()
    reward = [h["reward"] for h in history]
    start, end = sum(reward[:3]) / 3, sum(reward[-3:]) / 3
    assert end > start + 0.1, f"{algorithm}: reward {start:.3f} -> {end:.3f} ({[round(r, 2) for r in reward]})"


def test_final_model_is_a_plain_folder(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=1)
    trainer.train()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    AutoTokenizer.from_pretrained(tmp_path / "out")
    for (name, a), b in zip(trainer.accelerator.unwrap_model(trainer.model).named_parameters(),
                            reloaded.parameters()):
        assert torch.equal(a, b), name


# ---- dynamic sampling -----------------------------------------------------------------------


def flat_or_live(prompts, completions, **kwargs):
    """1.0 for every completion of a prompt marked FLAT (a flat group); distinct rewards otherwise."""
    return [1.0 if "FLAT" in completion_text(p) else float(len(set(completion_text(c))))
            + 0.01 * sum(map(ord, completion_text(c))) for p, c in zip(prompts, completions)]


def flat_dataset(flat, live):
    rows = [{"prompt": f"FLAT {i}"} for i in range(flat)] + [{"prompt": f"live {i}"} for i in range(live)]
    return datasets.Dataset.from_list(rows)


def dapo_trainer(model_dir, tmp_path, dataset, **overrides):
    # 4 prompts x 4 generations = one generated batch = the whole dataset; a rollout wants 16 rows.
    # The filter reads flat_or_live alone: the overlong shaping would make a FLAT group's totals differ.
    return make_trainer(model_dir, tmp_path, reward_funcs=[flat_or_live], dataset=dataset, algorithm="dapo",
                        num_generations=4, per_device_train_batch_size=16, max_steps=1,
                        dynamic_sampling_metric="flat_or_live", **overrides)


def test_dynamic_sampling_drops_flat_groups_and_generates_until_full(tiny_model_dir, tmp_path):
    trainer = dapo_trainer(tiny_model_dir, tmp_path, flat_dataset(2, 2), max_gen_batches=5)
    metrics = trainer.train()[0]
    # Each batch keeps the 2 live groups (8 rows): two batches fill the 16-row rollout.
    assert metrics["dynamic_sampling/gen_batches"] == 2
    assert metrics["dynamic_sampling/kept_rows"] == 16
    assert metrics["dynamic_sampling/kept_ratio"] == 0.5


def test_kept_ratio_counts_every_kept_row_before_the_cut_to_the_rollout(tiny_model_dir, tmp_path):
    trainer = dapo_trainer(tiny_model_dir, tmp_path, flat_dataset(1, 3), max_gen_batches=5)
    metrics = trainer.train()[0]
    # Each batch keeps 3 live groups (12 rows): two batches keep 24 of 32, the rollout takes 16.
    assert metrics["dynamic_sampling/gen_batches"] == 2 and metrics["dynamic_sampling/kept_rows"] == 16
    assert metrics["dynamic_sampling/kept_ratio"] == 0.75


def test_max_gen_batches_bounds_generation_and_trains_on_what_was_kept(tiny_model_dir, tmp_path):
    trainer = dapo_trainer(tiny_model_dir, tmp_path, flat_dataset(2, 2), max_gen_batches=1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train()[0]
    assert metrics["dynamic_sampling/gen_batches"] == 1 and metrics["dynamic_sampling/kept_rows"] == 8
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_nothing_kept_skips_the_update_with_a_warning(tiny_model_dir, tmp_path, caplog):
    trainer = dapo_trainer(tiny_model_dir, tmp_path, flat_dataset(4, 0), max_gen_batches=3)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with caplog.at_level("WARNING"):
        metrics = trainer.train()[0]
    assert metrics["skipped"] == 1.0 and metrics["dynamic_sampling/gen_batches"] == 3
    assert "no completion was kept" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_rewards_that_never_apply_skip_the_update_and_say_so(tiny_model_dir, tmp_path, caplog):
    def never(prompts, completions, **kwargs):
        return [None] * len(completions)

    trainer = make_trainer(tiny_model_dir, tmp_path, reward_funcs=[never], max_steps=1)
    with caplog.at_level("WARNING"):
        metrics = trainer.train()[0]
    assert metrics["skipped"] == 1.0 and metrics["rewards/scorable_rows"] == 0
    assert "returned None (not applicable) for every completion" in caplog.text


def test_truncated_completions_get_the_overlong_punishment(tiny_model_dir, tmp_path):
    """DAPO's soft punishment in the trainer: a completion cut at max_completion_length (no EOS) is
    beyond the limit, so its shaped reward is its reward minus the whole factor."""
    trainer = make_trainer(tiny_model_dir, tmp_path, algorithm="dapo", max_steps=1, log_completions_steps=1,
                           overlong_penalty_factor=0.5, overlong_buffer_len=4)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    truncated = [row for row in rows if row["truncated"]]
    assert truncated, "an untrained model should run past 8 tokens on some completions"
    for row in truncated:
        assert row["shaped_reward"] == pytest.approx(row["reward"] - 0.5, abs=1e-6)


@pytest.mark.parametrize("num_iterations, beta, passes", [(1, 0.0, 0), (2, 0.0, 1), (1, 0.04, 1)])
def test_old_logprobs_cost_a_pass_only_when_off_policy_or_for_the_reference(tiny_model_dir, tmp_path,
                                                                            num_iterations, beta, passes):
    """Exactly on-policy (one iteration, one mini-batch) the old logprobs are the detached current
    ones: no logprob pass before the update. A second iteration needs them (one pass); a KL term
    needs the reference's (one pass, on the reference)."""
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=num_iterations, num_iterations=num_iterations,
                           beta=beta)
    calls = []
    original = trainer._logprobs_no_grad
    trainer._logprobs_no_grad = lambda model, rollout: calls.append(model) or original(model, rollout)
    metrics = trainer.train()[0]
    assert len(calls) == passes
    assert metrics["completions/max_length"] <= 8 and metrics["rewards/digit_fraction_std"] > 0


def test_the_default_metric_is_the_shaped_total(tiny_model_dir, tmp_path):
    """With the overlong punishment, a FLAT prompt's completions differ in total reward (truncated or
    not), so by default those groups are informative and more rows are kept than live ones alone.
    64 tokens: an untrained model (EOS ~1% per token) ends about half its completions early."""
    trainer = make_trainer(tiny_model_dir, tmp_path, reward_funcs=[flat_or_live], dataset=flat_dataset(2, 2),
                           algorithm="dapo", num_generations=4, per_device_train_batch_size=16, max_steps=1,
                           max_gen_batches=1, max_completion_length=64)
    assert trainer.train()[0]["dynamic_sampling/kept_rows"] > 8


def test_unknown_dynamic_sampling_metric_is_named(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"dynamic_sampling_metric='acc'.*\['digit_fraction'\]"):
        make_trainer(tiny_model_dir, tmp_path, algorithm="dapo", dynamic_sampling_metric="acc")


def test_without_dynamic_sampling_flat_groups_stay(tiny_model_dir, tmp_path):
    trainer = dapo_trainer(tiny_model_dir, tmp_path, flat_dataset(2, 2), dynamic_sampling=False)
    metrics = trainer.train()[0]
    assert metrics["dynamic_sampling/gen_batches"] == 1 and metrics["dynamic_sampling/kept_rows"] == 16


# ---- gradient invariance end to end ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_one_step_is_the_same_for_any_micro_batch_split(tiny_model_dir, tmp_path, mode):
    """8 completions per step as 8 x 1 micro-batches or 2 x 4: the same update (1e-5) and loss."""
    updates, losses = [], []
    for size, accum in [(8, 1), (2, 4)]:
        trainer = make_trainer(tiny_model_dir, tmp_path / f"{size}x{accum}", num_generations=4,
                               per_device_train_batch_size=size, gradient_accumulation_steps=accum,
                               loss_agg_mode=mode, max_steps=1, learning_rate=1e-3, beta=0.0, max_grad_norm=0.0,
                               # one rollout of mixed lengths, so that the split matters for a wrong normaliser
                               max_completion_length=12,
                               # Adam's first update is lr * g / (|g| + eps): with eps at 1e-8, an element whose
                               # gradient is ~1e-8 turns float rounding of g (1e-7 relative) into 1% of lr.
                               adam_epsilon=1e-3)
        start = [p.detach().clone() for p in trainer.model.parameters()]
        losses.append(trainer.train()[0]["loss"])
        updates.append([p.detach() - s for p, s in zip(trainer.model.parameters(), start)])
    for a, b in zip(*updates):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # The logged loss is the step's loss, not the mean of the micro-batches' shares of it. (Under
    # seq_mean_token_mean the first on-policy loss is -mean(advantages) = 0 for any split.)
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    assert mode != "token_mean" or abs(losses[0]) > 1e-3


# ---- bad input --------------------------------------------------------------------------------


def test_a_reward_function_that_raises_is_named(tiny_model_dir, tmp_path):
    def broken(prompts, completions, **kwargs):
        raise KeyError("score")

    with pytest.raises(RewardFunctionError, match=r"reward function 'broken' raised KeyError"):
        make_trainer(tiny_model_dir, tmp_path, reward_funcs=[broken], max_steps=1).train()


@pytest.mark.parametrize("output, message", [([float("nan")] * 8, r"'bad' returned nan"),
                                             ([1.0], r"'bad' returned 1 values? for 8 completions")])
def test_bad_reward_values_are_named(tiny_model_dir, tmp_path, output, message):
    def bad(prompts, completions, **kwargs):
        return output if len(output) == 1 else output[: len(completions)] + [float("nan")] * 0

    with pytest.raises(RewardFunctionError, match=message):
        make_trainer(tiny_model_dir, tmp_path, reward_funcs=[bad], max_steps=1, num_generations=4,
                     per_device_train_batch_size=8, dataset=chat_prompts(8)).train()


def test_reward_weights_must_match_the_rewards_given_in_code(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"reward_weights has 3 values for 1 rewards \['digit_fraction'\]"):
        make_trainer(tiny_model_dir, tmp_path, reward_weights=[1.0, 0.5, 0.1])


def test_dataset_without_prompt_column_is_named(tiny_model_dir, tmp_path):
    rows = datasets.Dataset.from_list([{"question": "1+1?"}])
    with pytest.raises(ValueError, match=r"no column 'prompt'.*\['question'\]"):
        make_trainer(tiny_model_dir, tmp_path, dataset=rows)


# ---- the recipe path --------------------------------------------------------------------------


def test_llmrl_train_runs_a_recipe_end_to_end(tiny_model_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}*{i}=", "answer": str(i * i)}) + "\n" for i in range(16)))
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(yaml.safe_dump({
        "algorithm": "grpo", "model_name_or_path": tiny_model_dir, "dataset_name": str(data),
        "reward_funcs": ["accuracy", "length"], "reward_weights": [1.0, 0.1], "num_generations": 4,
        "per_device_train_batch_size": 8, "max_completion_length": 6, "max_steps": 2, "learning_rate": 1e-3,
        "output_dir": str(tmp_path / "out")}))
    result = subprocess.run([sys.executable, "-m", "llmrl", "train", str(recipe)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["loss_agg_mode"] == "seq_mean_token_mean" and saved["reward_weights"] == [1.0, 0.1]
    assert (tmp_path / "out" / "model.safetensors").exists()
    logged = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"')]
    assert [m["step"] for m in logged] == [1, 2] and "rewards/accuracy" in logged[0]


# ---- two processes --------------------------------------------------------------------------

REWARD_MODULE = '''
def char_code_reward(prompts, completions, **kwargs):
    """A deterministic reward that differs between completions: their characters' codes, mod 7."""
    return [float(sum(map(ord, c)) % 7) for c in completions]
'''


def run_recipe(tmp_path, tiny_model_dir, name, processes, batch_size):
    """One optimizer step of REINFORCE++ (global whitening: statistics across processes) with
    deterministic generation (top_k 1), so 1 and 2 processes see the same completions, then a
    greedy evaluation of 17 prompts: shards of 9 and 8 at batch size 4 are 3 and 2 batches, and
    the process with fewer must still take part in every collective decoding step. Tensorboard is
    on, as in every GPU recipe: closing it must not take the process group the final save waits
    on. Returns the trained model, the train record and the eval record."""
    data, eval_data = tmp_path / "prompts.jsonl", tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus {i} is"}) + "\n" for i in range(16)))
    eval_data.write_text("".join(json.dumps({"prompt": f"{i} minus {i} is"}) + "\n" for i in range(17)))
    (tmp_path / "rewardmod.py").write_text(REWARD_MODULE)
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({
        "algorithm": "reinforce_pp", "model_name_or_path": tiny_model_dir, "dataset_name": str(data),
        "reward_funcs": ["rewardmod:char_code_reward"], "num_generations": 1, "top_k": 1,
        "per_device_train_batch_size": batch_size, "max_completion_length": 8, "max_steps": 1,
        "learning_rate": 1e-3, "max_grad_norm": 0.0, "output_dir": str(tmp_path / name), "seed": 3,
        "eval_dataset_name": str(eval_data), "per_device_eval_batch_size": 4, "report_to": ["tensorboard"]}))
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port()]
    launch += ["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--num_processes", "1", "--cpu"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launch, "-m", "llmrl", "train", str(recipe)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"')]
    evals = [r for r in records if "eval/reward" in r]
    assert len(evals) == 1 and len(records) == 2, result.stdout[-3000:]
    assert list((tmp_path / name / "runs").rglob("events.out.tfevents.*")), "tensorboard wrote no events"
    return AutoModelForCausalLM.from_pretrained(tmp_path / name), records[0], evals[0]


def test_two_processes_give_the_one_process_update(sharp_model_dir, tmp_path):
    model_dir = sharp_model_dir
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    one, train_one, eval_one = run_recipe(tmp_path, model_dir, "one", processes=1, batch_size=16)
    two, train_two, eval_two = run_recipe(tmp_path, model_dir, "two", processes=2, batch_size=8)
    # The logged loss is the step's, not one process's share of it (whitened advantages make this
    # first on-policy loss ~0: tests/test_ppo.py compares a value loss that is not).
    assert train_two["loss"] == pytest.approx(train_one["loss"], abs=1e-6)
    # Each process scores half of the eval prompts; the logged metrics are over all of them.
    assert eval_two["eval/num_samples"] == eval_one["eval/num_samples"] == 17
    assert eval_two["eval/reward"] == pytest.approx(eval_one["eval/reward"], abs=1e-6)
    moved = 0.0
    for (name, p0), p1, p2 in zip(start.named_parameters(), one.parameters(), two.parameters()):
        moved = max(moved, (p1 - p0).abs().max().item())
        assert torch.allclose(p1, p2, atol=1e-5), f"{name}: {(p1 - p2).abs().max():.2e}"
    assert moved > 1e-4, "the step must change the weights for the comparison to mean anything"


# ---- checkpoints and resume -------------------------------------------------------------------


def test_resumed_run_equals_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """Stop after step 2 (checkpoint), resume to step 4: the same weights as 4 steps in one go.
    The stopped run has its own max_steps, so the LR schedule is constant to keep them comparable."""
    common = dict(num_generations=4, per_device_train_batch_size=8, lr_scheduler_type="constant",
                  dataset=chat_prompts(12))  # 6 rollouts an epoch: the resume crosses no epoch boundary
    whole = make_trainer(tiny_model_dir, tmp_path / "whole", max_steps=4, save_steps=0, **common)
    whole.train()
    first = make_trainer(tiny_model_dir, tmp_path / "split", max_steps=2, save_steps=2, **common)
    first.train()
    assert (tmp_path / "split" / "out" / "checkpoint-2" / "model" / "model.safetensors").exists()
    resumed = make_trainer(tiny_model_dir, tmp_path / "split", max_steps=4, save_steps=2,
                           resume_from_checkpoint="true", **common)
    history = resumed.train()
    assert [h["step"] for h in history] == [3, 4]
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert [p.name for p in sorted((tmp_path / "split" / "out").glob("checkpoint-*"))] == ["checkpoint-2",
                                                                                            "checkpoint-4"]


def test_save_total_limit_keeps_the_newest_and_checkpoints_load_plainly(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=3, save_steps=1, save_total_limit=2,
                           num_generations=4, per_device_train_batch_size=8)
    trainer.train()
    out = tmp_path / "out"
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-3"]
    assert not list(out.glob(".tmp-*"))
    saved = AutoModelForCausalLM.from_pretrained(out / "checkpoint-3" / "model")
    for a, b in zip(trainer.model.parameters(), saved.parameters()):
        assert torch.equal(a, b)


def test_resume_true_without_checkpoint_says_so(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=1, resume_from_checkpoint="true")
    with pytest.raises(ValueError, match="holds no checkpoint-<step> folder yet"):
        trainer.train()
