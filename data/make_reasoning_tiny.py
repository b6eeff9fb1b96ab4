"""Writes data/reasoning_tiny/train.jsonl: small arithmetic questions for the reasoning rewards.

    python data/make_reasoning_tiny.py [--rows 48] [--seed 0] [--out data/reasoning_tiny/train.jsonl]

Each row is a chat `prompt` (the system prompt asking for <think>/<answer>, then the question) and an
`answer` column in the shapes real datasets use, so the accuracy reward meets each of them: a plain
integer (``19``), thousands with a comma (``1,254``), a negative number, a LaTeX fraction
(``\\frac{7}{2}``) and a GSM8K worked answer ending in ``#### 20``. Same seed, same file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from llmrl.rewards import REASONING_SYSTEM_PROMPT


def question_and_answer(kind: str, rng: random.Random) -> tuple[str, str]:
    if kind == "add":
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        return f"What is {a} + {b}?", str(a + b)
    if kind == "subtract":
        a, b = rng.randint(1, 50), rng.randint(1, 99)
        return f"What is {a} - {b}?", str(a - b)
    if kind == "multiply":
        a, b = rng.randint(12, 99), rng.randint(12, 99)
        return f"What is {a} * {b}?", f"{a * b:,}"
    if kind == "halve":
        n = rng.randint(3, 49)
        return f"What is half of {n}?", f"\\frac{{{n}}}{{2}}" if n % 2 else str(n // 2)
    percent, base = rng.choice([10, 20, 25, 50, 75]), 20 * rng.randint(1, 20)
    result = base * percent // 100
    return f"What is {percent}% of {base}?", f"{percent}% of {base} is {base} * {percent} / 100 = {result}. #### {result}"


KINDS = ("add", "subtract", "multiply", "halve", "percent")


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question, answer = question_and_answer(KINDS[i % len(KINDS)], rng)
        prompt = [{"role": "system", "content": REASONING_SYSTEM_PROMPT}, {"role": "user", "content": question}]
        rows.append({"prompt": prompt, "answer": answer})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "reasoning_tiny" / "train.jsonl"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in make_rows(args.rows, args.seed)))
    print(f"wrote {args.rows} rows to {out}")


if __name__ == "__main__":
    main()
