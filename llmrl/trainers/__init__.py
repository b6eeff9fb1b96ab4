"""The trainers, and `train(recipe)`, which runs the one an algorithm name selects."""

from __future__ import annotations

from llmrl.config import ALGORITHMS, DPOConfig, RewardConfig, RLConfig, SFTConfig


def _run_online(recipe):
    from llmrl.trainers.online import run

    return run(recipe)


def _run_dpo(recipe):
    from llmrl.trainers.dpo import run

    return run(recipe)


def _run_sft(recipe):
    from llmrl.trainers.sft import run

    return run(recipe)


def _run_reward(recipe):
    from llmrl.trainers.reward import run

    return run(recipe)


RUNNERS: dict[type, object] = {RLConfig: _run_online, DPOConfig: _run_dpo, SFTConfig: _run_sft,
                               RewardConfig: _run_reward}


def train(recipe):
    """Run the trainer that `recipe.args.algorithm` selects: refuse an output_dir another run holds,
    print the resolved config, and save it once the trainer is built."""
    from llmrl.trainers.checkpoint import claim_output_dir
    from llmrl.trainers.common import process_state

    runner = RUNNERS[ALGORITHMS[recipe.args.algorithm]]
    claim_output_dir(recipe.args, process_state())
    if process_state().is_main_process:
        print(f"Resolved config ({recipe.source or 'from code'}):\n{recipe.to_yaml()}", flush=True)
    return runner(recipe)  # each saves output_dir/config.yaml once its trainer is built
