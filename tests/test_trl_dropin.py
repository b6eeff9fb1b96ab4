"""A TRL user's script runs with only the import changed: TRL's quickstarts and reward-function
conventions (one callable, `trainer_state`, `log_extra` / `log_metric`, `async def`, a reward
model named in reward_funcs), TRL's dataset formats (conversational prompts, prompt-completion
rows, implicit-prompt text preferences) and `trainer.state.log_history`. Two steps each, on the
tiny model."""

from __future__ import annotations

import asyncio
import json
import time

import datasets
import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

# from trl import GRPOConfig, GRPOTrainer, DPOConfig, DPOTrainer   <- the only line a port changes
from llmrl import DPOConfig, DPOTrainer
from llmrl import RLConfig as GRPOConfig
from llmrl import RLTrainer as GRPOTrainer

TINY = dict(max_steps=2, per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
            report_to="none", logging_steps=1, disable_tqdm=True)


def prompts(n=16):
    return datasets.Dataset.from_list([{"prompt": f"{i}+{i}="} for i in range(n)])


def test_the_grpo_quickstart_with_one_callable_reward(tiny_model_dir, tmp_path):
    """TRL's GRPO quickstart: `reward_funcs=reward_len`, a single function, not a list."""
    def reward_len(completions, **kwargs):
        return [-abs(20 - len(completion)) for completion in completions]

    training_args = GRPOConfig(output_dir=str(tmp_path / "out"), **TINY)
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=reward_len, args=training_args, train_dataset=prompts())
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.state.max_steps == 2
    assert [record["step"] for record in trainer.state.log_history] == [1, 2]
    assert "rewards/reward_len" in trainer.state.log_history[-1]


def test_a_curriculum_reward_reads_trainer_state_and_logs_its_own_metric_and_column(tiny_model_dir, tmp_path):
    seen = []

    def curriculum(completions, trainer_state, log_metric, log_extra, **kwargs):
        seen.append((trainer_state.global_step, trainer_state.max_steps))
        weight = trainer_state.global_step / trainer_state.max_steps
        log_metric("curriculum/weight", weight)
        log_extra("length", [len(c) for c in completions])
        return [weight * len(c) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path / "out"), log_completions_steps=1, **TINY)
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=[curriculum], args=args, train_dataset=prompts())
    history = trainer.train()
    assert seen == [(0, 2), (1, 2)], "each rollout sees the optimizer steps taken before it"
    assert [record["curriculum/weight"] for record in history] == [0.0, 0.5]
    rows = [json.loads(line) for line in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert all(row["length"] == len(row["completion"]) for row in rows)


def test_async_rewards_run_concurrently(tiny_model_dir, tmp_path):
    """Two `async def` rewards (an LLM judge, a sandbox) of 0.3 s each: both start before either
    ends, as with TRL's asyncio.gather."""
    spans = {}

    def judge(name):
        async def reward(completions, **kwargs):
            start = time.monotonic()
            await asyncio.sleep(0.3)
            spans.setdefault(name, []).append((start, time.monotonic()))
            return [float(len(c)) for c in completions]
        reward.__name__ = name
        return reward

    args = GRPOConfig(output_dir=str(tmp_path / "out"), **TINY)
    history = GRPOTrainer(model=tiny_model_dir, reward_funcs=[judge("a"), judge("b")], args=args,
                          train_dataset=prompts()).train()
    assert history[-1]["rewards/a"] == history[-1]["rewards/b"] > 0
    for (a_start, a_end), (b_start, b_end) in zip(spans["a"], spans["b"]):
        assert max(a_start, b_start) < min(a_end, b_end), "the two awaits did not overlap"


def test_conversational_prompts_give_message_completions(tiny_model_dir, tmp_path):
    rows = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": f"{i}+{i}="}]} for i in range(16)])

    def content_length(completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path / "out"), **TINY)
    history = GRPOTrainer(model=tiny_model_dir, reward_funcs=content_length, args=args, train_dataset=rows).train()
    assert len(history) == 2


def test_prompt_completion_rows_do_not_pass_their_completion_to_rewards(tiny_model_dir, tmp_path):
    """TRL drops the dataset's `completion` column: the reward gets the generated completions, and
    completions.jsonl shows them, not the dataset's."""
    rows = datasets.Dataset.from_list([{"prompt": f"{i}+{i}=", "completion": str(2 * i), "answer": str(2 * i)}
                                       for i in range(16)])
    got = []

    def check(completions, answer, **kwargs):
        got.append(set(kwargs) & {"completion", "completion_ids"})
        return [0.0] * len(completions)

    args = GRPOConfig(output_dir=str(tmp_path / "out"), log_completions_steps=1, **TINY)
    GRPOTrainer(model=tiny_model_dir, reward_funcs=check, args=args, train_dataset=rows).train()
    assert got == [{"completion_ids"}, {"completion_ids"}]
    generated = [json.loads(line)["completion"] for line in (tmp_path / "out" / "completions.jsonl").open()]
    assert generated != [str(2 * i) for i in range(len(generated))]


def test_a_reward_model_folder_in_reward_funcs(tiny_model_dir, tmp_path):
    """TRL accepts a reward model's path among the reward functions."""
    folder = tmp_path / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)

    def zero(completions, **kwargs):
        return [0.0] * len(completions)

    args = GRPOConfig(output_dir=str(tmp_path / "out"), reward_weights=[1.0, 0.0], **TINY)
    history = GRPOTrainer(model=tiny_model_dir, reward_funcs=[str(folder), zero], args=args,
                          train_dataset=prompts()).train()
    assert "rewards/rm" in history[-1] and history[-1]["rewards/rm"] != 0.0
    assert GRPOConfig(reward_funcs=[str(folder), "accuracy"]).reward_funcs == [str(folder), "accuracy"]


def test_the_dpo_quickstart_with_implicit_prompt_text_pairs_and_max_length_alone(tiny_model_dir, tmp_path):
    """TRL's DPO quickstart shape; pairs with no prompt column (the shared start of chosen and
    rejected is the prompt) and `DPOConfig(max_length=32)` alone, as TRL accepts both."""
    rows = datasets.Dataset.from_list([{"chosen": f"{i}+{i}={2 * i}", "rejected": f"{i}+{i}={2 * i + 1}"}
                                       for i in range(16)])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    training_args = DPOConfig(output_dir=str(tmp_path / "out"), max_length=32, max_steps=2,
                              per_device_train_batch_size=8, report_to="none", disable_tqdm=True)
    trainer = DPOTrainer(model=tiny_model_dir, args=training_args, processing_class=tokenizer, train_dataset=rows)
    trainer.train()
    assert trainer.state.global_step == 2 and len(trainer.state.log_history) == 2
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_checkpoint_folder_loads_with_from_pretrained(tiny_model_dir, tmp_path, lora):
    """As TRL's (the HF Trainer's) checkpoints do: `from_pretrained("out/checkpoint-2")` is the
    policy at step 2, the same as its plain copy in checkpoint-2/model/."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmrl.config import ModelConfig

    def length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path / "out"), save_steps=2, learning_rate=1e-2, **TINY)
    GRPOTrainer(model=tiny_model_dir, reward_funcs=length, args=args, train_dataset=prompts(),
                model_config=ModelConfig(model_name_or_path=tiny_model_dir, use_peft=lora, lora_r=4)).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    ids = AutoTokenizer.from_pretrained(checkpoint)("1+1=", return_tensors="pt").input_ids
    with torch.no_grad():
        top, plain, start = (AutoModelForCausalLM.from_pretrained(folder)(ids).logits
                             for folder in (checkpoint, checkpoint / "model", tiny_model_dir))
    assert torch.equal(top, plain) and (top - start).abs().max() > 1e-3


def test_train_returns_the_history_which_also_answers_as_trls_train_output(tiny_model_dir, tmp_path):
    def length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path / "out"), **TINY)
    result = GRPOTrainer(model=tiny_model_dir, reward_funcs=length, args=args, train_dataset=prompts()).train()
    assert [record["step"] for record in result] == [1, 2], "still llmrl's list of records"
    assert result.global_step == 2 and result.metrics == result[-1]
    assert result.training_loss == pytest.approx((result[0]["loss"] + result[1]["loss"]) / 2)
