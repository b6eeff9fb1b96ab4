"""Rollouts on a real tiny model: groups, EOS masks, truncation, padding, the dynamic-sampling filter."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from llmrl.data import PromptCollator
from llmrl.rollout import (
    completion_mask,
    decode,
    filter_logits,
    generate_completions,
    informative_groups,
    sample_tokens,
    stop_token_ids,
)

EOS = 1


def test_completion_mask_by_hand():
    ids = torch.tensor([[5, 6, EOS, 0, 0],    # EOS at 2: three real tokens
                        [EOS, 7, EOS, 0, 0],  # EOS first: one real token, later EOS ignored
                        [5, 6, 7, 8, 9]])     # no EOS: all real, truncated
    mask, truncated = completion_mask(ids, EOS)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]
    mask, truncated = completion_mask(ids, [EOS, 9])  # several EOS ids
    assert mask[2].tolist() == [1, 1, 1, 1, 1] and truncated.tolist() == [False, False, False]


def test_informative_groups_drops_flat_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 2.0])
    groups = torch.tensor([4, 4, 9, 9, 2, 2, 7])  # group 7 has one member: flat by definition
    assert informative_groups(rewards, groups).tolist() == [False, False, True, True, False, False, False]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer


def rollout_for(tiny, prompts, **kwargs):
    model, tokenizer = tiny
    batch = PromptCollator(tokenizer, max_prompt_length=64)([{"prompt": p} for p in prompts])
    settings = dict(num_generations=3, max_completion_length=8, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    return generate_completions(model, batch["input_ids"], batch["attention_mask"], **{**settings, **kwargs})


def test_generate_groups_masks_and_truncation(tiny):
    _, tokenizer = tiny
    torch.manual_seed(0)
    rollout = rollout_for(tiny, ["1+1=", "a much longer prompt: 2+2="])
    n = 2 * 3
    assert rollout.completion_ids.shape[0] == n and rollout.completion_ids.shape[1] <= 8
    assert rollout.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    # The prompts are repeated per generation, left-padded, ending on a real token.
    assert torch.equal(rollout.prompt_ids[0], rollout.prompt_ids[2]) and rollout.prompt_mask[:, -1].all()
    for row in range(n):
        ids, mask = rollout.completion_ids[row], rollout.completion_mask[row].bool()
        eos = (ids == tokenizer.eos_token_id).nonzero().flatten()
        if rollout.truncated[row]:
            assert len(eos) == 0 and mask.sum() == rollout.completion_ids.shape[1]
        else:
            assert mask.sum() == eos[0] + 1  # real tokens end with the first EOS
        assert torch.all(ids[~mask] == tokenizer.pad_token_id)
    assert torch.equal(rollout.attention_mask[:, -rollout.completion_ids.shape[1]:], rollout.completion_mask.long())


def test_an_untrained_model_truncates_and_the_flag_says_so(tiny):
    # A random 103-token model rarely samples EOS within 8 tokens: most completions are truncated.
    torch.manual_seed(0)
    rollout = rollout_for(tiny, ["x"] * 4, max_completion_length=8)
    assert rollout.truncated.float().mean() > 0.5
    assert torch.equal(rollout.truncated, rollout.completion_lengths == 8)


def test_greedy_completion_does_not_depend_on_batch_padding(tiny):
    alone = rollout_for(tiny, ["7+8="], num_generations=1, do_sample=False)
    padded = rollout_for(tiny, ["7+8=", "a prompt long enough to force left padding"], num_generations=1,
                         do_sample=False)
    width = alone.completion_ids.shape[1]
    assert torch.equal(padded.completion_ids[0, :width], alone.completion_ids[0])


def test_top_k_one_sampling_is_greedy(tiny):
    greedy = rollout_for(tiny, ["3+4="], num_generations=1, do_sample=False)
    torch.manual_seed(123)
    sampled = rollout_for(tiny, ["3+4="], num_generations=2, top_k=1, temperature=1.7)
    assert torch.equal(sampled.completion_ids[0], greedy.completion_ids[0])
    assert torch.equal(sampled.completion_ids[1], greedy.completion_ids[0])


def test_generation_restores_training_mode(tiny):
    model, _ = tiny
    model.train()
    rollout_for(tiny, ["1"], num_generations=1)
    assert model.training
    model.eval()


# ---- the sampler: the distribution the logprobs score, nothing added ---------------------------


def test_sample_tokens_draws_each_token_with_its_probability():
    # 600 tokens: three blocks of 256, the last one partly padding; some tokens impossible.
    torch.manual_seed(0)
    probs = torch.rand(600) ** 4
    probs[::7] = 0.0
    probs = probs / probs.sum()
    draws = 400_000
    torch.manual_seed(1)
    tokens = torch.cat([sample_tokens(probs.expand(20_000, -1)) for _ in range(draws // 20_000)])
    frequency = torch.bincount(tokens, minlength=600).float() / draws
    assert frequency[::7].sum() == 0  # a zero-probability token is never drawn
    # Within 5 standard deviations of a multinomial count, token by token.
    sigma = (probs * (1 - probs) / draws).sqrt()
    assert torch.all((frequency - probs).abs() <= 5 * sigma + 1e-7)


def test_filter_logits_is_transformers_top_k_then_top_p():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    for top_k, top_p in [(5, 1.0), (0, 0.9), (10, 0.5), (0, 0.01)]:
        expected = logits
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(None, expected)
        assert torch.equal(filter_logits(logits, top_k, top_p).isinf(), expected.isinf()), (top_k, top_p)


def test_greedy_decoding_equals_transformers_generate(tiny):
    model, tokenizer = tiny
    batch = PromptCollator(tokenizer, max_prompt_length=64)([{"prompt": p} for p in ["1+1=", "a longer prompt 9*9="]])
    ours = decode(model.eval(), batch["input_ids"], batch["attention_mask"], max_new_tokens=12, do_sample=False,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    theirs = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=config)
    assert torch.equal(ours, theirs[:, batch["input_ids"].shape[1]:])


def test_top_k_zero_samples_the_whole_vocabulary(tiny):
    # transformers' generate reads top_k=None as its default top_k=50: the sampler must not.
    torch.manual_seed(0)
    rollout = rollout_for(tiny, ["x"], num_generations=400, max_completion_length=1, top_k=0)
    assert rollout.completion_ids[:, 0].unique().numel() > 60


def test_completions_stop_at_any_end_of_turn_id_the_model_declares(tiny_model_dir):
    """A chat model may end its turn with a token its tokenizer does not call EOS (Llama-3's
    <|eot_id|>): the generation config's ids stop completions too."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, 7]
    model.generation_config.eos_token_id = None
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id]
    mask, truncated = completion_mask(torch.tensor([[5, 7, 9], [5, 6, 9]]), [tokenizer.eos_token_id, 7])
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]] and truncated.tolist() == [False, True]
