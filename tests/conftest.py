"""Shared fixtures. Everything is built offline; nothing is fetched from the hub.

`tiny_model_dir` is the fixture other tests should reuse: a saved HF folder holding the "micro"
tiny Llama (about 0.09M parameters, character-level tokenizer with chat template, pad != EOS),
built once per test session. Treat it as read-only: copy it if a test must change it.
"""

from __future__ import annotations

import os

import pytest

# No test may reach the hub; a fixture that tried to would fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tiny models' matrices are far too small to share between threads: on a busy 2-core
    machine torch's default pool made a tiny-model step ~30x slower (7 s instead of 0.2 s). The
    launched processes of the 2-process tests get OMP_NUM_THREADS=1 for the same reason."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """Path (str) of a saved micro tiny model + tokenizer folder, seed 0, shared by the whole session."""
    from llmrl.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny_model")
    build_tiny_model(str(path), seed=0)
    return str(path)


@pytest.fixture(scope="session")
def sharp_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The micro tiny model with its weight matrices scaled up 8x, so that greedy completions depend
    on the prompt (a freshly initialised model answers every prompt with the same characters)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("sharp_model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(8)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return str(path)


@pytest.fixture
def math_verify():
    """The LaTeX path, with math-verify installed (skipped without it) and a cold cache."""
    from llmrl.rewards import matching

    pytest.importorskip("math_verify")
    matching.symbolic_equal.cache_clear()
    yield
    matching.symbolic_equal.cache_clear()


@pytest.fixture
def without_math_verify(monkeypatch):
    """Answer checking as on a machine without math-verify."""
    from llmrl.rewards import matching

    matching.symbolic_equal.cache_clear()
    monkeypatch.setattr(matching, "_math_verify_module", matching._MISSING)
    monkeypatch.setattr(matching, "_warned_missing", False)
    yield
    matching.symbolic_equal.cache_clear()
