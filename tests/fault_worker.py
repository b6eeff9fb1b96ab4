"""`llmrl train` with a SIGKILL armed inside one save: what a power cut, the OOM killer or a
preempted machine does to a run. Used by tests/test_faults.py:

    python tests/fault_worker.py POINT TARGET llmrl-train-arguments...

TARGET is the save to hit: `checkpoint-<step>` (a checkpoint folder) or `final` (the final model
in output_dir). POINT is where in that save the process dies:

- `torch_save`: at the first `torch.save` into it (optimizer, RNG, scheduler), before it writes;
- `half_weights`: the first safetensors file written into it is cut to half its size, then the
  kill (the process died while writing it);
- `rename`: just before the complete folder is renamed into place (the last moment of the save).

The hooks are installed before transformers, accelerate or llmrl are imported, so every module
that imported `save_file` by name calls the hooked one. Nothing here fakes the stack: the run, its
saves and its files are real, only the process is killed.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, target: str, output_dir: str) -> None:
    import safetensors.torch
    import torch

    out = str(Path(output_dir).resolve())

    def aimed(path) -> bool:
        path = str(Path(path).resolve())
        if target == "final":  # a file of the final model: directly in output_dir or in a staging folder there
            inside = os.path.dirname(path)
            return inside == out or (os.path.dirname(inside) == out and "checkpoint-" not in os.path.basename(inside))
        return re.search(rf"{re.escape(target)}(/|$)", path) is not None

    if point == "torch_save":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and aimed(f):
                kill()
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    elif point == "half_weights":
        real_save_file = safetensors.torch.save_file

        def save_file(tensors, filename, *args, **kwargs):
            result = real_save_file(tensors, filename, *args, **kwargs)
            if aimed(filename):
                size = os.path.getsize(filename)
                with open(filename, "r+b") as handle:
                    handle.truncate(size // 2)
                kill()
            return result

        safetensors.torch.save_file = save_file
    elif point == "rename":
        for name in ("replace", "rename"):
            real = getattr(os, name)

            def move(src, dst, *args, _real=real, **kwargs):
                if os.path.basename(os.path.normpath(str(dst))) == target:
                    kill()
                return _real(src, dst, *args, **kwargs)

            setattr(os, name, move)
    else:
        raise SystemExit(f"unknown fault point {point!r}")


def main() -> int:
    point, target, *argv = sys.argv[1:]
    output_dir = argv[argv.index("--output_dir") + 1]
    arm(point, target, output_dir)
    from llmrl.cli import main as llmrl

    return llmrl(argv)


if __name__ == "__main__":
    sys.exit(main())
