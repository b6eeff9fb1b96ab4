"""Resuming a checkpoint someone else gave you never runs their code: llmrl writes no pickled
objects (the LR schedules are JSON in trainer_state.json) and loads every state file as tensors and
plain values only; a file that needs more is refused by name, never swallowed."""

import json
import pickle

import datasets
import pytest
import torch

from llmrl import DPOConfig, DPOTrainer, RLTrainer
from llmrl.config import RLConfig


class Planted:
    """A pickle that creates `marker` when it is unpickled: what a malicious checkpoint file does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def digit_fraction(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def online(model_dir, out, **overrides):
    settings = dict(algorithm="grpo", output_dir=str(out), num_generations=4, per_device_train_batch_size=8,
                    max_completion_length=6, learning_rate=1e-3, max_steps=2, save_steps=2, seed=0,
                    logging_steps=1000, log_completions_steps=0, disable_tqdm=True)
    prompts = datasets.Dataset.from_list([{"prompt": f"{i}+{i}="} for i in range(16)])
    return RLTrainer(model_dir, RLConfig(**{**settings, **overrides}), prompts, reward_funcs=[digit_fraction])


@pytest.fixture()
def checkpoint(tiny_model_dir, tmp_path):
    online(tiny_model_dir, tmp_path / "out").train()
    return tmp_path / "out" / "checkpoint-2"


def test_checkpoints_hold_no_pickled_objects_and_the_schedule_as_json(checkpoint):
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert [s["last_epoch"] for s in state["lr_schedulers"]] == [2]


def test_a_planted_pickle_in_a_checkpoint_runs_no_code_on_resume(tiny_model_dir, checkpoint, tmp_path):
    """custom_checkpoint_0.pkl is where older checkpoints kept the scheduler, and accelerate reloads
    such files with weights_only=False: a planted object there is refused by name, never unpickled."""
    marker = tmp_path / "code_ran"
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ValueError, match=r"custom_checkpoint_0\.pkl is a pickled object.*delete the file"):
        online(tiny_model_dir, checkpoint.parent, max_steps=3, resume_from_checkpoint="true").train()
    assert not marker.exists()


def test_a_planted_rng_file_is_refused_by_name(tiny_model_dir, checkpoint, tmp_path):
    """accelerate loads random_states_<i>.pkl with weights_only=True but swallows a failure (the
    run would resume with other random numbers): llmrl refuses it, naming the file."""
    marker = tmp_path / "code_ran"
    torch.save({"random_state": Planted(marker)}, checkpoint / "random_states_0.pkl")
    with pytest.raises(ValueError, match=r"random_states_0\.pkl.*never unpickles"):
        online(tiny_model_dir, checkpoint.parent, max_steps=3, resume_from_checkpoint="true").train()
    assert not marker.exists()


def test_a_checkpoint_without_its_schedules_resumes_them_from_the_step(tiny_model_dir, checkpoint):
    """An older checkpoint, once its pickled scheduler is deleted as the refusal says: the schedule is
    rebuilt from the step, so step 3's learning rate on the linear decay is 1e-3 x (4 - 2) / 4."""
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["lr_schedulers"]
    state_file.write_text(json.dumps(state))
    history = online(tiny_model_dir, checkpoint.parent, max_steps=4, resume_from_checkpoint="true").train()
    assert [h["learning_rate"] for h in history] == pytest.approx([1e-3 * 2 / 4, 1e-3 * 1 / 4], rel=1e-6)  # logged in float32


def test_dpo_checkpoints_resume_without_unpickling(tiny_model_dir, tmp_path):
    pairs = datasets.Dataset.from_list([{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": f"{i}x"}
                                        for i in range(8)])

    def args(max_steps, **more):
        return DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_prompt_length=16,
                         max_length=32, max_steps=max_steps, save_steps=2, logging_steps=1000, disable_tqdm=True,
                         **more)

    DPOTrainer(tiny_model_dir, args(2), pairs).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    marker = tmp_path / "code_ran"
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ValueError, match=r"custom_checkpoint_0\.pkl is a pickled object"):
        DPOTrainer(tiny_model_dir, args(3, resume_from_checkpoint="true"), pairs).train()
    assert not marker.exists()
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    history = DPOTrainer(tiny_model_dir, args(3, resume_from_checkpoint="true"), pairs).train()
    assert [h["step"] for h in history] == [3]
