"""A reward, loss or gradient that is not finite skips its optimizer step (named in a warning) and
stops the run after a few in a row; weights that are not finite are never saved, so the newest
checkpoint is always a usable one."""

import logging

import datasets
import pytest
import torch
from safetensors.torch import load_file

from llmrl import DPOConfig, DPOTrainer, RLTrainer
from llmrl.config import RLConfig
from llmrl.trainers.guards import NonFiniteError


class OverflowFrom:
    """A reward of 1.7e308 (finite) on the calls in `bad`; with weight 2 the total overflows to inf."""

    __name__ = "overflow"

    def __init__(self, bad):
        self.bad, self.calls = set(bad), 0

    def __call__(self, prompts, completions, **kwargs):
        self.calls += 1
        value = 1.7e308 if self.calls in self.bad else 0.0
        return [value + sum(ch.isdigit() for ch in c) / 8 for c in completions]


def online(model_dir, tmp_path, reward, **overrides):
    settings = dict(algorithm="grpo", output_dir=str(tmp_path / "out"), num_generations=4,
                    per_device_train_batch_size=8, max_completion_length=6, learning_rate=1e-3, max_steps=4,
                    save_steps=1, seed=0, logging_steps=1000, log_completions_steps=0, reward_weights=[2.0],
                    disable_tqdm=True)
    prompts = datasets.Dataset.from_list([{"prompt": f"{i}+{i}="} for i in range(32)])
    return RLTrainer(model_dir, RLConfig(**{**settings, **overrides}), prompts, reward_funcs=[reward])


def saved_weights_finite(folder):
    return all(torch.isfinite(t).all() for t in load_file(str(folder / "model.safetensors")).values())


def test_an_overflowing_reward_skips_its_step_and_the_run_goes_on(tiny_model_dir, tmp_path, caplog):
    trainer = online(tiny_model_dir, tmp_path, OverflowFrom(bad={2}))
    before_step_2 = {}

    def keep(module, args):
        if trainer.global_step == 1 and not before_step_2:
            before_step_2.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})

    trainer.model.register_forward_pre_hook(keep)
    with caplog.at_level(logging.WARNING):
        history = trainer.train()
    assert [h.get("skipped", 0.0) for h in history] == [0.0, 1.0, 0.0, 0.0]
    assert "step 2: the reward is not finite" in caplog.text
    checkpoint_1 = load_file(str(tmp_path / "out" / "checkpoint-1" / "model" / "model.safetensors"))
    checkpoint_2 = load_file(str(tmp_path / "out" / "checkpoint-2" / "model" / "model.safetensors"))
    assert all(torch.equal(checkpoint_1[k], checkpoint_2[k]) for k in checkpoint_1)  # step 2 left them alone
    for step in (1, 2, 3, 4):
        assert saved_weights_finite(tmp_path / "out" / f"checkpoint-{step}" / "model")


def test_non_finite_steps_in_a_row_stop_the_run_and_keep_the_good_checkpoint(tiny_model_dir, tmp_path):
    trainer = online(tiny_model_dir, tmp_path, OverflowFrom(bad={2, 3, 4, 5}), max_steps=6, save_total_limit=1)
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row met a non-finite reward \(last at step 4\)"):
        trainer.train()
    # Steps 2 and 3 were skipped, so their checkpoints hold step 1's weights; the newest one is kept.
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == ["checkpoint-3"]
    assert saved_weights_finite(tmp_path / "out" / "checkpoint-3" / "model")


def overflow_weights_after(trainer, step):
    """Fault injection: the update of optimizer step `step` leaves part of the embeddings inf (what an
    update that overflows does to weights)."""
    def hook(optimizer, args, kwargs):
        if trainer.global_step == step - 1:
            with torch.no_grad():
                trainer.accelerator.unwrap_model(trainer.model).get_input_embeddings().weight[:8] = float("inf")

    trainer.optimizer.optimizer.register_step_post_hook(hook)


def test_weights_that_overflow_are_never_saved(tiny_model_dir, tmp_path, caplog):
    """Weights gone inf in step 2's update: checkpoint-2 is not written (checkpoint-1 stays the
    newest, and it is finite), and the next rollout stops the run with the reason instead of
    failing in sampling; nothing reaches the final folder."""
    trainer = online(tiny_model_dir, tmp_path, OverflowFrom(bad=set()), max_steps=6)
    overflow_weights_after(trainer, 2)
    with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteError, match=r"logits are not finite"):
        trainer.train()
    assert "the weights are not finite; checkpoint-2 not written" in caplog.text
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == ["checkpoint-1"]
    assert saved_weights_finite(tmp_path / "out" / "checkpoint-1" / "model")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_dpo_skips_a_non_finite_step_and_refuses_to_save_non_finite_weights(tiny_model_dir, tmp_path, caplog):
    pairs = datasets.Dataset.from_list([{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": f"{i}x"}
                                        for i in range(8)])
    args = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_prompt_length=16,
                     max_length=32, max_steps=2, save_steps=0, logging_steps=1000, disable_tqdm=True)
    trainer = DPOTrainer(tiny_model_dir, args, pairs)
    overflow_weights_after(trainer, 1)
    with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteError, match="nothing was saved"):
        trainer.train()
    assert "step 2: the loss is not finite" in caplog.text
    assert not (tmp_path / "out" / "model.safetensors").exists()
