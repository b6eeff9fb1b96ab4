"""The PPO task of tests/test_ppo.py and tests/test_ppo_shared_critic.py: prompts whose bonus a
critic can learn to predict, and a digit-fraction reward the policy can learn to raise."""

import datasets

from llmrl import RLTrainer
from llmrl.config import RLConfig
from llmrl.rewards import completion_text


def digit_fraction(prompts, completions, **kwargs):
    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def bonus_plus_digits(prompts, completions, bonus, **kwargs):
    """The prompt's bonus (1 for 'yes' prompts, 0 for 'no'), which a critic can learn to predict,
    plus the completion's digit fraction, which the policy can learn to raise."""
    return [b + d for b, d in zip(bonus, digit_fraction(prompts, completions))]


def bonus_prompts(n=32):
    return datasets.Dataset.from_list([{"prompt": f"{i} " + ("yes" if i % 2 else "no"), "bonus": float(i % 2)}
                                       for i in range(n)])


def ppo(model_dir, tmp_path, reward_funcs=(bonus_plus_digits, digit_fraction), model_config=None,
        processing_class=None, **overrides):
    settings = dict(algorithm="ppo", output_dir=str(tmp_path / "out"), per_device_train_batch_size=16,
                    max_completion_length=8, learning_rate=3e-3, value_learning_rate=3e-3, max_steps=30, seed=0,
                    logging_steps=1000, log_completions_steps=0, save_steps=0, reward_weights=[1.0, 0.0])
    args = RLConfig(**{**settings, **overrides})
    return RLTrainer(model_dir, args, bonus_prompts(), reward_funcs=list(reward_funcs), model_config=model_config,
                     processing_class=processing_class)


def mean(values):
    return sum(values) / len(values)
