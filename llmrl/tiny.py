"""A tiny Llama-type model and a character-level tokenizer, built offline.

Tests, the demo and the benchmarks need a real `transformers` model without the hub. This module
builds one from a `LlamaConfig` (not Qwen2: a Qwen2 config makes `AutoTokenizer` swap in Qwen's
pre-tokenizer) and a tokenizer whose tokens are single characters, and saves both as an ordinary
Hugging Face folder that `AutoModelForCausalLM` / `AutoTokenizer` load with no llmrl import.

    python -m llmrl.tiny OUTPUT_DIR [--preset small] [--hidden_size 128 ...]

Vocabulary: special tokens first (ids 0..5), then tab, newline and printable ASCII. When the model
vocabulary is larger (a benchmark wants 32000), the tokenizer is padded with filler tokens
`<|extra_K|>` so that `len(tokenizer) == config.vocab_size`: every id the model can sample decodes
to text and nothing is out of range. A filler decodes to its name; encoding that name again gives
its characters, not the filler.
"""

from __future__ import annotations

import argparse

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

PAD, EOS, UNK = "<|pad|>", "<|end|>", "<|unk|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = (PAD, EOS, UNK) + tuple(f"<|{role}|>" for role in ROLES)
CHARACTERS = ("\t", "\n") + tuple(chr(code) for code in range(32, 127))
TOKENIZER_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(CHARACTERS)  # 103

# `<|role|>content<|end|>` per message, no separators. The assistant turn, EOS included, sits in a
# `{% generation %}` block so `return_assistant_tokens_mask` (TRL's assistant_only_loss) marks the
# tokens the model must learn to produce, stopping included.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- elif message['role'] in ['system', 'user'] -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- else -%}"
    "{{ raise_exception('The tiny chat template knows the roles system, user and assistant, not ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

# Named sizes. micro: build_tiny_model's defaults, ~0.09M parameters, for unit tests. demo: ~0.54M,
# the smallest that learns the demo's arithmetic (data/arithmetic) in a minute of CPU. small: ~19M
# with a 32k vocabulary, for benchmarks where the LM head and the log-softmax dominate memory as
# they do in real models.
PRESETS = {
    "micro": {},
    "demo": dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512),
    "small": dict(hidden_size=384, num_layers=4, num_heads=6, intermediate_size=1024, vocab_size=32000),
}


def build_tokenizer(vocab_size: int | None = None, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """The character-level tokenizer with the chat template; `vocab_size` pads it with fillers.

    The padding side is left at the transformers default (right); callers set what they need.
    """
    vocab_size = vocab_size or TOKENIZER_VOCAB_SIZE
    if vocab_size < TOKENIZER_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {TOKENIZER_VOCAB_SIZE} (the tokenizer's own tokens), got {vocab_size}.")
    fillers = [f"<|extra_{k}|>" for k in range(vocab_size - TOKENIZER_VOCAB_SIZE)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS + tuple(fillers))}
    # BPE with no merges = one token per character; Fuse joins tokens back without spaces.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        # transformers 5 renames this extra_special_tokens and still accepts the old name; 4.x
        # knows only this one.
        additional_special_tokens=[f"<|{role}|>" for role in ROLES],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )


def build_tiny_model(
    output_dir: str | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_key_value_heads: int | None = None,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A randomly initialised Llama-type causal LM and its tokenizer, saved to `output_dir` if given.

    Same arguments and seed -> same weights; the global RNG is left untouched. `vocab_size=None`
    uses the tokenizer's 103 tokens. Embeddings are tied: at this size the LM head would otherwise
    be most of the parameters. Returns (model in eval mode, float32, tokenizer).
    """
    tokenizer = build_tokenizer(vocab_size, model_max_length=max_position_embeddings)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_key_value_heads or num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).float()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    return model, tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmrl.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="micro")
    for name in ("hidden_size", "num_layers", "num_heads", "num_key_value_heads", "intermediate_size",
                 "vocab_size", "max_position_embeddings", "seed"):
        parser.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")
    args = vars(parser.parse_args(argv))
    output_dir, preset = args.pop("output_dir"), args.pop("preset")
    kwargs = {**PRESETS[preset], **{k: v for k, v in args.items() if v is not None}}
    model, _ = build_tiny_model(output_dir, **kwargs)
    c = model.config
    print(
        f"saved a {model.num_parameters():,}-parameter tiny model to {output_dir} (hidden {c.hidden_size}, "
        f"{c.num_hidden_layers} layers, {c.num_attention_heads} heads, vocabulary {c.vocab_size})"
    )


if __name__ == "__main__":
    main()
