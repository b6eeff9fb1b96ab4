"""Peak memory of `selective_log_softmax` against the naive float32 log-softmax. Not a test.

    python benchmarks/logprob_memory.py [--batch 8 --length 512 --vocab 32000 --chunk_size 256]

Reports the peak memory used *on top of* the logits themselves (and of the index), for float32 and
bfloat16 logits, forward only (reference / old logprobs) and forward + backward (the policy loss).
On CUDA: `torch.cuda.max_memory_allocated` after resetting the peak once the logits exist. On CPU:
each case runs in a fresh process and reports its peak resident set size (`ru_maxrss`) minus the
peak it had right after allocating the logits, so one case's freed memory cannot hide another's.
The child runs with glibc's mmap threshold fixed at 1 MiB: by default glibc raises the threshold
after the first large free and then keeps freed chunks in its heap, so RSS would count the
allocator's cache (as CUDA's "reserved" does) rather than what the method allocates.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from llmrl.logprobs import selective_log_softmax

MiB = 2**20


def naive(logits, index, chunk_size):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


METHODS = {"naive float32 log_softmax": naive, "selective_log_softmax": selective_log_softmax}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(method: str, dtype: str, backward: bool, args, device: str) -> float:
    """MiB of peak memory above the logits while computing the logprobs (and their gradient)."""
    torch.manual_seed(0)
    logits = torch.empty(args.batch, args.length, args.vocab, dtype=DTYPES[dtype], device=device)
    for row in logits:  # fill in place: a float32 randn followed by a cast would raise the baseline
        row.normal_()
    index = torch.randint(0, args.vocab, (args.batch, args.length), device=device)
    logits.requires_grad_(backward)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = _peak_bytes(device)
    logprobs = METHODS[method](logits, index, args.chunk_size)
    if backward:
        logprobs.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return (_peak_bytes(device) - baseline) / MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk_size", type=int, default=256)
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "DTYPE", "BACKWARD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.child:  # one CPU case in its own process; prints its result as JSON
        method, dtype, backward = args.child
        print(json.dumps(measure(method, dtype, backward == "1", args, device)))
        return

    size = args.batch * args.length * args.vocab
    print(f"logits [{args.batch}, {args.length}, {args.vocab}] on {device}, chunk_size {args.chunk_size}")
    print("peak memory above the logits, MiB (the logits: float32 "
          f"{size * 4 / MiB:.0f} MiB, bfloat16 {size * 2 / MiB:.0f} MiB)\n")
    print(f"{'dtype':9} {'pass':17} " + " ".join(f"{name:>26}" for name in METHODS) + f" {'ratio':>7}")
    for dtype in DTYPES:
        for backward in (False, True):
            peaks = []
            for method in METHODS:
                if device == "cuda":
                    peaks.append(measure(method, dtype, backward, args, device))
                    continue
                command = [sys.executable, __file__, "--child", method, dtype, str(int(backward))]
                command += [f"--{k}={getattr(args, k)}" for k in ("batch", "length", "vocab", "chunk_size")]
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MiB)}
                result = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
                peaks.append(json.loads(result.stdout))
            label = "forward+backward" if backward else "forward"
            ratio = peaks[0] / max(peaks[1], 1e-9)
            print(f"{dtype:9} {label:17} " + " ".join(f"{p:26.1f}" for p in peaks) + f" {ratio:6.1f}x")


if __name__ == "__main__":
    main()
