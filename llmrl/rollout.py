"""Rollouts: sample completions for a batch of prompts, and the masks the losses need.

A completion's real tokens run up to and including its first EOS; everything after is padding.
A completion with no EOS within `max_completion_length` is *truncated*, which the soft overlong
punishment and `missing_eos_penalty` read.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from llmrl.models import last_token_index, position_ids_from_mask


@dataclass
class Rollout:
    """`num_generations` completions for each of B prompts; N = B x num_generations rows, the
    completions of one prompt next to each other."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P] long
    completion_ids: torch.Tensor  # [N, C] pad after the first EOS
    completion_mask: torch.Tensor  # [N, C] float, 1.0 up to and including the first EOS
    truncated: torch.Tensor  # [N] bool, no EOS within max_completion_length
    group_ids: torch.Tensor  # [N] long, the prompt each row answers
    # [N, C] float: the log-prob the sampler gave each completion token (0 on padding), when the
    # sampler is not the policy module itself (vLLM); None from llmrl's own loop.
    sampler_logprobs: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt and completion, [N, P + C], for the log-probability passes."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask.long()], dim=1)

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1).long()

    def outcome_rewards(self, rewards: torch.Tensor) -> torch.Tensor:
        """`[N]` sequence rewards -> `[N, C]` per-token rewards: each on its completion's last real
        token (EOS included), 0 elsewhere, as `llmrl.algos.compute_advantages` expects them."""
        mask = self.completion_mask
        last = last_token_index(mask)[:, None]
        return torch.zeros_like(mask).scatter(1, last, rewards[:, None].to(mask.dtype)) * mask

    def _map(self, fn) -> "Rollout":
        return Rollout(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                          for f in fields(self)})

    def select(self, rows) -> "Rollout":
        """The rows `rows` (a bool mask, index tensor or slice) of every field."""
        return self._map(lambda x: x[rows])

    def to(self, device) -> "Rollout":
        return self._map(lambda x: x.to(device))

    def pad_rows(self, num_rows: int, filler: "Rollout", pad_token_id: int) -> "Rollout":
        """Grow to `num_rows` rows with copies of `filler`'s first row whose completion mask is 0:
        they count as no sequence and no token in any loss or statistic. A copy of a real row (not
        an all-padding one) keeps every attention row non-empty, so the forward stays finite."""
        missing = num_rows - len(self.group_ids)
        if missing <= 0:
            return self
        extra = filler.select(torch.zeros(missing, dtype=torch.long))
        extra.completion_mask = torch.zeros_like(extra.completion_mask)
        extra.group_ids = -1 - torch.arange(missing, device=extra.group_ids.device)  # in no real group
        return concat_rollouts([self, extra], pad_token_id)


def _eos_ids(eos_token_id) -> list[int]:
    return list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS and every `eos_token_id` of the model's
    generation config. Chat models often stop on an end-of-turn token their tokenizer does not call
    EOS (Llama-3's <|eot_id|>, Qwen's <|im_end|> in base tokenizers): missing it, completions would
    run on past the reply and count as truncated."""
    config = getattr(model, "generation_config", None)
    ids = [tokenizer.eos_token_id, *_eos_ids(getattr(config, "eos_token_id", None))]
    return list(dict.fromkeys(i for i in ids if i is not None))


def completion_mask(completion_ids: torch.Tensor, eos_token_id) -> tuple[torch.Tensor, torch.Tensor]:
    """`(mask [N, C] float, truncated [N] bool)` of generated ids: 1.0 up to and including the first
    EOS (`eos_token_id` an id or a list of ids), 0.0 after it; truncated rows have no EOS at all."""
    is_eos = torch.isin(completion_ids, torch.tensor(_eos_ids(eos_token_id), device=completion_ids.device))
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS tokens strictly before each position
    return (eos_before == 0).float(), ~is_eos.any(-1)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """`logits` [N, V] with the tokens outside the top-k and the top-p nucleus set to -inf, as
    transformers' `TopKLogitsWarper` then `TopPLogitsWarper` do (the likeliest token always stays).
    `top_k=0` and `top_p=1.0` are off."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = logits.sort(dim=-1)
        outside = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        outside[:, -1] = False
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


def sample_tokens(probs: torch.Tensor, block: int = 256) -> torch.Tensor:
    """One token per row of `probs` [N, V] (non-negative, any total): [N] long.

    Inverse-CDF sampling in two levels: a block of `block` tokens by its mass, then a token inside
    it. `torch.multinomial` draws an exponential variable for every vocabulary entry, which on a CPU
    costs ~45 ms for 64 rows of a 32k vocabulary, as much as the model's forward at each decoding
    step; this draws two uniforms per row (~2 ms). Two levels keep float32 cumulative sums short, so
    a token's chance is its probability to float32 rounding of its block's sum, not of the whole
    vocabulary's.
    """
    rows, vocab = probs.shape
    if vocab <= block:  # one block: torch.multinomial's exponentials are as few, and it is one call
        return torch.multinomial(probs, 1).squeeze(1)
    blocks = torch.nn.functional.pad(probs.float(), (0, -vocab % block)).view(rows, -1, block)
    mass = blocks.sum(-1)
    cdf = mass.cumsum(-1)
    # right=True: the first block whose cumulative mass exceeds the draw, so never an empty block.
    chosen = torch.searchsorted(cdf, torch.rand(rows, 1, device=probs.device) * cdf[:, -1:], right=True)
    chosen = chosen.clamp_(max=cdf.shape[1] - 1)
    inner = blocks[torch.arange(rows, device=probs.device), chosen.squeeze(1)].cumsum(-1)
    token = torch.searchsorted(inner, torch.rand(rows, 1, device=probs.device) * inner[:, -1:], right=True)
    token = (chosen * block + token.clamp_(max=block - 1)).squeeze(1)
    # A draw rounded up onto the very end can land on a zero-probability token: take the likeliest.
    return torch.where(probs.gather(1, token[:, None]).squeeze(1) > 0, token, probs.argmax(-1))


def _all_finished(finished: torch.Tensor) -> bool:
    """Every row of every process has ended. Under FSDP / ZeRO-3 each forward is a collective, so
    every process keeps decoding (padding its finished rows) until all of them are done."""
    done = finished.all()
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        done = done.float()
        torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
    return bool(done)


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int, eos_token_id,
           pad_token_id: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           do_sample: bool = True) -> torch.Tensor:
    """The completion ids [N, C <= max_new_tokens] of left-padded prompts [N, P], decoded with the
    model's KV cache; after a row's EOS, padding. Sampling follows transformers' `generate` (logits
    divided by the temperature, then top-k, then top-p), with `sample_tokens` in place of
    `torch.multinomial`; `do_sample=False` takes the argmax."""
    eos = torch.tensor(_eos_ids(eos_token_id), device=input_ids.device)
    positions = position_ids_from_mask(attention_mask)
    # The model builds its own cache type (sliding windows, hybrid layers) on the first call.
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    if not torch.isfinite(out.logits[:, -1]).all():  # one check per rollout: sampling would fail on NaN
        from llmrl.trainers.guards import NonFiniteError

        raise NonFiniteError("The policy's logits are not finite, so its weights are not: an update overflowed. "
                             "Resume from the last checkpoint (llmrl never saves non-finite weights) with a lower "
                             "learning_rate or max_grad_norm set.")
    position = positions[:, -1:]
    finished = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    tokens = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if do_sample:
            logits = filter_logits(logits / temperature, top_k, top_p)
            token = sample_tokens(logits.softmax(-1))
        else:
            token = logits.argmax(-1)
        token = token.masked_fill(finished, pad_token_id)
        tokens.append(token)
        finished |= torch.isin(token, eos)
        if step == max_new_tokens - 1 or _all_finished(finished):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position,
                    past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(tokens, dim=1)


@torch.no_grad()
def generate_completions(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_generations: int,
    max_completion_length: int,
    eos_token_id,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
) -> Rollout:
    """Sample `num_generations` completions per prompt, all prompts in one batch (`decode`).

    `input_ids`/`attention_mask` [B, P] are left-padded prompts. `do_sample=False` decodes greedily.
    The model is put in eval mode for generation (no dropout, and the KV cache on even when
    gradient checkpointing is) and restored afterwards.
    """
    prompt_ids = input_ids.repeat_interleave(num_generations, dim=0)
    prompt_mask = attention_mask.repeat_interleave(num_generations, dim=0)
    was_training = model.training
    model.eval()
    try:
        completion_ids = decode(model, prompt_ids, prompt_mask, max_new_tokens=max_completion_length,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id, temperature=temperature,
                                top_p=top_p, top_k=top_k, do_sample=do_sample)
    finally:
        model.train(was_training)
    mask, truncated = completion_mask(completion_ids, eos_token_id)
    completion_ids = completion_ids.masked_fill(mask == 0, pad_token_id)
    group_ids = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(num_generations)
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, truncated, group_ids)


def informative_groups(metric: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """DAPO's dynamic-sampling filter: `[N]` bool, True for rows whose group's `metric [N]` is not
    all equal. A flat group (all right or all wrong) has zero advantage everywhere and only dilutes
    the batch. A group of one is flat by definition."""
    _, index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(index.max()) + 1 if index.numel() else 0
    low = torch.full((num_groups,), float("inf"), dtype=metric.dtype, device=metric.device).scatter_reduce(0, index, metric, "amin")
    high = torch.full((num_groups,), float("-inf"), dtype=metric.dtype, device=metric.device).scatter_reduce(0, index, metric, "amax")
    return (high > low)[index]


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """The rows of several rollouts in one: prompts left-padded and completions right-padded to the
    widest of each."""
    prompt_width = max(p.prompt_ids.shape[1] for p in parts)
    width = max(p.completion_ids.shape[1] for p in parts)

    def pad(x, total, value, side):
        gap = total - x.shape[1]
        return torch.nn.functional.pad(x, (gap, 0) if side == "left" else (0, gap), value=value)

    return Rollout(
        prompt_ids=torch.cat([pad(p.prompt_ids, prompt_width, pad_token_id, "left") for p in parts]),
        prompt_mask=torch.cat([pad(p.prompt_mask, prompt_width, 0, "left") for p in parts]),
        completion_ids=torch.cat([pad(p.completion_ids, width, pad_token_id, "right") for p in parts]),
        completion_mask=torch.cat([pad(p.completion_mask, width, 0.0, "right") for p in parts]),
        truncated=torch.cat([p.truncated for p in parts]),
        group_ids=torch.cat([p.group_ids for p in parts]),
        sampler_logprobs=None if any(p.sampler_logprobs is None for p in parts) else torch.cat(
            [pad(p.sampler_logprobs, width, 0.0, "right") for p in parts]),
    )
