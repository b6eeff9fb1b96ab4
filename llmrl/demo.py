"""The demo `make demo` runs (`python -m llmrl.demo`).

For now it is the smallest real thing the foundation can do, said plainly: build a tiny model
offline, sample completions for chat prompts, score them, and take ONE hand-written GRPO step with
the `llmrl.algos` functions. The full demo (SFT, then GRPO/DAPO on a tiny arithmetic task, accuracy
before and after, through `llmrl.RLTrainer`) replaces this with issue #7.
"""

from __future__ import annotations

import argparse
import time

import torch

from llmrl.algos import aggregate_loss, compute_advantages, policy_loss
from llmrl.data import PromptCollator
from llmrl.logprobs import completion_logprobs
from llmrl.rollout import generate_completions
from llmrl.tiny import build_tiny_model

PROMPTS = [
    {"prompt": [{"role": "user", "content": "2+3="}], "answer": "5"},
    {"prompt": [{"role": "user", "content": "4+4="}], "answer": "8"},
]


def digit_reward(completions: list[str], answers: list[str]) -> list[float]:
    """1.0 when the completion contains the answer, else 0.0 (a checkable toy reward)."""
    return [float(answer in text) for text, answer in zip(completions, answers)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmrl.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--num_generations", type=int, default=4)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(0)

    model_dir = f"{args.output_dir}/tiny-model"
    model, tokenizer = build_tiny_model(model_dir, seed=0)
    print(f"[1/4] built a {model.num_parameters():,}-parameter tiny Llama offline, saved to {model_dir}")

    batch = PromptCollator(tokenizer, max_prompt_length=64)(PROMPTS)
    rollout = generate_completions(model, batch["input_ids"], batch["attention_mask"],
                                   num_generations=args.num_generations, max_completion_length=12,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    print(f"[2/4] sampled {len(texts)} completions ({args.num_generations} per prompt), e.g. {texts[:3]}")

    answers = [row["answer"] for row in PROMPTS for _ in range(args.num_generations)]
    rewards = torch.tensor(digit_reward(texts, answers))
    completion_mask = rollout.completion_mask
    token_rewards = rollout.outcome_rewards(rewards)
    advantages, _ = compute_advantages("grpo", token_rewards=token_rewards, mask=completion_mask,
                                       group_ids=rollout.group_ids)
    print(f"[3/4] rewards {rewards.tolist()} -> GRPO advantages per completion {advantages[:, 0].round(decimals=2).tolist()}")

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sequences, attention_mask, num_completion = rollout.input_ids, rollout.attention_mask, completion_mask.shape[1]
    logprobs = completion_logprobs(model, sequences, attention_mask, num_completion)
    per_token, metrics = policy_loss("ppo_clip", logprobs=logprobs, old_logprobs=logprobs.detach(),
                                     advantages=advantages, mask=completion_mask)
    loss = aggregate_loss(per_token, completion_mask, "seq_mean_token_mean")
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():
        after = completion_logprobs(model, sequences, attention_mask, num_completion)
    change = ((after - logprobs.detach()) * completion_mask).sum(-1)  # log-prob change of each completion
    sign = advantages[:, 0]
    print(f"[4/4] one GRPO step (loss {loss.item():+.4f}, grad norm {grad_norm:.3f}): mean log-prob change "
          f"{change[sign > 0].mean().item() if (sign > 0).any() else float('nan'):+.3f} for completions with "
          f"A > 0, {change[sign < 0].mean().item() if (sign < 0).any() else float('nan'):+.3f} for A < 0")
    print(f"done in {time.perf_counter() - start:.1f}s. The full demo (SFT then GRPO, accuracy before/after) "
          "arrives with issue #7; see README.md.")


if __name__ == "__main__":
    main()
