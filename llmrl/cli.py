"""`llmrl train RECIPE.yaml [--field value ...]` and `llmrl eval ...`.

The same entry point serves `llmrl`, `python -m llmrl` and `accelerate launch -m llmrl`.
"""

from __future__ import annotations

import sys

USAGE = """usage: llmrl train [RECIPE.yaml] [--field value ...] [--print_config]
       llmrl eval  [RECIPE.yaml] [--field value ...] [--output_file FILE.jsonl]
       llmrl train --help                  # every field of the recipe's algorithm (default grpo)
       llmrl train --algorithm dpo --help  # the fields of another trainer

Post-train a causal language model. A recipe is a flat YAML file of fields; flags override it,
the algorithm's preset fills what both leave unset. `--print_config` resolves and prints the
settings without training. The same command runs under `accelerate launch -m llmrl train ...`.

`llmrl eval` scores one completion per prompt (greedy unless --eval_do_sample true) of the
recipe's eval split, or of dataset_name when none is set, with its reward_funcs, e.g.
    llmrl eval --model_name_or_path outputs/grpo --dataset_name data/test.jsonl --reward_funcs accuracy
"""


def _fields_summary() -> str:
    import dataclasses

    from llmrl.config import ALGORITHMS, PRESETS, DataConfig, ModelConfig, TrainConfig

    def names(cls, skip=()):
        return " ".join(f.name for f in dataclasses.fields(cls) if f.name not in skip)

    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    lines = [
        f"algorithms: {', '.join(ALGORITHMS)} (online RL presets: {', '.join(PRESETS)})",
        "",
        f"model fields: {names(ModelConfig)}",
        f"data fields: {names(DataConfig)}",
        f"training fields (every trainer): {names(TrainConfig)}",
    ]
    for cls in dict.fromkeys(ALGORITHMS.values()):
        users = ", ".join(name for name, c in ALGORITHMS.items() if c is cls)
        lines.append(f"{cls.__name__} fields ({users}): {names(cls, skip=shared)}")
    return "\n".join(lines)


def _split_recipe(argv: list[str]) -> tuple[str | None, list[str]]:
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    return None, argv


def _train_help(recipe_path: str | None, flags: list[str]) -> str:
    from llmrl.recipe import algorithm_from_flags, build_parser, read_yaml

    algorithm = algorithm_from_flags(flags)
    if algorithm is None and recipe_path:
        algorithm = read_yaml(recipe_path).get("algorithm")
    parser = build_parser(algorithm or "grpo")
    parser.prog = "llmrl train [RECIPE.yaml]"
    return parser.format_help()


def train_command(argv: list[str]) -> int:
    from llmrl.recipe import load_recipe
    from llmrl.trainers import train

    recipe_path, flags = _split_recipe(argv)
    if "-h" in flags or "--help" in flags:
        print(_train_help(recipe_path, [f for f in flags if f not in ("-h", "--help")]))
        return 0
    print_only = "--print_config" in flags
    flags = [f for f in flags if f != "--print_config"]
    recipe = load_recipe(recipe_path, flags)
    if print_only:
        print(recipe.to_yaml(), end="")
        return 0
    train(recipe)
    import torch

    from llmrl.trainers.common import process_state

    _close_vllm()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        process_state().destroy_process_group()  # the run is over: every process has saved and waited
    return 0


def _close_vllm():
    """Shut down the run's vLLM engines, if any, while the process group they joined is there."""
    if "llmrl.generation.vllm_engine" in sys.modules:
        sys.modules["llmrl.generation.vllm_engine"].close_engines()


# The fields `llmrl eval` reads, besides the data fields and the model fields that load a model.
TRAINING_ONLY_MODEL_FIELDS = ("use_peft", "lora_", "gradient_checkpointing")
EVAL_FIELDS = ("reward_funcs", "reward_weights", "per_device_eval_batch_size", "max_prompt_length",
               "max_completion_length", "eval_do_sample", "temperature", "top_p", "top_k", "seed", "use_vllm",
               "vllm_gpu_memory_utilization", "vllm_max_model_length", "vllm_model_impl")


def _eval_help() -> str:
    import dataclasses

    from llmrl.config import DataConfig, ModelConfig, RLConfig

    def lines(fields):
        return "\n".join(f"  --{f.name:<28} {f.metadata.get('help', '')}" for f in fields)

    evaluated = [f for f in dataclasses.fields(RLConfig) if f.name in EVAL_FIELDS]
    loading = [f for f in dataclasses.fields(ModelConfig) if not f.name.startswith(TRAINING_ONLY_MODEL_FIELDS)]
    return "\n".join([
        "usage: llmrl eval [RECIPE.yaml] [--field value ...] [--output_file FILE.jsonl]", "",
        "Score one completion per prompt (greedy unless --eval_do_sample true) of the recipe's eval split, or of",
        "dataset_name when none is set, with its reward_funcs; prints the metrics as one JSON line.", "",
        "  --output_file FILE.jsonl       also write each prompt, completion and reward there", "",
        "generation and scoring:", lines(evaluated), "",
        "model:", lines(loading), "", "data:", lines(dataclasses.fields(DataConfig))])


def eval_command(argv: list[str]) -> int:
    from llmrl.evaluation import run_eval
    from llmrl.recipe import RecipeError, load_recipe

    recipe_path, flags = _split_recipe(argv)
    if "-h" in flags or "--help" in flags:
        print(_eval_help())
        return 0
    output_file = None
    if "--output_file" in flags:
        at = flags.index("--output_file")
        if at + 1 >= len(flags):
            raise RecipeError("--output_file needs a path, e.g. --output_file results.jsonl")
        output_file = flags[at + 1]
        flags = flags[:at] + flags[at + 2:]
    recipe = load_recipe(recipe_path, flags)
    try:
        run_eval(recipe, output_file)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    finally:
        _close_vllm()
    return 0


COMMANDS = {"train": train_command, "eval": eval_command}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if hasattr(sys.stdout, "reconfigure"):  # a log file or pipe gets each line as it is printed, not when
        sys.stdout.reconfigure(line_buffering=True)  # a block fills: a killed run's log keeps what it said
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print(_fields_summary())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"llmrl: unknown command {command!r}; use one of {sorted(COMMANDS)}.\n\n{USAGE}", file=sys.stderr)
        return 2
    from llmrl.data import DataError
    from llmrl.recipe import RecipeError
    from llmrl.rewards import RewardFunctionError, RewardSpecError
    from llmrl.trainers.checkpoint import CheckpointError
    from llmrl.trainers.guards import NonFiniteError
    from llmrl.trainers.signals import RunInterrupted

    try:
        return COMMANDS[command](rest)
    except (RecipeError, DataError, RewardSpecError, RewardFunctionError, CheckpointError, NonFiniteError) as err:
        print(f"llmrl: error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as err:
        print(f"llmrl: {err}", file=sys.stderr)
        return 128 + err.signum
    except NotImplementedError as err:
        print(f"llmrl: {err}", file=sys.stderr)
        return 3
