"""The trainers' wiring against numbers worked out by hand, not by the code under test.

- the online step's logged loss is the hand-made aggregation of its per-token losses with the
  whole step's counts, for every loss_agg_mode, over several micro-batches;
- the KL term in the loss pulls the policy back to its reference, and the logged KL is k3 by hand;
- a resumed run follows a decaying LR schedule exactly (online GRPO, PPO and its critic, DPO);
- `Rollout.outcome_rewards` and `preference_loss` on hand-made inputs.

Each trainer test captures what it needs without mocking the stack: `generate_and_score` is
wrapped to keep a copy of the policy at the start of the step and the rollout and rewards it
returns; the log-probs are then recomputed on that copy, and everything after them (advantages,
surrogate, KL, aggregation) is written out with plain torch in float64.
"""

import copy
import json
import math
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from llmrl import DPOConfig, DPOTrainer, RLTrainer
from llmrl.algos import preference_loss
from llmrl.config import RLConfig
from llmrl.logprobs import completion_logprobs
from llmrl.rewards import completion_text
from llmrl.rollout import Rollout

# Besides EOS, the generation config ends a completion at any of these characters (as a chat
# model declares its end-of-turn ids, which the trainer honours): about 10% per token, so 12-token
# rollouts mix early stops of every length with truncated completions.
STOP_CHARACTERS = "aeiouAEIOU"


@pytest.fixture(scope="module")
def stopping_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("stopping_model")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    generation = json.loads((path / "generation_config.json").read_text())
    generation["eos_token_id"] = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(STOP_CHARACTERS))]
    (path / "generation_config.json").write_text(json.dumps(generation))
    return str(path)


def prompts(n):
    return datasets.Dataset.from_list([{"prompt": f"{i}+{i}="} for i in range(n)])


def length_and_code(prompts, completions, **kwargs):
    """Differs between almost any two completions: their length plus their character codes mod 7 / 7."""
    texts = [completion_text(c) for c in completions]
    return [len(t) + (sum(map(ord, t)) % 7) / 7 for t in texts]


def digit_fraction(prompts, completions, **kwargs):
    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def rl_trainer(model_dir, output_dir, reward_funcs, dataset, **overrides):
    settings = dict(algorithm="grpo", output_dir=str(output_dir), seed=0, logging_steps=1000,
                    log_completions_steps=0, save_steps=0)
    return RLTrainer(model_dir, RLConfig(**{**settings, **overrides}), dataset, reward_funcs=list(reward_funcs))


def capture_steps(trainer) -> list[dict]:
    """Each step's policy as it was when the step began (a frozen deep copy), its rollout and rewards."""
    steps = []
    generate = trainer.generate_and_score

    def recording(batches):
        policy = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).eval()
        rollout, rewards, metrics = generate(batches)
        steps.append({"policy": policy, "rollout": copy.deepcopy(rollout), "rewards": rewards.clone()})
        return rollout, rewards, metrics

    trainer.generate_and_score = recording
    return steps


@torch.no_grad()
def logprobs_under(model, rollout) -> torch.Tensor:
    """[N, C] log-probs of the rollout's completions under `model`, float64 (junk on padding)."""
    return completion_logprobs(model, rollout.input_ids, rollout.attention_mask,
                               rollout.completion_ids.shape[1]).double()


def k3_by_hand(logprobs, ref_logprobs):
    """Schulman's k3 = pi_ref / pi - log(pi_ref / pi) - 1, per token."""
    log_ratio = ref_logprobs - logprobs
    return log_ratio.exp() - log_ratio - 1


def grpo_advantages_by_hand(rewards, group_ids, eps=1e-6) -> torch.Tensor:
    """[N]: (R_i - mean of its group) / (unbiased std of its group + eps)."""
    rewards = rewards.double()
    advantages = torch.zeros_like(rewards)
    for group in group_ids.unique():
        members = group_ids == group
        r = rewards[members]
        mean = r.sum() / len(r)
        std = math.sqrt(((r - mean) ** 2).sum() / (len(r) - 1))
        advantages[members] = (r - mean) / (std + eps)
    return advantages


def masked_mean_by_hand(x, mask):
    return torch.where(mask.bool(), x, 0.0).sum() / mask.sum()


def aggregate_by_hand(per_token, mask, mode, max_len):
    """The loss of the whole step's rows: sums over real tokens divided by the step's counts."""
    mask = mask.double()
    row_sums = torch.where(mask.bool(), per_token, 0.0).sum(-1)
    lengths = mask.sum(-1)
    real = lengths > 0
    num_tokens, num_seqs = mask.sum(), real.sum()
    if mode == "token_mean":
        return row_sums.sum() / num_tokens
    if mode == "seq_mean_token_mean":
        return (row_sums[real] / lengths[real]).sum() / num_seqs
    if mode == "seq_mean_token_sum":
        return row_sums.sum() / num_seqs
    if mode == "seq_mean_token_sum_norm":
        return row_sums.sum() / (num_seqs * max_len)
    raise AssertionError(mode)


# ---- 1. the logged loss is the whole step's aggregation ---------------------------------------


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                  "seq_mean_token_sum_norm"])
def test_logged_loss_is_the_step_aggregation_by_hand(stopping_model_dir, tmp_path, mode):
    """GRPO, 6 completions (2 prompts x 3) as 3 micro-batches of 2, of unequal lengths. On-policy the
    ratio is 1, so each token's loss is -A_i + beta * k3; the step's loss divides the sums over every
    micro-batch by the step's token or sequence count. Step 1 starts at the reference (KL 0); step 2
    has moved, so its KL term counts too."""
    beta, max_len = 0.2, 12
    trainer = rl_trainer(stopping_model_dir, tmp_path / "out", [length_and_code], prompts(8), loss_agg_mode=mode,
                         num_generations=3, per_device_train_batch_size=2, gradient_accumulation_steps=3,
                         max_completion_length=max_len, learning_rate=1e-2, beta=beta, kl_estimator="k3",
                         max_steps=2, lr_scheduler_type="constant")
    steps = capture_steps(trainer)
    history = trainer.train()
    kl_terms = []
    for step, record in zip(steps, history):
        rollout, mask = step["rollout"], step["rollout"].completion_mask
        lengths = mask.sum(-1)
        assert len(set(lengths.tolist())) > 1 and (lengths < max_len).any() and (lengths == max_len).any(), lengths
        logprobs = logprobs_under(step["policy"], rollout)
        kl = k3_by_hand(logprobs, logprobs_under(trainer.reference, rollout))
        advantages = grpo_advantages_by_hand(step["rewards"], rollout.group_ids)
        assert advantages.abs().max() > 0.5
        per_token = -advantages[:, None] + beta * kl
        expected = aggregate_by_hand(per_token, mask, mode, max_len)
        assert record["loss"] == pytest.approx(expected.item(), abs=2e-6), (record["step"], record["loss"], expected)
        kl_terms.append(beta * aggregate_by_hand(kl, mask, mode, max_len).item())
    # Step 2's KL part is not negligible: under seq_mean_token_mean the advantage part is -mean(A) = 0,
    # so the KL part is what checks that mode's counts.
    assert kl_terms[0] == 0.0 and kl_terms[1] > 1e-3, kl_terms


# ---- 2. the KL term pulls toward the reference ------------------------------------------------


def test_the_kl_term_pulls_the_policy_back_to_its_reference(tiny_model_dir, tmp_path):
    """Six steps reward digits (the policy leaves its reference), then the reward is constant: every
    GRPO advantage is 0 and only beta * k3 acts, so the KL to the reference falls step after step.
    The logged KL of a step is measured before its update, on its own rollout: k3 of the policy at
    the step's start against the reference, its mean over the rollout's real tokens (one micro-batch).
    No momentum (adam_beta1 0): Adam's would carry the digit steps on into the first constant ones.
    256 completions a step keep the sampling noise of the measured KL well below each pull's drop
    (with 64, two pulls in a row can measure the same KL)."""
    moving, pulling = 6, 4
    calls = []

    def digits_then_constant(prompts, completions, **kwargs):
        calls.append(1)
        return digit_fraction(prompts, completions) if len(calls) <= moving else [1.0] * len(completions)

    trainer = rl_trainer(tiny_model_dir, tmp_path / "out", [digits_then_constant], prompts(64), num_generations=4,
                         per_device_train_batch_size=256, max_completion_length=8, learning_rate=3e-3, beta=1.0,
                         kl_estimator="k3", adam_beta1=0.0, lr_scheduler_type="constant", max_steps=moving + pulling)
    steps = capture_steps(trainer)
    history = trainer.train()
    for step, record in zip(steps, history):
        rollout = step["rollout"]
        kl = k3_by_hand(logprobs_under(step["policy"], rollout), logprobs_under(trainer.reference, rollout))
        assert record["kl"] == pytest.approx(masked_mean_by_hand(kl, rollout.completion_mask).item(), abs=1e-6)
    kl = [record["kl"] for record in history]
    assert all(record["advantages/std"] == 0.0 for record in history[moving:])
    # Step moving+1 measures the policy the digit steps left; each later one, one more pull.
    pulled = kl[moving:]
    assert pulled[0] > 0.02 and all(b < a for a, b in zip(pulled, pulled[1:])), [round(k, 5) for k in kl]
    assert pulled[-1] < pulled[0] / 2, [round(k, 5) for k in kl]


# ---- 3. resume restores a decaying schedule ---------------------------------------------------


def linear_lr(base, step, max_steps):
    """transformers' linear schedule without warmup: the LR optimizer step `step` (1-based) uses."""
    return base * (max_steps - (step - 1)) / max_steps


def resume_a_copy_of_checkpoint_2(make, tmp_path):
    """Run A straight to step 4 (checkpoints 2 and 4); copy A's checkpoint-2 into a fresh output
    folder B and resume B to step 4. Returns the two trainers and their histories."""
    whole = make(tmp_path / "a" / "out", resume_from_checkpoint=None)
    whole_history = whole.train()
    (tmp_path / "b" / "out").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "out" / "checkpoint-2", tmp_path / "b" / "out" / "checkpoint-2")
    resumed = make(tmp_path / "b" / "out", resume_from_checkpoint="true")
    resumed_history = resumed.train()
    assert [h["step"] for h in whole_history] == [1, 2, 3, 4]
    assert [h["step"] for h in resumed_history] == [3, 4]
    return whole, whole_history, resumed, resumed_history


def assert_same_weights(a, b):
    named = list(a.named_parameters())
    assert len(named) == len(list(b.parameters()))
    for (name, x), y in zip(named, b.parameters()):
        assert torch.equal(x, y), f"{name}: {(x - y).abs().max():.2e}"


def assert_linear_schedule(history, base, max_steps=4):
    for record in history:
        assert record["learning_rate"] == pytest.approx(linear_lr(base, record["step"], max_steps), rel=1e-6), record


def test_online_resume_follows_the_decaying_schedule(tiny_model_dir, tmp_path):
    lr = 4e-3

    def make(output_dir, **overrides):
        return rl_trainer(tiny_model_dir, output_dir, [digit_fraction], prompts(12), num_generations=4,
                          per_device_train_batch_size=8, max_completion_length=8, learning_rate=lr,
                          lr_scheduler_type="linear", warmup_steps=0, warmup_ratio=0.0, max_steps=4, save_steps=2,
                          **overrides)

    whole, whole_history, resumed, resumed_history = resume_a_copy_of_checkpoint_2(make, tmp_path)
    assert_linear_schedule(whole_history, lr)
    assert_linear_schedule(resumed_history, lr)  # lr/2 and lr/4, not a fresh lr and 3/4 lr
    assert_same_weights(whole.model, resumed.model)


def test_ppo_resume_follows_both_decaying_schedules(tiny_model_dir, tmp_path):
    """PPO's critic has its own AdamW and schedule (value_learning_rate): both must resume."""
    lr, value_lr = 4e-3, 1e-2
    critic_lrs = {}

    def make(output_dir, **overrides):
        trainer = rl_trainer(tiny_model_dir, output_dir, [digit_fraction], prompts(12), algorithm="ppo",
                             per_device_train_batch_size=8, max_completion_length=8, learning_rate=lr,
                             value_learning_rate=value_lr, lr_scheduler_type="linear", warmup_steps=0,
                             warmup_ratio=0.0, max_steps=4, save_steps=2, **overrides)
        lrs = critic_lrs.setdefault(Path(output_dir).parent.name, [])
        step = trainer.critic.step

        def recording_step():  # the LR the critic's optimizer steps with (it is not logged)
            lrs.append(trainer.critic.optimizer.param_groups[0]["lr"])
            return step()

        trainer.critic.step = recording_step
        return trainer

    whole, whole_history, resumed, resumed_history = resume_a_copy_of_checkpoint_2(make, tmp_path)
    assert_linear_schedule(whole_history, lr)
    assert_linear_schedule(resumed_history, lr)
    assert critic_lrs["a"] == pytest.approx([linear_lr(value_lr, s, 4) for s in (1, 2, 3, 4)], rel=1e-9)
    assert critic_lrs["b"] == pytest.approx([linear_lr(value_lr, s, 4) for s in (3, 4)], rel=1e-9)
    assert_same_weights(whole.model, resumed.model)
    assert_same_weights(whole.critic.model, resumed.critic.model)
    assert (tmp_path / "b" / "out" / "checkpoint-4" / "value_model" / "model.safetensors").exists()


def preference_pairs(n):
    rows = [{"prompt": f"{i} is", "chosen": str(i) * (1 + i % 3), "rejected": "no" + "o" * (i % 4)} for i in range(n)]
    return datasets.Dataset.from_list(rows)


def test_dpo_resume_follows_the_decaying_schedule(tiny_model_dir, tmp_path):
    lr = 4e-3

    def make(output_dir, **overrides):
        args = DPOConfig(output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0, warmup_ratio=0.0, max_steps=4,
                         save_steps=2, logging_steps=1000, report_to="none", disable_tqdm=True, seed=0,
                         max_prompt_length=16, max_length=32, **overrides)
        return DPOTrainer(tiny_model_dir, args, preference_pairs(12))

    whole, whole_history, resumed, resumed_history = resume_a_copy_of_checkpoint_2(make, tmp_path)
    assert_linear_schedule(whole_history, lr)
    assert_linear_schedule(resumed_history, lr)
    assert_same_weights(whole.model, resumed.model)


# ---- 4. outcome rewards sit on the last real token ------------------------------------------


def test_outcome_rewards_sit_on_the_last_real_token():
    eos, pad = 1, 0
    completion_ids = torch.tensor([[5, 6, eos, pad, pad],   # stopped at EOS: 3 tokens, EOS included
                                   [5, 6, 7, 8, 9],         # truncated: no EOS, every column real
                                   [5, pad, pad, pad, pad],  # filler: an empty completion mask
                                   [eos, pad, pad, pad, pad],  # EOS at once: 1 token
                                   [7, 8, 9, eos, pad]])     # 4 tokens
    completion_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0],
                                    [1, 1, 1, 1, 0]], dtype=torch.float)
    rollout = Rollout(prompt_ids=torch.full((5, 2), 4), prompt_mask=torch.ones(5, 2, dtype=torch.long),
                      completion_ids=completion_ids, completion_mask=completion_mask,
                      truncated=torch.tensor([False, True, False, False, False]), group_ids=torch.arange(5))
    rewards = torch.tensor([0.5, -2.0, 3.0, 7.0, -0.25])
    expected = torch.tensor([[0.0, 0.0, 0.5, 0.0, 0.0],
                             [0.0, 0.0, 0.0, 0.0, -2.0],
                             [0.0, 0.0, 0.0, 0.0, 0.0],
                             [7.0, 0.0, 0.0, 0.0, 0.0],
                             [0.0, 0.0, 0.0, -0.25, 0.0]])
    token_rewards = rollout.outcome_rewards(rewards)
    assert token_rewards.dtype == completion_mask.dtype
    assert torch.equal(token_rewards, expected)


# ---- 5. preference losses with unequal margins ----------------------------------------------


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


# Per pair, with h the margin (chosen log-ratio minus rejected log-ratio) and ls the label smoothing:
PREFERENCE_FORMULAS = {
    # DPO (arXiv 2305.18290 eq. 7), conservative (cDPO, as the DPO authors' code and earlier TRL)
    "sigmoid": lambda h, beta, ls: -(1 - ls) * log_sigmoid(beta * h) - ls * log_sigmoid(-beta * h),
    # IPO (arXiv 2310.12036 eq. 17); label smoothing does not apply
    "ipo": lambda h, beta, ls: (h - 1 / (2 * beta)) ** 2,
    # SLiC / RSO hinge; label smoothing does not apply
    "hinge": lambda h, beta, ls: max(0.0, 1 - beta * h),
    # robust DPO (arXiv 2403.00409 eq. 8, TRL's "robust"): unbiased under a flip rate ls
    "robust": lambda h, beta, ls: ((1 - ls) * -log_sigmoid(beta * h) - ls * -log_sigmoid(-beta * h)) / (1 - 2 * ls),
}


@pytest.mark.parametrize("name", list(PREFERENCE_FORMULAS))
def test_preference_losses_by_hand_with_unequal_margins(name):
    chosen = [-10.0, -4.0, -7.0, -3.0]
    rejected = [-12.0, -3.0, -7.5, -9.0]
    ref_chosen = [-11.0, -4.5, -6.0, -3.0]
    ref_rejected = [-11.5, -2.0, -7.5, -4.0]
    beta, ls = 0.5, 0.2
    chosen_logratios = [c - r for c, r in zip(chosen, ref_chosen)]  # 1.0, 0.5, -1.0, 0.0
    rejected_logratios = [c - r for c, r in zip(rejected, ref_rejected)]  # -0.5, -1.0, 0.0, -5.0
    margins = [c - r for c, r in zip(chosen_logratios, rejected_logratios)]  # 1.5, 1.5, -1.0, 5.0
    assert margins == [1.5, 1.5, -1.0, 5.0]
    loss, chosen_rewards, rejected_rewards = preference_loss(
        name, chosen_logps=torch.tensor(chosen), rejected_logps=torch.tensor(rejected),
        ref_chosen_logps=torch.tensor(ref_chosen), ref_rejected_logps=torch.tensor(ref_rejected),
        beta=beta, label_smoothing=ls)
    expected = [PREFERENCE_FORMULAS[name](h, beta, ls) for h in margins]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([beta * x for x in chosen_logratios], abs=1e-7)
    assert rejected_rewards.tolist() == pytest.approx([beta * x for x in rejected_logratios], abs=1e-7)
    # without smoothing, sigmoid and robust are both plain DPO
    plain, _, _ = preference_loss(name, chosen_logps=torch.tensor(chosen), rejected_logps=torch.tensor(rejected),
                                  ref_chosen_logps=torch.tensor(ref_chosen),
                                  ref_rejected_logps=torch.tensor(ref_rejected), beta=beta, label_smoothing=0.0)
    assert plain.tolist() == pytest.approx([PREFERENCE_FORMULAS[name](h, beta, 0.0) for h in margins], abs=1e-6)


# ---- a prompt set smaller than one rollout ---------------------------------------------------


def test_fewer_prompts_than_one_rollout_are_refused_not_a_hang(tiny_model_dir, tmp_path):
    """A rollout of 16 completions at 4 per prompt draws 4 prompts; with 3 the drop_last loader has
    no batch at all, and `replay_batches` loops forever over it without yielding: `train()` never
    returns (with max_steps unset it trains 0 steps instead). The offline trainer refuses such a
    dataset when it is built; so should this one. Not calling train() here: it would hang."""
    with pytest.raises(ValueError, match="prompt"):
        rl_trainer(tiny_model_dir, tmp_path / "out", [digit_fraction], prompts(3), num_generations=4,
                   per_device_train_batch_size=16, max_completion_length=8, max_steps=1)
