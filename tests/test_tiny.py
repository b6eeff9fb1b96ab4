"""The tiny model and tokenizer: a normal HF folder that plain transformers loads offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llmrl.tiny import TOKENIZER_VOCAB_SIZE, build_tiny_model, build_tokenizer, main

TEXT = "Hello, world!\n\tx = [1 + 2] * 3; print('ok') ~"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
PROMPT = "<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>"

# Runs in a fresh interpreter with the hub switched off and no llmrl import.
RELOAD_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
ids = tokenizer(sys.argv[3], return_tensors="pt").input_ids
with torch.no_grad():
    torch.save(model(ids).logits, out + "/logits.pt")
chat = json.loads(sys.argv[4])
prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
prompt_ids = tokenizer(prompt, return_tensors="pt")
generated = model.generate(**prompt_ids, max_new_tokens=20, do_sample=False)[0, prompt_ids.input_ids.shape[1]:]
json.dump({
    "roundtrip": tokenizer.decode(tokenizer(sys.argv[3]).input_ids),
    "prompt": prompt,
    "generated": generated.tolist(),
    "answer": tokenizer.decode(generated, skip_special_tokens=True),
    "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
}, open(out + "/result.json", "w"))
"""


def _teach_to_answer(model, tokenizer, answer: str, steps: int = 80) -> None:
    """A few Adam steps on one chat so the model says `answer` and then EOS."""
    ids = tokenizer.apply_chat_template(CHAT + [{"role": "assistant", "content": answer}], return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_saved_folder_reloads_offline_with_plain_transformers(tmp_path):
    model, tokenizer = build_tiny_model(seed=1)
    _teach_to_answer(model, tokenizer, "ok")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(tmp_path), str(tmp_path), TEXT, json.dumps(CHAT)],
        check=True, env=env, cwd=tmp_path, timeout=120,
    )
    result = json.loads((tmp_path / "result.json").read_text())

    with torch.no_grad():
        expected = model(tokenizer(TEXT, return_tensors="pt").input_ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-6)  # float rounding only
    assert result["roundtrip"] == TEXT
    assert result["prompt"] == PROMPT
    assert result["pad"] != result["eos"]
    # Greedy decoding answers and stops at EOS well before max_new_tokens.
    assert result["answer"] == "ok"
    assert result["generated"][-1] == result["eos"] and len(result["generated"]) == 3


def test_same_seed_same_weights_other_seed_other_weights():
    first, _ = build_tiny_model(seed=3)
    again, _ = build_tiny_model(seed=3)
    other, _ = build_tiny_model(seed=4)
    for a, b in zip(first.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_config_ids_and_tied_embeddings():
    model, tokenizer = build_tiny_model()
    assert model.config.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id == model.generation_config.pad_token_id
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.max_position_embeddings >= 512


def test_larger_model_vocab_pads_tokenizer_so_every_id_decodes():
    tokenizer = build_tokenizer(vocab_size=TOKENIZER_VOCAB_SIZE + 20)
    assert len(tokenizer) == TOKENIZER_VOCAB_SIZE + 20
    decoded = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    assert decoded[-1] == "<|extra_19|>"
    # Each printable character and newline is its own token, so any ASCII text round-trips.
    assert tokenizer.decode(tokenizer(TEXT).input_ids) == TEXT
    assert len(tokenizer(TEXT).input_ids) == len(TEXT)


def test_chat_template_marks_assistant_tokens_eos_included():
    tokenizer = build_tokenizer()
    chat = CHAT + [{"role": "assistant", "content": "yes"}]
    out = tokenizer.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(marked) == "yes<|end|>"
    assert marked[-1] == tokenizer.eos_token_id


def test_command_line_builds_and_saves(tmp_path, capsys):
    main([str(tmp_path), "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2", "--vocab_size", "200"])
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (32, 1, 200)
    count = AutoModelForCausalLM.from_pretrained(tmp_path).num_parameters()
    assert f"{count:,}-parameter" in capsys.readouterr().out
