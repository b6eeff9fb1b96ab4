"""Recipes: a flat YAML file plus command-line flags, resolved into the three configs of a run.

Precedence: field defaults < the algorithm's preset < the recipe YAML < command-line flags.
The preset step happens in `RLConfig.__post_init__` (fields left `None` are filled from it);
this module only decides which values were given, and by whom.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from llmrl.config import ALGORITHMS, DataConfig, ModelConfig, TrainConfig, closest_name
from llmrl.config.trl_names import RENAMED, problems_message, refusal, translate


class RecipeError(ValueError):
    """A recipe or flag the user has to fix; the message says where and how."""


@dataclass
class Recipe:
    """The resolved settings of one run."""

    model: ModelConfig
    data: DataConfig
    args: TrainConfig
    source: str | None = None

    def to_dict(self) -> dict:
        """One flat mapping, algorithm first: it reloads as a recipe that reproduces the run."""
        flat = {"algorithm": self.args.algorithm}
        for part in (self.model, self.data, self.args):
            flat.update(dataclasses.asdict(part))
        return flat

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=110)

    def save(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write the resolved config to `output_dir/config.yaml` (atomically) and return its path."""
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".config.yaml.tmp"
        tmp.write_text(self.to_yaml())
        os.replace(tmp, out / "config.yaml")
        return out / "config.yaml"


class _Parser(HfArgumentParser):
    """HfArgumentParser that raises a RecipeError instead of printing usage and exiting, and
    takes no abbreviations (`--learning_rat` must be an error, not a silent `--learning_rate`)."""

    def __init__(self, dataclass_types):
        super().__init__(dataclass_types, allow_abbrev=False)

    def error(self, message):
        raise RecipeError(f"{message}. Run `llmrl train --help` for the fields and their types.")

    def add_argument(self, *args, **kwargs):
        """A field's help is plain text: a '%' in it ("~30% slower") is not an argparse format."""
        if isinstance(kwargs.get("help"), str):
            kwargs["help"] = kwargs["help"].replace("%", "%%")
        return super().add_argument(*args, **kwargs)


def config_classes(algorithm: str) -> tuple[type, type, type]:
    if algorithm not in ALGORITHMS:
        hint = closest_name(str(algorithm), ALGORITHMS)
        raise RecipeError(
            f"algorithm {algorithm!r} is unknown; choose one of {sorted(ALGORITHMS)}."
            + (f" Did you mean {hint!r}?" if hint else "")
        )
    return ModelConfig, DataConfig, ALGORITHMS[algorithm]


def build_parser(algorithm: str = "grpo") -> HfArgumentParser:
    """The argument parser of one algorithm's fields (its --help lists them all)."""
    return _Parser(config_classes(algorithm))


def _field_types(classes) -> dict[str, typing.Any]:
    hints = {}
    for cls in classes:
        hints.update(typing.get_type_hints(cls))
    return {name: hints[name] for cls in classes for name in (f.name for f in dataclasses.fields(cls))}


def _is_scalar_type(hint) -> bool:
    """int / float / str / bool, optionally `| None`: argparse converts these from strings."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return len(args) == 1 and _is_scalar_type(args[0])
    return hint in (int, float, str, bool)


def _owners(key: str) -> list[str]:
    """The trainer configs that have a field `key`."""
    return sorted({cls.__name__ for cls in ALGORITHMS.values() if key in {f.name for f in dataclasses.fields(cls)}})


def _unknown_key(key: str, valid, algorithm: str, where: str) -> RecipeError:
    if _owners(key):
        users = sorted(name for name, cls in ALGORITHMS.items() if cls.__name__ in _owners(key))
        return RecipeError(
            f"{key!r} in {where} is a setting of {' / '.join(_owners(key))} (algorithms {', '.join(users)}), "
            f"not of algorithm {algorithm!r}. Remove it or change algorithm."
        )
    every = {f.name for cls in (ModelConfig, DataConfig, *ALGORITHMS.values()) for f in dataclasses.fields(cls)}
    hint = closest_name(key, every)
    if hint and hint not in valid:
        hint_text = f" Did you mean {hint!r} (a setting of {' / '.join(_owners(hint))}, not of {algorithm!r})?"
    else:
        hint_text = f" Did you mean {hint!r}?" if hint else ""
    return RecipeError(f"Unknown field {key!r} in {where}.{hint_text} `llmrl train --help` lists the valid fields.")


def _trl_flags(flags: list[str], config_class, hints, given: dict) -> tuple[list[str], list[str]]:
    """TRL's names among the flags (`--loss_type dapo`, `--bf16 false`), translated as a recipe's
    are (`llmrl.config.trl_names`); returns the flags with llmrl's names, and the problems."""
    kept, trl_values, i = [], {}, 0
    while i < len(flags):
        token = flags[i]
        key = token[2:].split("=", 1)[0].replace("-", "_") if token.startswith("--") else ""
        if key and key not in hints and (key in RENAMED or refusal(key) is not None):
            if "=" in token:
                raw, i = token.split("=", 1)[1], i + 1
            elif i + 1 < len(flags) and not flags[i + 1].startswith("--"):
                raw, i = flags[i + 1], i + 2
            else:
                raw, i = "true", i + 1
            trl_values[key] = yaml.safe_load(raw)
            continue
        kept.append(token)
        i += 1
    if not trl_values:
        return flags, []
    translated, problems = translate(config_class, trl_values, hints, "the command line", {**given, **trl_values})
    for key, value in translated.items():
        kept += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return kept, problems


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"Recipe file {str(path)!r} does not exist.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise RecipeError(f"{path} must be a YAML mapping of field: value, got a {type(values).__name__}.")
    return values


def algorithm_from_flags(flags: list[str]) -> str | None:
    for i, flag in enumerate(flags):
        if flag.startswith("--algorithm="):
            return flag.split("=", 1)[1]
        if flag == "--algorithm" and i + 1 < len(flags):
            return flags[i + 1]
    return None


def load_recipe(path: str | os.PathLike | None = None, flags: list[str] | None = None, **values) -> Recipe:
    """Resolve a recipe file, command-line `flags` (['--learning_rate', '1e-5', ...]) and keyword
    `values` into a `Recipe`. Keyword values act like a recipe (flags still override them)."""
    flags = list(flags or [])
    given = {**(read_yaml(path) if path else {}), **values}
    where = str(path) if path else "the given values"
    algorithm = algorithm_from_flags(flags) or given.get("algorithm", "grpo")
    classes = config_classes(algorithm)
    hints = _field_types(classes)
    given, problems = translate(classes[2], given, hints, where)
    flags, flag_problems = _trl_flags(flags, classes[2], hints, given)
    problems += flag_problems + [str(_unknown_key(key, hints, algorithm, where)) for key in given if key not in hints]
    unknown_flags = [key for key in (t[2:].split("=", 1)[0] for t in flags if t.startswith("--")) if key not in hints]
    if problems and unknown_flags:  # argparse would report these only once the rest is fixed
        problems += [str(_unknown_key(key, hints, algorithm, "the command line")) for key in unknown_flags]
    if problems:
        raise RecipeError(problems_message(where, problems))

    # Scalars go in as strings, so argparse converts and checks them exactly as it does flags
    # (PyYAML also reads `1e-5` as a string: YAML 1.1 wants a dot in a float).
    defaults = {k: (str(v) if v is not None and _is_scalar_type(hints[k]) else v) for k, v in given.items()}
    parser = _Parser(classes)
    parser.set_defaults(**defaults)
    try:
        *configs, rest = parser.parse_args_into_dataclasses(args=flags, return_remaining_strings=True)
    except RecipeError as err:
        raise RecipeError(f"{where} or command line: {err}") from None
    except ValueError as err:  # a __post_init__ validation: the message already says what and why
        raise RecipeError(f"{where}: {err}") from None
    if rest:
        unknown = [token.lstrip("-").split("=")[0] for token in rest if token.startswith("--")] or rest[:1]
        raise RecipeError(problems_message("the command line", [str(_unknown_key(key, hints, algorithm,
                                                                                 "the command line"))
                                                                 for key in unknown]))
    model, data, args = configs
    return Recipe(model=model, data=data, args=args, source=str(path) if path else None)
