"""Writes data/gsm8k/{train,test}.jsonl from GSM8K (openai/gsm8k, config main) for the GPU recipes.

    python data/make_gsm8k.py [--out data/gsm8k]      # needs the Hugging Face hub, once

Each row is a chat `prompt` (the system prompt asking for <think>/<answer>, then the question) and
GSM8K's own `answer`, a worked solution ending in ``#### 72``: the accuracy reward reads the number
after ``####``. 7,473 training and 1,319 test rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmrl.rewards import REASONING_SYSTEM_PROMPT


def to_row(example: dict) -> dict:
    prompt = [{"role": "system", "content": REASONING_SYSTEM_PROMPT}, {"role": "user", "content": example["question"]}]
    return {"prompt": prompt, "answer": example["answer"]}


def main(argv: list[str] | None = None) -> None:
    import datasets

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "gsm8k"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = datasets.load_dataset("openai/gsm8k", "main", split=split)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(to_row(row)) + "\n" for row in rows))
        print(f"wrote {len(rows)} rows to {out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
