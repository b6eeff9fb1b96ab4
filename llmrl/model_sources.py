"""Is a model name something llmrl can load, before transformers tries?

transformers reads a missing folder as a hub name and answers "Repo id must be in the form ...",
or that it could not connect to the hub, never that the folder is missing. `check_model_source`
says so in one line that names the recipe field; `load_failed` turns transformers' multi-line
OSErrors into one.
"""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub
from huggingface_hub.utils import HFValidationError, validate_repo_id

from llmrl.recipe import RecipeError

# A save_pretrained folder holds at least one of these (a tokenizer-only folder, its tokenizer files).
MODEL_FOLDER_FILES = ("config.json", "adapter_config.json", "tokenizer_config.json", "tokenizer.json")


def check_model_source(name: str, field: str = "model", revision: str | None = None) -> None:
    """Refuse, before transformers tries, a model that is neither a saved model folder nor reachable on the hub.

    transformers reads a missing folder as a hub name and answers 'Repo id must be in the form ...',
    or that it could not connect to the hub, never that the folder is missing; an empty folder
    gets a ValueError about tokenizer backends. A name is taken for a local path when it cannot be
    a hub repo id ('./m', '/abs/m', '~/m', 'a/b/c') or its first folder exists here ('outputs/m');
    offline, a hub name must be in the hub cache. Any other name is left to the hub, so real hub
    names load as before. `field` names the recipe field in the message."""
    name = str(name)
    path = Path(name)
    if path.is_file():
        raise RecipeError(f"{field} {name!r} is a file; give the folder that holds the saved model, {str(path.parent)!r}.")
    if path.is_dir():
        if not any((path / file).is_file() for file in MODEL_FOLDER_FILES):
            raise RecipeError(f"{field} {name!r} is a folder without a saved model in it (no config.json, tokenizer "
                              f"or adapter files). Save one there first (save_pretrained, or `python -m llmrl.tiny "
                              f"{name}` for a tiny test model), or give the folder that holds it.")
        return
    where = f"{field} {name!r} is not a folder here (working directory {os.getcwd()})"
    if name.startswith("~") and path.expanduser().exists():
        raise RecipeError(f"{field} {name!r}: '~' is not expanded when loading a model; write the full path, "
                          f"{str(path.expanduser())!r}.")
    if _is_local_path(name):
        raise RecipeError(f"{where}. Give the folder of a saved model (config.json + *.safetensors), e.g. one that "
                          "`python -m llmrl.tiny FOLDER` or a finished run wrote, or a hub name such as 'Qwen/Qwen2.5-0.5B'.")
    if huggingface_hub.is_offline_mode() and not _in_hub_cache(name, revision):
        raise RecipeError(f"{where}, and the hub is offline (HF_HUB_OFFLINE) with no cached copy of it. Give a local "
                          "model folder, or download the model once while online (hf download NAME).")


def load_failed(what: str, name: str, error: OSError) -> RecipeError:
    """transformers' OSError (several lines, with links) as one line that the CLI prints."""
    return RecipeError(f"Could not load {what} {name!r}: {' '.join(str(error).split())}")


def _is_local_path(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:  # not `name` or `namespace/name` of letters, digits, '-', '_', '.'
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def _in_hub_cache(name: str, revision: str | None) -> bool:
    files = ("config.json", "tokenizer_config.json", "adapter_config.json")
    return any(isinstance(huggingface_hub.try_to_load_from_cache(name, file, revision=revision), str) for file in files)
