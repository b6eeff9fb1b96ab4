"""Run by tests/test_launch.py under `accelerate launch --config_file recipes/accelerate/<config>.yaml
--num_processes 2` on CPU (and in the test's own process for the 1-process reference): the online
trainer, built as `llmrl train` builds it, with hooks that record what the backend did.

    python launch_worker.py SETTINGS.json OUT_DIR

Writes OUT_DIR/rank<i>.json: the backend, how many of the policy's elements this process holds,
`sync_gradients` at each training forward and the optimizer steps taken; the trainer saves its final
model to the settings' output_dir.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import torch

from llmrl import RLTrainer
from llmrl.config import RLConfig


def char_code_reward(prompts, completions, **kwargs):
    """Deterministic and different between completions: their characters' codes, mod 7."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def held_elements(model) -> tuple[int, int]:
    """(elements this process holds, elements of the whole model) of `model`'s parameters: a DTensor
    (FSDP2) holds its local shard, a ZeRO-3 parameter its partition (`ds_tensor`)."""
    from torch.distributed.tensor import DTensor

    held = total = 0
    for parameter in model.parameters():
        if isinstance(parameter, DTensor):
            held, total = held + parameter.to_local().numel(), total + parameter.numel()
        elif hasattr(parameter, "ds_tensor"):
            held, total = held + parameter.ds_tensor.numel(), total + parameter.ds_numel
        else:
            held, total = held + parameter.numel(), total + parameter.numel()
    return held, total


def record_contract(trainer) -> dict:
    """`sync_gradients` at each training forward (grad enabled: not generation, not the old-logprob
    pass) and the optimizer steps the backend took (DeepSpeed: its engine's global_steps)."""
    seen = {"sync": [], "optimizer_steps": 0}
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)

    def forward_hook(module, args):
        if torch.is_grad_enabled() and module.training:
            seen["sync"].append(trainer.accelerator.sync_gradients)

    unwrapped.register_forward_pre_hook(forward_hook)
    if not hasattr(trainer.model, "global_steps"):  # DeepSpeed counts its own engine steps
        def step_hook(optimizer, args, kwargs):
            seen["optimizer_steps"] += 1

        trainer.optimizer.optimizer.register_step_post_hook(step_hook)
    return seen


def main(settings_path: str, out: str) -> None:
    settings = json.loads(Path(settings_path).read_text())
    model_dir = settings.pop("model_name_or_path")
    prompts = datasets.Dataset.from_list([{"prompt": f"{i} plus {i} is"} for i in range(16)])
    trainer = RLTrainer(model_dir, RLConfig(**settings), prompts, reward_funcs=[char_code_reward])
    seen = record_contract(trainer)
    held, total = held_elements(trainer.model)
    trainer.train()
    if hasattr(trainer.model, "global_steps"):
        seen["optimizer_steps"] = trainer.model.global_steps
    record = {"backend": trainer.accelerator.distributed_type.value, "processes": trainer.accelerator.num_processes,
              "held": held, "total": total, **seen}
    Path(out, f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:3])
