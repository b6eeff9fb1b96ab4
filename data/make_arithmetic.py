"""Writes data/arithmetic/: the demo's tiny verifiable task, additions and subtractions of 1-2 digit numbers.

    python data/make_arithmetic.py [--seed 0] [--sft 1000] [--train 2000] [--test 200] [--out data/arithmetic]

Files (JSON lines, same seed -> same files):

- `sft.jsonl`: 1,000 worked examples, a chat `prompt` (one user turn, e.g. ``37+48=``) and its
  `completion` (the answer, ``85``, as an assistant turn): the SFT warm-start.
- `train.jsonl`: 2,000 other questions as `prompt` + `answer`: the RL prompts, where the only
  feedback is the `accuracy` reward checking the answer.
- `test.jsonl`: 200 held-out questions, `prompt` + `answer`, in none of the other files (nor is
  their operand swap, for +).
- `preferences.jsonl`: for each train question, `chosen` = the right answer and `rejected` = a plausible
  wrong one (the carry or borrow forgotten, one digit off by one, or the answer off by ten), both as
  assistant turns: DPO's and the reward model's data.

Answers are short (1-3 characters), so sampling a completion costs a handful of tokens on a CPU.
Subtractions keep the larger number first, so no answer is negative.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def all_questions() -> list[tuple[int, str, int]]:
    """Every (a, op, b) of the task: a, b in 0..99, a >= b for subtraction."""
    adds = [(a, "+", b) for a in range(100) for b in range(100)]
    subs = [(a, "-", b) for a in range(100) for b in range(a + 1)]
    return adds + subs


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def wrong_answer(a: int, op: str, b: int, rng: random.Random) -> int:
    """A plausible mistake: the carry (borrow) forgotten digit by digit, one digit off by one, or +-10."""
    right = solve(a, op, b)
    mistakes = []
    if op == "+":
        mistakes.append((a // 10 + b // 10) % 10 * 10 + (a % 10 + b % 10) % 10)  # every carry dropped
    else:
        mistakes.append(abs(a // 10 - b // 10) * 10 + abs(a % 10 - b % 10))  # smaller digit from larger
    mistakes += [right + 1, right - 1, right + 10, right - 10]
    mistakes = [m for m in mistakes if m != right and m >= 0]
    return rng.choice(mistakes)


def prompt(a: int, op: str, b: int) -> list[dict]:
    return [{"role": "user", "content": f"{a}{op}{b}="}]


def assistant(value: int) -> list[dict]:
    return [{"role": "assistant", "content": str(value)}]


def make_splits(seed: int, n_train: int, n_test: int, n_sft: int) -> dict[str, list[dict]]:
    """{file stem: rows}; questions drawn without replacement: test, sft and train are disjoint."""
    rng = random.Random(seed)
    questions = all_questions()
    rng.shuffle(questions)
    test = questions[:n_test]
    # a+b and b+a are the same question to a learner: keep both out of train.
    held_out = set(test) | {(b, op, a) for a, op, b in test if op == "+"}
    rest = [q for q in questions[n_test:] if q not in held_out]
    sft, train = rest[:n_sft], rest[n_sft:n_sft + n_train]
    return {
        "train": [{"prompt": prompt(*q), "answer": str(solve(*q))} for q in train],
        "test": [{"prompt": prompt(*q), "answer": str(solve(*q))} for q in test],
        "sft": [{"prompt": prompt(*q), "completion": assistant(solve(*q))} for q in sft],
        "preferences": [{"prompt": prompt(*q), "chosen": assistant(solve(*q)), "rejected": assistant(wrong_answer(*q, rng))}
                        for q in train],
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000, help="RL prompts")
    parser.add_argument("--test", type=int, default=200, help="held-out questions")
    parser.add_argument("--sft", type=int, default=1000, help="worked examples for SFT")
    parser.add_argument("--out", default=str(Path(__file__).parent / "arithmetic"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in make_splits(args.seed, args.train, args.test, args.sft).items():
        write_jsonl(out / f"{name}.jsonl", rows)
        print(f"wrote {len(rows)} rows to {out / name}.jsonl")


if __name__ == "__main__":
    main()
