"""The anatomy of one llmrl GRPO step, for benchmarks/vs_trl.py and benchmarks/engines.py: the
limit (the work a step cannot avoid, measured two ways) and the wall time of each phase of the loop.
Not a test."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from statistics import median


def synchronize(device: str):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure_limit(trainer, size, device: str) -> dict:
    """Seconds for the work a GRPO step cannot avoid, two ways each: generating one rollout
    (transformers' `model.generate`; llmrl's `decode`) and one forward + backward over it in the
    step's micro-batches (a plain `cross_entropy` on completion positions; llmrl's
    `completion_logprobs`). No optimizer step, no scoring."""
    import torch
    from transformers import GenerationConfig

    from llmrl.logprobs import completion_logprobs
    from llmrl.rollout import decode

    model = trainer.accelerator.unwrap_model(trainer.model)
    tokenizer = trainer.tokenizer
    batch = next(iter(trainer.loader))
    prompt_ids = batch["input_ids"].repeat_interleave(size.num_generations, 0).to(model.device)
    prompt_mask = batch["attention_mask"].repeat_interleave(size.num_generations, 0).to(model.device)
    special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = GenerationConfig(max_new_tokens=size.completion_len, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, **special)

    def timed(function):
        synchronize(device)
        start = time.perf_counter()
        result = function()
        synchronize(device)
        return time.perf_counter() - start, result

    model.eval()
    hf_generate, sequences = timed(lambda: model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                                          generation_config=config))
    llmrl_decode, _ = timed(lambda: decode(model, prompt_ids, prompt_mask, max_new_tokens=size.completion_len,
                                           **special))
    model.train()
    mask = torch.cat([prompt_mask, torch.ones_like(sequences[:, prompt_ids.shape[1]:])], dim=1)
    completion = sequences.shape[1] - prompt_ids.shape[1]

    def plain():
        for i in range(0, len(sequences), size.micro_batch):
            ids = sequences[i:i + size.micro_batch]
            logits = model(input_ids=ids, attention_mask=mask[i:i + size.micro_batch], use_cache=False,
                           logits_to_keep=completion + 1).logits[:, :-1]
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, -completion:].flatten()).backward()

    def ours():
        for i in range(0, len(sequences), size.micro_batch):
            rows = slice(i, i + size.micro_batch)
            completion_logprobs(model, sequences[rows], mask[rows], completion).mean().backward()

    plain_fb, _ = timed(plain)
    llmrl_fb, _ = timed(ours)
    model.zero_grad(set_to_none=True)
    return {"hf_generate": hf_generate, "llmrl_decode": llmrl_decode, "plain_fb": plain_fb, "llmrl_fb": llmrl_fb}


class Phases:
    """Wall time per phase of each llmrl step, by wrapping the functions the loop calls."""

    def __init__(self, device: str):
        self.device = device
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.active = False

    def wrap(self, owner, name: str, phase: str):
        function = getattr(owner, name)  # a renamed function fails here, not as a silently empty phase

        def timed(*args, **kwargs):
            if self.active:  # nested: counted in the outer phase
                return function(*args, **kwargs)
            self.active = True
            synchronize(self.device)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.current[phase] += time.perf_counter() - start
                self.active = False

        setattr(owner, name, timed)

    def install(self, trainer):
        import llmrl.logprobs
        import llmrl.trainers.online as online

        collector = trainer.collector
        self.wrap(collector.engine, "sync_weights", "weight sync (vLLM)")
        self.wrap(collector.engine, "generate", "generation")
        self.wrap(collector, "score", "reward (decode + score)")
        self.wrap(trainer, "_logprobs_no_grad", "old/ref logprobs (no grad)")
        self.wrap(trainer, "advantages", "advantages")
        self.wrap(llmrl.logprobs, "padded_forward", "forward: model")
        self.wrap(llmrl.logprobs, "selective_log_softmax", "forward: log-softmax, entropy")
        for name in ("policy_loss", "aggregate_loss", "kl_penalty", "masked_mean"):
            self.wrap(online, name, "loss and metrics")
        self.wrap(trainer.accelerator, "backward", "backward")
        self.wrap(trainer.accelerator, "clip_grad_norm_", "grad clip")
        self.wrap(trainer.optimizer, "step", "optimizer")
        self.wrap(trainer.optimizer, "zero_grad", "optimizer")

    def end_step(self, step_time: float):
        self.current["overhead"] = step_time - sum(self.current.values())
        self.current["total"] = step_time
        self.steps.append(dict(self.current))
        self.current = defaultdict(float)

    def torch_profile(self, step, batches):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            metrics = step(batches)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
        return metrics


def print_profile(phases: list[dict]) -> None:
    keys = list(dict.fromkeys(key for step in phases for key in step if key != "total"))
    total = median(step["total"] for step in phases)
    print(f"\nprofile of one llmrl GRPO step (median of {len(phases)} steps, {total:.3f} s):")
    rows = sorted(((key, median(step.get(key, 0.0) for step in phases)) for key in keys), key=lambda kv: -kv[1])
    for key, seconds in rows:
        print(f"  {key:30}{seconds:9.3f} s {100 * seconds / total:6.1f}%")
