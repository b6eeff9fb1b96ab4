"""TRL's config field names work in llmrl: each accepted with TRL's meaning or refused with what
llmrl does instead, all problems of a recipe, a command line or a constructor reported at once,
and docs/trl_fields.md kept in sync with the installed TRL."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from llmrl.config import DataConfig, DPOConfig, ModelConfig, RewardConfig, RLConfig, SFTConfig
from llmrl.config.trl_names import RENAMED, TRLFieldError, refusal, table, trl_defaults
from llmrl.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
OURS = {"GRPOConfig": RLConfig, "DPOConfig": DPOConfig, "SFTConfig": SFTConfig, "RewardConfig": RewardConfig}


def fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_field_of_trls_configs_is_either_ours_renamed_or_refused_with_a_reason():
    """A new TRL field fails this test until the table says what it is here."""
    shared = fields(ModelConfig) | fields(DataConfig)
    uncovered = sorted(f"{cls}.{name}" for cls, names in trl_defaults().items() for name in names
                       if name not in fields(OURS[cls]) | shared and name not in RENAMED and refusal(name) is None)
    assert uncovered == []


def test_the_docs_table_is_current():
    assert (ROOT / "docs" / "trl_fields.md").read_text() == table(), \
        "regenerate it: python -m llmrl.config.trl_names > docs/trl_fields.md"


def recipe(tmp_path, **values):
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump({"algorithm": "grpo", "model_name_or_path": "m", **values}))
    return path


@pytest.mark.parametrize("trl, ours", [
    ({"loss_type": "dapo"}, {"loss_agg_mode": "token_mean"}),
    ({"loss_type": "grpo"}, {"loss_agg_mode": "seq_mean_token_mean"}),
    ({"loss_type": "dr_grpo"}, {"loss_agg_mode": "seq_mean_token_sum_norm"}),
    ({"scale_rewards": True}, {"scale_rewards": "group"}),
    ({"scale_rewards": False}, {"scale_rewards": "none"}),
    ({"steps_per_generation": 4, "gradient_accumulation_steps": 2}, {"num_mini_batches": 2}),
    ({"delta": 3.0}, {"dual_clip": 3.0}),
    ({"save_strategy": "no"}, {"save_steps": 0}),
    ({"eval_strategy": "no", "eval_steps": 5}, {"eval_steps": 0}),
    ({"log_completions": True, "logging_steps": 3}, {"log_completions_steps": 3}),
    ({"model_init_kwargs": {"torch_dtype": "bfloat16", "attn_implementation": "eager"}},
     {"dtype": "bfloat16", "attn_implementation": "eager"}),
    ({"activation_checkpointing": True}, {"gradient_checkpointing": True}),
    ({"bf16": True}, {"mixed_precision": "bf16"}),
    ({"bf16": False}, {"mixed_precision": None}),  # TRL's "if the machine supports it": the launcher says
    # TRL's defaults and "off" values change nothing, so a recipe listing them runs.
    ({"tf32": None, "fp16": False, "use_vllm": False, "push_to_hub": False, "optim": "adamw_torch_fused",
      "importance_sampling_level": "token", "mask_truncated_completions": False, "min_p": None,
      "repetition_penalty": 1.0, "disable_dropout": True, "use_cpu": False, "chat_template_kwargs": None}, {}),
], ids=lambda value: ",".join(value) if isinstance(value, dict) else None)
def test_a_trl_recipe_field_becomes_llmrls(tmp_path, trl, ours):
    resolved = load_recipe(recipe(tmp_path, **trl)).to_dict()
    assert {key: resolved[key] for key in ours} == ours


def test_the_same_names_work_as_flags(tmp_path):
    resolved = load_recipe(recipe(tmp_path), ["--loss_type", "grpo", "--bf16", "true", "--save_strategy=no"]).to_dict()
    assert resolved["loss_agg_mode"] == "seq_mean_token_mean" and resolved["save_steps"] == 0
    assert resolved["mixed_precision"] == "bf16"


def test_every_refused_or_unknown_field_is_reported_at_once(tmp_path):
    path = recipe(tmp_path, torch_compile=True, vllm_server_port=9000, importance_sampling_level="sequence", loss_type="cispo",
                  lerning_rate=1e-3)
    with pytest.raises(RecipeError) as error:
        load_recipe(path, ["--optim", "sgd", "--num_generatons", "4"])
    message = str(error.value)
    assert "\n" not in message and "7 fields llmrl cannot take" in message
    for part in ["torch_compile=True (TRL's GRPOConfig): llmrl does not compile the model",
                 "vllm_server_port=9000 (TRL's GRPOConfig): llmrl generates with its own KV-cache loop or, with "
                 "use_vllm: true, with vLLM colocated in each training process",
                 "importance_sampling_level='sequence'", "loss_type: llmrl takes ['bnpo', 'dapo', 'dr_grpo', 'grpo']",
                 "'lerning_rate'", "Did you mean 'learning_rate'", "optim='sgd'", "torch.optim.AdamW",
                 "'num_generatons'", "Did you mean 'num_generations'"]:
        assert part in message, part


def test_a_constructor_takes_trl_names_and_reports_every_problem():
    config = RLConfig(loss_type="dapo", bf16=True, scale_rewards=True, steps_per_generation=2)
    assert (config.loss_agg_mode, config.mixed_precision, config.scale_rewards, config.num_mini_batches) == (
        "token_mean", "bf16", "group", 2)
    with pytest.raises(TRLFieldError) as error:
        RLConfig(bf16=True, fp16=True, use_transformers_paged=True, lora_r=8, learnig_rate=1e-3)
    message = str(error.value)
    assert message.startswith("RLConfig(...): 5 fields llmrl cannot take as given")
    assert "bf16: bf16 and fp16 are both true; choose one" in message
    assert "lora_r is a ModelConfig field: pass ModelConfig(lora_r=...)" in message
    assert "did you mean 'learning_rate'?" in message
    assert DPOConfig(loss_type="ipo").loss_type == "ipo", "DPO's loss_type is llmrl's own"


def test_a_recipe_with_trls_field_names_trains(tiny_model_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}="}) + "\n" for i in range(16)))
    path = recipe(tmp_path, model_name_or_path=tiny_model_dir, dataset_name=str(data), reward_funcs=["length"],
                  loss_type="dapo", scale_rewards=True, bf16=False, use_vllm=False, save_strategy="no",
                  steps_per_generation=2, gradient_accumulation_steps=1, log_completions=True, logging_steps=1,
                  per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=2,
                  report_to="none", output_dir=str(tmp_path / "out"), disable_tqdm=True)
    from llmrl.trainers import train

    history = train(load_recipe(path))
    assert [h["step"] for h in history] == [2], "steps_per_generation 2: one rollout, two optimizer steps"
    assert (tmp_path / "out" / "completions.jsonl").is_file() and not list((tmp_path / "out").glob("checkpoint-*"))


BF16_RUN = """
import json, sys
import datasets, torch
from llmrl import RLTrainer
from llmrl.config import RLConfig

def length(completions, **kwargs):
    return [float(len(c)) for c in completions]

args = RLConfig(output_dir=sys.argv[2], bf16=True, beta=0.04, num_generations=4, per_device_train_batch_size=8,
                max_completion_length=6, max_steps=2, report_to="none", disable_tqdm=True, logging_steps=1)
trainer = RLTrainer(sys.argv[1], args, datasets.Dataset.from_list([{"prompt": f"{i}+{i}="} for i in range(16)]),
                    reward_funcs=length)
dtypes = set()
policy = trainer.accelerator.unwrap_model(trainer.model)
policy.lm_head.register_forward_hook(lambda module, inputs, output: dtypes.add(str(output.dtype)))
history = trainer.train()
print(json.dumps({"mixed_precision": trainer.accelerator.mixed_precision, "dtypes": sorted(dtypes),
                  "weights": str(next(policy.parameters()).dtype), "kl": history[0]["kl"],
                  "ratio_max": history[0]["ratio_max"]}))
"""


def test_bf16_autocasts_every_forward_and_the_reference_with_it(tiny_model_dir, tmp_path):
    """TRL's bf16: true is autocast over float32 weights. The policy's forwards run in bfloat16,
    and so does the frozen reference copy: the first step's KL is exactly 0, as in float32. (In a
    process of its own: accelerate keeps one precision per process.)"""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", BF16_RUN, tiny_model_dir, str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads(result.stdout.strip().splitlines()[-1])
    assert run == {"mixed_precision": "bf16", "dtypes": ["torch.bfloat16"], "weights": "torch.float32", "kl": 0.0,
                   "ratio_max": 1.0}


def test_fp16_without_cuda_is_one_line(tmp_path):
    from llmrl.trainers.launch import make_accelerator

    if torch_has_cuda():
        pytest.skip("this machine has CUDA, where fp16 autocast runs")
    with pytest.raises(RecipeError, match=r"mixed_precision: fp16 \(TRL's fp16: true\) needs a CUDA GPU"):
        make_accelerator(RLConfig(output_dir=str(tmp_path), fp16=True))


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
