"""Generation engines: what samples a rollout's completions.

    engine = TransformersEngine(policy)
    rollout = engine.generate(batch, n=4, params=SamplingParams(max_tokens=256, temperature=1.0, ...))

An engine takes a `PromptCollator` batch (left-padded prompt ids) and returns a `Rollout`: `n`
completions per prompt, their masks, lengths and truncation flags. `TransformersEngine` is llmrl's
own KV-cache loop over the policy itself (`llmrl.rollout.decode`), so it samples from exactly the
weights being trained and `sync_weights` has nothing to do; an engine that keeps its own copy of
the weights (vLLM) reloads them there after every optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmrl.rollout import Rollout, generate_completions, stop_token_ids


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: the trainer's temperature, top_p, top_k and completion length, the ids that
    end a completion, and greedy decoding when `do_sample` is False."""

    max_tokens: int
    stop_token_ids: tuple[int, ...]
    pad_token_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True

    @classmethod
    def of(cls, args, model, tokenizer, **overrides) -> SamplingParams:
        """The sampling settings of a trainer config `args` (max_completion_length, temperature,
        top_p, top_k) for `model`, stopping at its EOS and end-of-turn ids (`stop_token_ids`)."""
        values = dict(max_tokens=args.max_completion_length, stop_token_ids=tuple(stop_token_ids(model, tokenizer)),
                      pad_token_id=tokenizer.pad_token_id, temperature=args.temperature, top_p=args.top_p,
                      top_k=args.top_k)
        return cls(**{**values, **overrides})


class TransformersEngine:
    """llmrl's own generation loop over `model` (the unwrapped policy), exactly on-policy."""

    name = "transformers"

    def __init__(self, model):
        self.model = model

    def generate(self, batch: dict, n: int, params: SamplingParams) -> Rollout:
        """`n` completions of each prompt of `batch`, all in one decoding batch."""
        return generate_completions(
            self.model, batch["input_ids"], batch["attention_mask"], num_generations=n,
            max_completion_length=params.max_tokens, eos_token_id=list(params.stop_token_ids),
            pad_token_id=params.pad_token_id, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k, do_sample=params.do_sample)

    def sync_weights(self) -> None:
        """Nothing to do: this engine samples from the policy module itself."""


def refuse_quantized_base(quantized: bool) -> None:
    """use_vllm needs the policy's weights in full precision: llmrl hands vLLM the base with the
    adapter merged in, which a 4-bit or 8-bit base does not hold."""
    if quantized:
        raise ValueError("use_vllm: true with a quantized base (load_in_4bit, QLoRA): llmrl gives vLLM the policy's "
                         "merged weights, which a 4-bit base does not hold in full precision. Train the adapter on a "
                         "bf16 base (load_in_4bit: false), or generate with llmrl's loop (use_vllm: false).")


def make_engine(model, args, accelerator, max_rows: int):
    """The engine `args` asks for (`use_vllm`) over `model`, the unwrapped policy. `max_rows`: the
    most completions one generate call makes (a rollout, an eval batch)."""
    if not getattr(args, "use_vllm", False):
        return TransformersEngine(model)
    from llmrl.generation.vllm_engine import VLLMEngine
    from llmrl.trainers.launch import sharded

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    refuse_quantized_base(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))
    if sharded(accelerator):
        raise ValueError("use_vllm: true with sharded weights (FSDP, DeepSpeed ZeRO-3): llmrl's colocated vLLM needs "
                         "the whole policy in every process. Launch with recipes/accelerate/ddp.yaml or zero2.yaml, "
                         "or generate with llmrl's loop (use_vllm: false).")
    return VLLMEngine(model, args, accelerator, max_rows)
