"""The demo `make demo` runs (`python -m llmrl.demo`): does it actually learn?

On a plain CPU, with no download: build a ~0.54M-parameter tiny model offline, teach it 1- and 2-digit
additions and subtractions by SFT on 1,000 worked examples (recipes/demo/sft.yaml), then run GRPO
(recipes/demo/grpo.yaml) on 2,000 other questions whose only feedback is a checker of the final answer.
Held-out accuracy (greedy, on 200 questions never trained on) is measured after SFT and after RL;
the reward and accuracy curve is written as a PNG. About 5 minutes on a 2-core CPU.

    python -m llmrl.demo [--algorithm dapo] [--rl_steps 50] [--output_dir outputs/demo]

Every step is a command you can run yourself; the demo prints each one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: recipes/ and data/ live there
RECIPES = ROOT / "recipes" / "demo"
TEST_FILE = ROOT / "data" / "arithmetic" / "test.jsonl"


def demo_recipe(name: str, output_dir: Path, model_dir: Path, **overrides):
    """recipes/demo/NAME.yaml with the model, the output folder and the data files pointed at
    `model_dir`, `output_dir` and this repository (so the demo runs from any working directory)."""
    from llmrl.recipe import load_recipe, read_yaml

    values = read_yaml(RECIPES / f"{name}.yaml")
    for key in ("dataset_name", "eval_dataset_name"):
        if values.get(key):
            values[key] = str(ROOT / values[key])
    # The demo regenerates its folders on every run: a rerun replaces the previous run's models.
    values.update(model_name_or_path=str(model_dir), output_dir=str(output_dir), overwrite_output_dir=True, **overrides)
    return load_recipe(None, **values)


def heldout_accuracy(model_dir: Path, output_file: Path) -> float:
    """`llmrl eval` of `model_dir` on the held-out split: greedy answers, accuracy reward, one
    JSON line per question in `output_file`."""
    from llmrl.evaluation import run_eval
    from llmrl.recipe import load_recipe

    recipe = load_recipe(None, model_name_or_path=str(model_dir), dataset_name=str(TEST_FILE),
                         reward_funcs=["accuracy"], max_completion_length=8, per_device_eval_batch_size=200)
    return run_eval(recipe, str(output_file))["accuracy"]


def command(*parts: str) -> str:
    return " ".join(parts)


def plot_curve(history: list[dict], start_accuracy: float, path: Path, title: str) -> None:
    """Training reward (mean accuracy of the sampled completions) per step and held-out accuracy
    (greedy) at each evaluation, starting from the SFT model's, as a PNG."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("The demo's curve needs matplotlib: pip install 'llmrl[demo]' (make demo installs it).") from None

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = [(h["step"], h["reward"]) for h in history if "reward" in h]
    evals = [(0, start_accuracy)] + [(h["step"], h["eval/accuracy"]) for h in history if "eval/accuracy" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), color="tab:blue", alpha=0.35, lw=1, label="reward of sampled completions (train prompts)")
    window = 10
    if len(train) >= window:
        smooth = [sum(r for _, r in train[i - window:i]) / window for i in range(window, len(train) + 1)]
        ax.plot([s for s, _ in train[window - 1:]], smooth, color="tab:blue", lw=2, label=f"reward, {window}-step mean")
    ax.plot(*zip(*evals), "o-", color="tab:orange", lw=2, label="held-out accuracy (greedy)")
    ax.set(xlabel="RL step", ylabel="accuracy", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m llmrl.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/demo", help="where the models, evaluations and curve go")
    parser.add_argument("--algorithm", default="grpo", choices=["grpo", "dapo"], help="the RL recipe after SFT")
    parser.add_argument("--rl_steps", type=int, default=None, help="RL steps (default: the recipe's 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's initial weights, SFT and RL")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads. One is right for this 0.5M-parameter model: its matrices are too small "
                             "to split, and with a second thread every op waits at a barrier for the slower one, which "
                             "on a busy 2-core machine made SFT 10x slower")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.output_dir)

    import torch

    from llmrl.tiny import PRESETS, build_tiny_model
    from llmrl.trainers import train

    def banner(text: str) -> None:
        print(f"\n=== [{time.perf_counter() - start:5.0f}s] {text}", flush=True)

    torch.set_num_threads(args.threads)
    flags = ["--overwrite_output_dir true"] + ([] if args.seed == 0 else [f"--seed {args.seed}"])  # recipes: seed 0
    banner(f"1/5 build the tiny model: python -m llmrl.tiny {out}/tiny --preset demo --seed {args.seed}")
    model, _ = build_tiny_model(str(out / "tiny"), **PRESETS["demo"], seed=args.seed)
    print(f"a {model.num_parameters():,}-parameter Llama-type model with a character tokenizer, built offline")

    banner(command("2/5 SFT warm-start: llmrl train recipes/demo/sft.yaml", f"--output_dir {out}/sft", *flags))
    train(demo_recipe("sft", out / "sft", out / "tiny", seed=args.seed))

    banner(command("3/5 held-out accuracy before RL: llmrl eval", f"--model_name_or_path {out}/sft",
                   "--dataset_name data/arithmetic/test.jsonl --reward_funcs accuracy"))
    before = heldout_accuracy(out / "sft", out / "eval_sft.jsonl")

    steps = [] if args.rl_steps is None else [f"--max_steps {args.rl_steps}"]
    rl_dir = out / args.algorithm
    banner(command(f"4/5 RL with only an answer checker: llmrl train recipes/demo/{args.algorithm}.yaml",
                   f"--output_dir {rl_dir}", *flags, *steps))
    overrides = {"seed": args.seed, **({} if args.rl_steps is None else {"max_steps": args.rl_steps})}
    history = train(demo_recipe(args.algorithm, rl_dir, out / "sft", **overrides))

    banner(command("5/5 held-out accuracy after RL: llmrl eval", f"--model_name_or_path {rl_dir}", "..."))
    after = heldout_accuracy(rl_dir, out / f"eval_{args.algorithm}.jsonl")
    curve = out / "curve.png"
    plot_curve(history, before, curve, f"{args.algorithm.upper()} after SFT on 1- and 2-digit +/- (tiny model, CPU)")

    result = {"before": before, "after": after, "seconds": round(time.perf_counter() - start, 1)}
    (out / "result.json").write_text(json.dumps(result) + "\n")
    print(f"""
held-out accuracy (200 questions never trained on, greedy answers):
  after SFT             {before:6.1%}
  after SFT + {args.algorithm.upper():<9} {after:6.1%}   ({100 * (after - before):+.1f} points)

outputs in {out}/:
  sft/, {args.algorithm}/         the models (plain transformers folders: AutoModelForCausalLM.from_pretrained)
  eval_sft.jsonl, eval_{args.algorithm}.jsonl   every held-out question with the answer given and its reward
  {args.algorithm}/completions.jsonl   sampled training completions and their rewards
  curve.png                 the reward and held-out accuracy during RL
done in {result['seconds']:.0f}s""")
    return result


if __name__ == "__main__":
    main()
