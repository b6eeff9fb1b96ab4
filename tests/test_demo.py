"""The demo's claim, shortened: SFT then GRPO on the shipped arithmetic task raises held-out accuracy.

The full demo (`make demo`) runs 200 GRPO steps; this runs the same recipes with 100, about 2
minutes on one thread of a shared 2-core CPU.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from llmrl.demo import TEST_FILE, main

ROOT = Path(__file__).resolve().parents[1]


def make_splits(**kwargs):
    spec = importlib.util.spec_from_file_location("make_arithmetic", ROOT / "data" / "make_arithmetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_splits(**kwargs)


def test_shipped_data_is_what_the_seeded_script_makes():
    splits = make_splits(seed=0, n_train=2000, n_test=200, n_sft=1000)
    for name, rows in splits.items():
        shipped = [json.loads(line) for line in (ROOT / "data" / "arithmetic" / f"{name}.jsonl").read_text().splitlines()]
        assert shipped == rows, f"data/arithmetic/{name}.jsonl differs from python data/make_arithmetic.py"
    def questions(name):
        return {row["prompt"][0]["content"] for row in splits[name]}

    test = questions("test")
    swapped = {f"{q[:-1].split('+')[1]}+{q[:-1].split('+')[0]}=" for q in test if "+" in q}
    assert not (questions("train") | questions("sft")) & (test | swapped), "a held-out question is trained on"
    assert not questions("train") & questions("sft")
    for row in splits["preferences"]:
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]


def test_sft_then_grpo_raises_heldout_accuracy(tmp_path):
    result = main(["--output_dir", str(tmp_path), "--rl_steps", "100"])
    before, after = result["before"], result["after"]
    # The SFT start leaves room (20-70%), and 100 GRPO steps on prompts with only an answer checker
    # add at least 8 points on questions it never saw. Measured: seed 0 (this test) 35.0% -> 46.0%
    # and seed 1 47.0% -> 65.0% on a 2-core Xeon, seed 0 33.0% -> 44.5% on a 2-core AMD EPYC (float
    # rounding differs between CPU families); held-out accuracy moves by 3-5 points from one
    # evaluation to the next during RL, hence a margin below all three.
    assert 0.2 <= before <= 0.7, before
    assert after >= before + 0.08, (before, after)

    evals = [json.loads(line) for line in (tmp_path / "eval_grpo.jsonl").read_text().splitlines()]
    assert len(evals) == 200 and all(row["answer"] for row in evals)
    assert sum(row["rewards"]["accuracy"] for row in evals) / 200 == pytest.approx(after)
    assert len(evals) == len(TEST_FILE.read_text().splitlines())
    png = (tmp_path / "curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
