"""llmrl against TRL, side by side: GRPO and DPO step time, tokens per second and peak memory. Not a test.

    python benchmarks/vs_trl.py grpo --size micro
    python benchmarks/vs_trl.py grpo --size small      # also the limit and a profile of one llmrl step
    python benchmarks/vs_trl.py dpo --size micro
    python benchmarks/vs_trl.py dpo --size small
    python benchmarks/vs_trl.py grpo --size 0.5b --device cuda   # on a GPU: bf16, ~0.5B random weights

Both sides are the real trainers (`llmrl.RLTrainer` / `llmrl.DPOTrainer`, `trl.GRPOTrainer` /
`trl.DPOTrainer`) on the same tiny Llama (`llmrl.tiny` presets, saved once to a temporary folder),
the same data (random printable strings of fixed length, so both see the same token counts),
seeds and hyperparameters. `matched_settings` lists, field by field, what was set on each side;
the TRL fields that differ from TRL's defaults are printed with the table.

Method.
- Every measured run is a fresh subprocess (this script with `--child`), so its peak memory is its
  own and neither framework warms the allocator or caches for the other. Runs alternate
  llmrl, TRL, TRL, llmrl, ... (ABBA), so load that drifts during the benchmark hits both alike.
- A run trains `warmup + steps` optimizer steps; a step's time is the wall time between the ends of
  two consecutive optimizer steps, so it holds everything the loop does (data, generation, scoring,
  the update, the previous step's logging) for both. Reported: the median over every timed step of
  every run of a framework, and the ratio of the medians.
- Tokens per second: the step's prompt + completion tokens (no padding) over its time.
- Peak memory: on CPU, the run's peak resident set size (`ru_maxrss`) at the end of training; both
  processes import torch, transformers and trl (llmrl uses trl too), so the fixed part is alike.
  On CUDA, `torch.cuda.max_memory_allocated`.
- The limit (GRPO): in each llmrl run, after training, the time to generate one rollout (same
  prompts, sampling settings and lengths) plus one forward and backward over the same sequences in
  the same micro-batches, with no scoring and no optimizer step. Each part is timed two ways:
  transformers alone (`model.generate`; the LM head on completion positions and a plain
  `cross_entropy`) and llmrl's own pieces (`llmrl.rollout.decode`, `completion_logprobs`). The limit
  is the faster of each part; reported: llmrl's median step / the median limit, and the ratio to
  the transformers-only limit.
- The profile (GRPO, `--profile`, on by default for small): one more llmrl run whose phases are
  timed by wrapping the functions the loop calls (generation, reward, forward, log-softmax
  and entropy, loss, backward, optimizer); nested calls count in the outer phase; overhead is what the
  step spends outside them. `--torch_profile` adds torch.profiler's top operators for one step.

Timings on a shared machine are noisy: compare the ratios, which were measured side by side. On a
machine where other jobs hold cores, pass `--threads 1`: with two torch threads and one core busy
elsewhere, every parallel region waits for the descheduled thread (a micro-model forward/backward
went from 5 ms to 390 ms), which measures the scheduler, not the trainers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

from step_profile import Phases, measure_limit, print_profile, synchronize  # beside this file

MiB = 2**20


@dataclass
class Size:
    model: dict  # llmrl.tiny.build_tiny_model arguments
    prompt_len: int  # tokens (characters) per prompt
    completion_len: int  # tokens generated per completion (GRPO) / per answer before EOS (DPO)
    num_generations: int
    prompts: int  # prompts per GRPO step
    micro_batch: int  # sequences per GRPO micro-batch; DPO: pairs per micro-batch = micro_batch / 2
    warmup: int = 1
    steps: int = 3


SIZES = {
    # ~0.09M parameters, overhead-dominated.
    "micro": Size(model={}, prompt_len=16, completion_len=16, num_generations=4, prompts=4, micro_batch=8,
                  warmup=2, steps=8),
    # ~19.4M parameters, vocabulary 32k, compute-dominated.
    "small": Size(model={"hidden_size": 384, "num_layers": 4, "num_heads": 6, "intermediate_size": 1024,
                         "vocab_size": 32000},
                  prompt_len=32, completion_len=128, num_generations=8, prompts=8, micro_batch=16),
    # ~0.5B parameters with Qwen2.5-0.5B's shape, for a GPU.
    "0.5b": Size(model={"hidden_size": 896, "num_layers": 24, "num_heads": 14, "num_key_value_heads": 2,
                        "intermediate_size": 4864, "vocab_size": 151936, "max_position_embeddings": 2048},
                 prompt_len=128, completion_len=256, num_generations=8, prompts=8, micro_batch=16, warmup=2, steps=5),
}


def distinct_characters(prompts, completions, **kwargs) -> list[float]:
    """The reward: the share of distinct characters in each completion. Cheap, so the step is the trainer's."""
    return [len(set(c)) / max(len(c), 1) for c in completions]


# ---- the settings of both sides ---------------------------------------------------------------


def matched_settings(algo: str, size: Size, args) -> tuple[dict, dict]:
    """(llmrl config fields, TRL config fields) for one run; every value that matters is on both."""
    accum = size.prompts * size.num_generations // size.micro_batch
    common = dict(learning_rate=1e-6, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
                  seed=args.seed, max_steps=size.warmup + size.steps, logging_steps=1, report_to="none",
                  gradient_accumulation_steps=accum, disable_tqdm=True)
    if algo == "grpo":
        ours = dict(common, algorithm="grpo", per_device_train_batch_size=size.micro_batch,
                    num_generations=size.num_generations, max_prompt_length=size.prompt_len,
                    max_completion_length=size.completion_len, temperature=1.0, top_p=1.0, top_k=0,
                    beta=args.beta, epsilon=0.2, scale_rewards="group", loss_agg_mode="seq_mean_token_mean",
                    num_iterations=1, save_steps=0, log_completions_steps=0)
        theirs = dict(common, per_device_train_batch_size=size.micro_batch, num_generations=size.num_generations,
                      max_completion_length=size.completion_len, temperature=1.0, top_p=1.0, top_k=0,
                      beta=args.beta, epsilon=0.2, scale_rewards="group",
                      loss_type="grpo",  # TRL default "dapo"; "grpo" is llmrl's seq_mean_token_mean
                      num_iterations=1, log_completions=False, save_strategy="no")
    else:
        pairs = size.micro_batch // 2
        accum = size.prompts * size.num_generations // size.micro_batch
        length = size.prompt_len + size.completion_len + 8
        ours = dict(common, algorithm="dpo", per_device_train_batch_size=pairs, gradient_accumulation_steps=accum,
                    beta=0.1, loss_type="sigmoid", max_prompt_length=size.prompt_len + 8, max_length=length,
                    precompute_ref_log_probs=False, save_steps=0)
        theirs = dict(common, per_device_train_batch_size=pairs, gradient_accumulation_steps=accum, beta=0.1,
                      loss_type=["sigmoid"], max_length=length, precompute_ref_log_probs=False,
                      padding_free=False, save_strategy="no")
    # TRL's own defaults that would make it a different computation: bf16 autocast (TRL defaults
    # bf16=True) and gradient checkpointing (TRL defaults it on; llmrl off).
    cuda = args.device == "cuda"
    theirs.update(bf16=cuda, gradient_checkpointing=False, use_cpu=not cuda,
                  model_init_kwargs={"dtype": "bfloat16" if cuda else "float32"})
    return ours, theirs


def trl_changes(theirs: dict, algo: str) -> dict:
    """The TRL fields set to values other than TRL's defaults."""
    from trl import DPOConfig, GRPOConfig

    config = GRPOConfig if algo == "grpo" else DPOConfig
    default = config(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False)
    skip = {"max_steps", "seed", "use_cpu", "report_to", "disable_tqdm"}
    return {k: v for k, v in theirs.items() if k not in skip and getattr(default, k, object()) != v}


# ---- one run, in its own process ----------------------------------------------------------------


def peak_memory_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB  # Linux reports KiB


def load_rows(spec: dict):
    from datasets import load_dataset

    return load_dataset("json", data_files=spec["data"], split="train")


def run_llmrl(spec: dict, size: Size, ours: dict) -> dict:
    from llmrl import DPOConfig, DPOTrainer, ModelConfig, RLConfig, RLTrainer

    model_config = ModelConfig(model_name_or_path=spec["model_dir"],
                               dtype="bfloat16" if spec["device"] == "cuda" else "float32")
    ours = dict(ours, output_dir=tempfile.mkdtemp(prefix="llmrl-bench-"), report_to=["none"])
    ends, tokens, generation = [], [], []
    if spec["algo"] == "grpo":
        trainer = RLTrainer(spec["model_dir"], RLConfig(**ours), load_rows(spec),
                            reward_funcs=[distinct_characters], model_config=model_config)
        step_name = "step"
    else:
        trainer = DPOTrainer(spec["model_dir"], DPOConfig(**ours), load_rows(spec), model_config=model_config)
        step_name = "training_step"
    phases = Phases(spec["device"]) if spec.get("profile") else None
    if phases is not None:
        phases.install(trainer)
    original = getattr(trainer, step_name)

    def timed_step(batches):
        if phases is not None and len(ends) == size.warmup and spec.get("torch_profile"):
            metrics = phases.torch_profile(original, batches)
        else:
            metrics = original(batches)
        synchronize(spec["device"])
        ends.append(time.perf_counter())
        if "tokens_per_second" in metrics:
            tokens.append(metrics["tokens_per_second"] * metrics["step_time"])
        if "generation_time" in metrics:  # benchmarks/engines.py reports it
            generation.append(metrics["generation_time"])
        if phases is not None:
            phases.end_step(metrics["step_time"])
        return metrics

    setattr(trainer, step_name, timed_step)
    trainer.train()
    result = {"ends": ends, "tokens": tokens, "generation": generation, "peak_mib": peak_memory_mib(spec["device"])}
    if phases is not None:
        result["phases"] = phases.steps[size.warmup:]
    if spec["algo"] == "grpo" and spec.get("limit"):
        result["limit"] = [measure_limit(trainer, size, spec["device"]) for _ in range(2)]
    return result


def sync_trl_vllm_by_reload() -> None:
    """TRL's colocated weight sync hands vLLM's `model.load_weights` one tensor at a time, which
    vLLM's CPU backend refuses (its repacked linear layers have no `weight_loader`: AttributeError).
    On a CPU only, TRL's same weights (`_iter_named_params`) go through vLLM's `reload_weights`, as
    llmrl's do; on a GPU TRL runs unchanged."""
    from trl.generation.vllm_generation import VLLMGeneration

    def sync_weights(self):
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._iter_named_params()})
        self.llm.reset_prefix_cache()

    VLLMGeneration.sync_weights = sync_weights


def run_trl(spec: dict, size: Size, theirs: dict) -> dict:
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

    ends, tokens_seen = [], []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            synchronize(spec["device"])
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                tokens_seen.append(logs["num_tokens"])

    theirs = dict(theirs, output_dir=tempfile.mkdtemp(prefix="trl-bench-"))
    if theirs.get("use_vllm") and spec["device"] == "cpu":
        sync_trl_vllm_by_reload()
    if spec["algo"] == "grpo":
        trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=[distinct_characters], args=GRPOConfig(**theirs),
                              train_dataset=load_rows(spec), callbacks=[Timer()])
    else:
        trainer = DPOTrainer(model=spec["model_dir"], args=DPOConfig(**theirs), train_dataset=load_rows(spec),
                             callbacks=[Timer()])
    trainer.train()
    tokens = [b - a for a, b in zip([0.0, *tokens_seen], tokens_seen)] if spec["algo"] == "grpo" else []
    return {"ends": ends, "tokens": tokens, "peak_mib": peak_memory_mib(spec["device"])}


def child(spec: dict) -> None:
    size = Size(**spec["size"])
    ours, theirs = spec["settings"]
    run = run_llmrl if spec["framework"] == "llmrl" else run_trl
    result = run(spec, size, ours if spec["framework"] == "llmrl" else theirs)
    print("RESULT " + json.dumps(result))


# ---- the parent: data, model, alternating runs, the table ------------------------------------------


def make_data(algo: str, size: Size, path: Path, seed: int) -> None:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " "

    def text(n):
        return "".join(rng.choice(alphabet) for _ in range(n))

    rows = ([{"prompt": text(size.prompt_len)} for _ in range(256)] if algo == "grpo" else
            [{"prompt": text(size.prompt_len), "chosen": text(size.completion_len),
              "rejected": text(size.completion_len)} for _ in range(256)])
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def launch(spec: dict) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0 or "RESULT " not in done.stdout:
        raise RuntimeError(f"{spec['framework']} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    if spec.get("torch_profile"):
        print(done.stderr[done.stderr.find("----"):])
    return json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def report(algo: str, size_name: str, size: Size, args, runs: dict, params: int, changes: dict):
    times, rates, peaks, limits = {}, {}, {}, []
    for framework, results in runs.items():
        steps, tokens = [], []
        for result in results:
            intervals = [b - a for a, b in zip(result["ends"], result["ends"][1:])][size.warmup - 1:]
            steps += intervals
            if result["tokens"]:
                tokens += result["tokens"][size.warmup:]
            limits += result.get("limit", [])
        if not tokens:  # DPO: every pair has the same length on both sides
            pairs_per_step = size.prompts * size.num_generations // 2
            tokens = [2 * pairs_per_step * (size.prompt_len + size.completion_len + 1)] * len(steps)
        times[framework] = median(steps)
        rates[framework] = median(t / s for t, s in zip(tokens, steps))
        peaks[framework] = max(result["peak_mib"] for result in results)
    memory = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    shape = (f"{size.prompts} prompts x {size.num_generations} generations" if algo == "grpo" else
             f"{size.prompts * size.num_generations // 2} pairs")
    print(f"\n{algo.upper()} {size_name}: {params / 1e6:.2f}M parameters, vocabulary {size.model.get('vocab_size', 103)}, "
          f"{shape} per step, prompt {size.prompt_len} + completion {size.completion_len} tokens, micro-batch "
          f"{size.micro_batch} sequences; {args.repeats} runs x {size.steps} timed steps per framework "
          f"(after {size.warmup} warmup), device {args.device}, torch threads {args.threads or 'default'}")
    print(f"{'':14}{'median step s':>15}{'tokens/s':>12}{memory:>15}")
    for framework in runs:
        print(f"{framework:14}{times[framework]:15.3f}{rates[framework]:12.0f}{peaks[framework]:15.0f}")
    time_ratio, memory_ratio = times["llmrl"] / times["trl"], peaks["llmrl"] / peaks["trl"]
    time_target = {"grpo": {"micro": 0.7, "small": 0.85}, "dpo": {"micro": 0.8, "small": 0.8}}[algo].get(size_name)
    verdict = "" if time_target is None else f" (target <= {time_target}: {'met' if time_ratio <= time_target else 'missed'})"
    print(f"{'llmrl / TRL':14}{time_ratio:15.2f}{rates['llmrl'] / rates['trl']:12.2f}{memory_ratio:15.2f}")
    print(f"step time ratio {time_ratio:.2f}{verdict}; peak memory ratio {memory_ratio:.2f} "
          f"(target <= 1: {'met' if memory_ratio <= 1 else 'missed'})")
    if limits:
        parts = {key: median(limit[key] for limit in limits) for key in limits[0]}
        plain = parts["hf_generate"] + parts["plain_fb"]
        fastest = min(parts["hf_generate"], parts["llmrl_decode"]) + min(parts["plain_fb"], parts["llmrl_fb"])
        ratio = times["llmrl"] / fastest
        target = " (target <= 1.15: " + ("met)" if ratio <= 1.15 else "missed)") if size_name == "small" else ""
        print(f"limit, generation + one forward/backward: transformers' generate {parts['hf_generate']:.3f} s + plain "
              f"cross_entropy forward/backward {parts['plain_fb']:.3f} s = {plain:.3f} s; llmrl's decode "
              f"{parts['llmrl_decode']:.3f} s, completion_logprobs forward/backward {parts['llmrl_fb']:.3f} s; "
              f"the fastest of each = {fastest:.3f} s")
        print(f"llmrl step / limit = {ratio:.2f}{target} (over the transformers-only limit: {times['llmrl'] / plain:.2f})")
    print(f"TRL settings changed from TRL's defaults to match llmrl: {changes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("algo", nargs="?", choices=["grpo", "dpo"])
    parser.add_argument("--size", choices=sorted(SIZES), default="micro")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="runs per framework, alternating (ABBA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default: per size)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default: per size)")
    parser.add_argument("--beta", type=float, default=0.0, help="GRPO KL coefficient on both sides (> 0 adds a reference)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each run (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="GRPO: also profile one llmrl run (default: on for small)")
    parser.add_argument("--torch_profile", action="store_true", help="with --profile: torch.profiler's top operators")
    parser.add_argument("--only", choices=["llmrl", "trl"], help="run one framework (no ratios)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        child(spec)
        return
    if args.algo is None:
        parser.error("name a benchmark: grpo or dpo")

    from llmrl.tiny import build_tiny_model

    size = SIZES[args.size]
    size.warmup = args.warmup if args.warmup is not None else size.warmup
    size.steps = args.steps if args.steps is not None else size.steps
    size.warmup = max(size.warmup, 1)  # the first timed interval starts at the end of a warmup step
    ours, theirs = matched_settings(args.algo, size, args)
    workdir = Path(tempfile.mkdtemp(prefix="vs-trl-"))
    model, _ = build_tiny_model(str(workdir / "model"), seed=args.seed, **size.model)
    params = model.num_parameters()
    del model
    make_data(args.algo, size, workdir / "data.jsonl", args.seed)
    spec = dict(algo=args.algo, size=asdict(size), device=args.device, model_dir=str(workdir / "model"),
                data=str(workdir / "data.jsonl"), settings=[ours, theirs], threads=args.threads)
    print(f"load average before: {load()}", flush=True)
    frameworks = [args.only] if args.only else ["llmrl", "trl"]
    runs = {framework: [] for framework in frameworks}
    for repeat in range(args.repeats):
        order = frameworks if repeat % 2 == 0 else frameworks[::-1]
        for framework in order:
            result = launch(dict(spec, framework=framework, limit=args.algo == "grpo"))
            runs[framework].append(result)
            print(f"  run {repeat + 1} {framework}: steps {[round(b - a, 3) for a, b in zip(result['ends'], result['ends'][1:])]}"
                  f" s, peak {result['peak_mib']:.0f} MiB, load {load()}", flush=True)
    if len(frameworks) == 2:
        report(args.algo, args.size, size, args, runs, params, trl_changes(theirs, args.algo))
    profile = args.profile if args.profile is not None else (args.algo == "grpo" and args.size == "small")
    if profile and args.algo == "grpo" and "llmrl" in frameworks:
        result = launch(dict(spec, framework="llmrl", profile=True, torch_profile=args.torch_profile))
        print_profile(result["phases"])
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
