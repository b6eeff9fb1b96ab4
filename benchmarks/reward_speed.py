"""Seconds to score 10,000 completions with each built-in reward function. Not a test.

    python benchmarks/reward_speed.py [--n 10000] [--latex_n 1000] [--seed 0]

The completions are GSM8K-like (seeded): a ``<think>`` paragraph of 40-200 words with numbers,
then an ``<answer>`` holding an integer (``1,234`` style half the time, right about half the time),
and some broken formats (no tags, text after the answer, a ``\\boxed{}`` answer instead). Each
reward is called once on the whole batch, as the trainer calls it, with ``completion_ids`` of a
plausible token count. Two extra rows: ``score_completions`` with every built-in at once, and
``accuracy`` on MATH-style LaTeX references (``\\frac{a\\sqrt{b}}{c}``), where answers that are not
numbers go to math-verify (``pip install 'llmrl[math]'``): the slow path that plain numbers skip,
measured on `--latex_n` distinct completions and scaled to `--n`.
"""

from __future__ import annotations

import argparse
import random
import time

from llmrl.rewards import REWARD_FUNCTIONS, score_completions

WORDS = "so we add the total then each of apples costs left over more than half twice per day".split()


def gsm8k_like(rng: random.Random) -> tuple[str, str]:
    """(completion, reference) in the shapes a reasoning run meets."""
    answer = rng.randint(1, 20000)
    words = [rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randint(1, 999)) for _ in range(rng.randint(40, 200))]
    said = answer if rng.random() < 0.5 else answer + rng.randint(1, 9)
    shown = f"{said:,}" if rng.random() < 0.5 else str(said)
    think = " ".join(words)
    shape = rng.random()
    if shape < 0.6:
        text = f"<think>\n{think}\n</think>\n<answer>\n{shown}\n</answer>"
    elif shape < 0.75:
        text = f"<think>\n{think}\n</think>\n<answer>\n{shown}\n</answer>\nHope this helps!"
    elif shape < 0.9:
        text = f"{think} so the answer is \\boxed{{{shown}}}."
    else:
        text = f"{think} The answer is {shown}"
    return text, f"{' '.join(words[:20])} #### {answer}"


def latex_like(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(1, 50), rng.choice([2, 3, 5, 6, 7]), rng.randint(2, 60)
    reference = f"\\frac{{{a}\\sqrt{{{b}}}}}{{{c}}}"
    answer = f"\\frac{{{a}}}{{{c}}}\\sqrt{{{b}}}" if rng.random() < 0.5 else f"\\frac{{{a + 1}\\sqrt{{{b}}}}}{{{c}}}"
    return f"<think>\nrationalise\n</think>\n<answer>\n${answer}$\n</answer>", reference


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--latex_n", type=int, default=1000, help="completions for the math-verify row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = [gsm8k_like(rng) for _ in range(args.n)]
    completions, answers = [c for c, _ in rows], [a for _, a in rows]
    prompts = ["How many?"] * args.n
    ids = [[0] * (len(c) // 4) for c in completions]  # ~4 characters a token
    columns = {"answer": answers}

    print(f"{args.n} completions, {sum(map(len, completions)) / args.n:.0f} characters on average")
    print(f"{'reward':<34}{f'seconds per {args.n:,}':>20}{'us / completion':>18}")

    def report(name: str, seconds: float, measured_on: int) -> None:
        per = seconds / measured_on
        note = f"   (measured on {measured_on:,})" if measured_on != args.n else ""
        print(f"{name:<34}{per * args.n:>20.3f}{per * 1e6:>18.1f}{note}")

    for name, fn in REWARD_FUNCTIONS.items():
        report(name, timed(lambda fn=fn: fn(prompts, completions, completion_ids=ids, **columns)), args.n)
    report("score_completions (all of them)", timed(lambda: score_completions(
        list(REWARD_FUNCTIONS), None, prompts, completions, columns, completion_ids=ids)), args.n)

    latex = [latex_like(rng) for _ in range(args.latex_n)]
    accuracy = REWARD_FUNCTIONS["accuracy"]
    try:
        seconds = timed(lambda: accuracy(prompts[: args.latex_n], [c for c, _ in latex], answer=[a for _, a in latex]))
        report("accuracy, LaTeX (math-verify)", seconds, args.latex_n)
    except ImportError as err:
        print(f"accuracy, LaTeX: skipped ({err})")


if __name__ == "__main__":
    main()
