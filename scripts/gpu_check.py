"""The GPU check: a few steps of each family of llmrl on CUDA, pass/fail and peak memory per case.

    python scripts/gpu_check.py                 # on a CUDA machine, ~0.5B-shaped model, < 8 minutes
    python scripts/gpu_check.py --smoke         # the same plumbing on a CPU with a micro model

Runs on a machine without the hub: the model is a randomly initialised Qwen2 config of
Qwen2.5-0.5B's shape (896 hidden, 24 layers, 14 heads with 2 KV heads, 4864 MLP, tied embeddings)
with llmrl's character tokenizer padded to a 32k vocabulary (saved apart, as tokenizer_name_or_path:
a Qwen2 config would make AutoTokenizer swap in Qwen's pre-tokenizer). Random weights learn nothing
in 3 steps; what is checked is that each path runs on the GPU end to end, every logged loss is
finite and the final folder is written, and what each costs in GPU memory.

Each case is `llmrl train` on a recipe under `accelerate launch`, in its own process (the peak is
`torch.cuda.max_memory_allocated` of process 0, printed by this script's `--case` mode):
grpo_full_kl (all weights, bf16, KL so a frozen reference copy), grpo_lora, grpo_bf16_autocast
(float32 weights, accelerate's bf16 mixed precision), ppo_lora (shared critic), dpo_qlora (4-bit
base, bitsandbytes), grpo_lora_2gpu when the machine has 2 GPUs, and with vLLM installed grpo_vllm
and grpo_lora_vllm (use_vllm: true, the second with sleep mode; `--smoke` runs it without, as
vLLM has no sleep mode on a CPU). The peak leaves out what vLLM's own memory pool holds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN_05B_SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=32000)
SMOKE_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=32000)

COMMON = dict(max_steps=3, logging_steps=1, save_steps=0, log_completions_steps=0, learning_rate=1e-5,
              report_to=["none"], disable_tqdm=True, seed=0)
ONLINE = dict(reward_funcs=["length"], num_generations=4, per_device_train_batch_size=8,
              gradient_accumulation_steps=2, max_prompt_length=64, max_completion_length=128)

# name -> (recipe fields, accelerate launch flags, what the machine needs)
CASES = {
    "grpo_full_kl": (dict(algorithm="grpo", beta=0.04, dtype="bfloat16", gradient_checkpointing=True, **ONLINE),
                     ["--mixed_precision", "no"], ()),
    "grpo_lora": (dict(algorithm="grpo", use_peft=True, lora_r=16, dtype="bfloat16", **ONLINE),
                  ["--mixed_precision", "no"], ()),
    "grpo_bf16_autocast": (dict(algorithm="grpo", use_peft=True, dtype="float32", **ONLINE),
                           ["--mixed_precision", "bf16"], ("cuda",)),
    "ppo_lora": (dict(algorithm="ppo", use_peft=True, dtype="bfloat16", **{**ONLINE, "num_generations": 1}),
                 ["--mixed_precision", "no"], ()),
    "dpo_qlora": (dict(algorithm="dpo", use_peft=True, load_in_4bit=True, dtype="bfloat16", gradient_checkpointing=True,
                       per_device_train_batch_size=4, gradient_accumulation_steps=2, max_prompt_length=64,
                       max_length=192), ["--mixed_precision", "no"], ("cuda", "bitsandbytes")),
    "grpo_lora_2gpu": (dict(algorithm="grpo", use_peft=True, dtype="bfloat16", **ONLINE),
                       ["--mixed_precision", "no", "--multi_gpu", "--num_processes", "2"], ("cuda", "2 gpus")),
    "grpo_vllm": (dict(algorithm="grpo", dtype="bfloat16", use_vllm=True, **ONLINE), ["--mixed_precision", "no"],
                  ("vllm",)),
    "grpo_lora_vllm": (dict(algorithm="grpo", use_peft=True, lora_r=16, dtype="bfloat16", use_vllm=True,
                            vllm_enable_sleep_mode=True, **ONLINE), ["--mixed_precision", "no"], ("vllm",)),
}


def build_model(folder: Path, shape: dict) -> tuple[str, str]:
    """A random Qwen2 of `shape` in `folder/model` and llmrl's tokenizer in `folder/tokenizer`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    from llmrl.tiny import build_tokenizer

    tokenizer = build_tokenizer(shape["vocab_size"], model_max_length=1024)
    config = Qwen2Config(**shape, max_position_embeddings=1024, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "tokenizer")
    return str(folder / "model"), str(folder / "tokenizer")


def write_data(folder: Path) -> tuple[str, str]:
    prompts, pairs = folder / "prompts.jsonl", folder / "pairs.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}? Think step by step."}) + "\n"
                               for i in range(64)))
    pairs.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "chosen": f"{2 * i}. That is the sum.",
                                         "rejected": f"{i}{i}, I think."}) + "\n" for i in range(64)))
    return str(prompts), str(pairs)


def missing(needs, device_count: int) -> str | None:
    import importlib.util

    if "cuda" in needs and device_count == 0:
        return "needs CUDA"
    if "2 gpus" in needs and device_count < 2:
        return f"needs 2 GPUs, {device_count} visible"
    if "bitsandbytes" in needs and importlib.util.find_spec("bitsandbytes") is None:
        return "needs bitsandbytes (pip install 'llmrl[quant]')"
    if "vllm" in needs and importlib.util.find_spec("vllm") is None:
        return "needs vLLM (pip install 'llmrl[vllm]')"
    return None


def run_case(recipe_path: str) -> None:
    """`--case`: one `llmrl train` run in this process; prints its result as one JSON line."""
    import torch

    from llmrl.recipe import load_recipe
    from llmrl.trainers import train

    history = train(load_recipe(recipe_path, []))
    losses = [h["loss"] for h in history if "loss" in h]
    state = __import__("llmrl.trainers.common", fromlist=["process_state"]).process_state()
    if state.is_main_process:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        print("GPU_CHECK " + json.dumps({"losses": losses, "finite": all(map(math.isfinite, losses)),
                                         "peak_gib": peak, "steps": len(losses)}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check: a micro model, CPU-only cases")
    parser.add_argument("--only", nargs="*", help="run these cases only")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        run_case(args.case)
        return 0

    import torch

    device_count = torch.cuda.device_count()
    if not args.smoke and device_count == 0:
        print("gpu_check: no CUDA device visible; run with --smoke for the CPU plumbing check.", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="llmrl-gpu-check-"))
    model, tokenizer = build_model(work, SMOKE_SHAPE if args.smoke else QWEN_05B_SHAPE)
    prompts, pairs = write_data(work)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.smoke:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    failures, start = 0, time.perf_counter()
    print(f"{'case':<22} {'result':<6} {'peak GiB':>9} {'time':>7}  detail")
    for name, (fields, launch, needs) in CASES.items():
        if args.only and name not in args.only:
            continue
        reason = missing(needs, 0 if args.smoke else device_count)
        if reason:
            print(f"{name:<22} {'skip':<6} {'':>9} {'':>7}  {reason}")
            continue
        recipe = {**COMMON, **fields, "model_name_or_path": model, "tokenizer_name_or_path": tokenizer,
                  "dataset_name": pairs if fields["algorithm"] == "dpo" else prompts,
                  "output_dir": str(work / name)}
        if args.smoke:
            recipe["dtype"] = "float32"
            recipe.pop("vllm_enable_sleep_mode", None)  # CUDA only
        path = work / f"{name}.yaml"
        path.write_text(json.dumps(recipe))  # JSON is YAML
        flags = ["--num_machines", "1", "--dynamo_backend", "no", *launch]
        if "--num_processes" not in flags:
            flags += ["--num_processes", "1"] + (["--cpu"] if args.smoke else [])
        began = time.perf_counter()
        result = subprocess.run([accelerate, "launch", *flags, __file__, "--case", str(path)], capture_output=True,
                                text=True, env=env, timeout=600)
        seconds = time.perf_counter() - began
        lines = [line for line in result.stdout.splitlines() if line.startswith("GPU_CHECK ")]
        report = json.loads(lines[-1][len("GPU_CHECK "):]) if lines else None
        saved = (work / name / "adapter_config.json").exists() or (work / name / "model.safetensors").exists()
        ok = result.returncode == 0 and report is not None and report["finite"] and report["steps"] > 0 and saved
        failures += not ok
        detail = (f"losses {[round(x, 4) for x in report['losses']]}" if ok else
                  (result.stderr.strip().splitlines() or ["no output"])[-1][:200])
        peak = f"{report['peak_gib']:.2f}" if report else ""
        print(f"{name:<22} {'pass' if ok else 'FAIL':<6} {peak:>9} {seconds:>6.0f}s  {detail}", flush=True)
    print(f"{failures} failed; {time.perf_counter() - start:.0f} s in all; work folder {work}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
