"""What use_vllm brings that needs no vLLM: the importance-sampling correction against its formula
on hand-made log-probs, and TRL's vLLM settings in a config or recipe (tests/test_vllm.py runs vLLM)."""

import math

import pytest
import torch

from llmrl.algos import sampler_correction
from llmrl.config import RLConfig
from llmrl.config.trl_names import TRLFieldError

LN = math.log


def case():
    """Two completions: row 0 has three tokens with pi_old / pi_sampler = 2, 1/4, 1.2 and one pad;
    row 1 has two tokens with ratios 1.5 and 2 (product 3) and two pads."""
    sampler = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-3.0, -1.0, 0.0, 0.0]])
    ratio = torch.tensor([[2.0, 0.25, 1.2, 1.0], [1.5, 2.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    return sampler + ratio.log(), sampler, mask


def test_token_truncate_clamps_each_tokens_ratio():
    old, sampler, mask = case()
    weights, stats = sampler_correction(old, sampler, mask, "token_truncate", clip_min=0.5, clip_max=1.5)
    assert torch.allclose(weights, torch.tensor([[1.5, 0.5, 1.2, 0.0], [1.5, 1.5, 0.0, 0.0]]))
    assert stats["ratio_min"] == pytest.approx(0.25) and stats["ratio_max"] == pytest.approx(2.0)
    assert stats["ratio_mean"] == pytest.approx((2 + 0.25 + 1.2 + 1.5 + 2) / 5)
    assert stats["outside_bounds"] == pytest.approx(3 / 5)  # 2, 0.25 and 2 (1.5 is on the bound)
    assert stats["logp_diff_max"] == pytest.approx(LN(4)) and stats["logp_diff_mean"] == pytest.approx(
        (LN(2) + LN(4) + LN(1.2) + LN(1.5) + LN(2)) / 5)


def test_token_mask_drops_the_tokens_outside_the_bounds():
    old, sampler, mask = case()
    weights, _ = sampler_correction(old, sampler, mask, "token_mask", clip_min=0.5, clip_max=1.5)
    assert torch.allclose(weights, torch.tensor([[0.0, 0.0, 1.2, 0.0], [1.5, 0.0, 0.0, 0.0]]))


def test_sequence_modes_use_the_product_of_a_completions_ratios():
    old, sampler, mask = case()
    # Row 0: 2 x 1/4 x 1.2 = 0.6; row 1: 1.5 x 2 = 3.
    weights, stats = sampler_correction(old, sampler, mask, "sequence_truncate", clip_max=2.0)
    assert torch.allclose(weights, torch.tensor([[0.6, 0.6, 0.6, 0.0], [2.0, 2.0, 0.0, 0.0]]), atol=1e-6)
    assert stats["ratio_min"] == pytest.approx(0.6) and stats["ratio_max"] == pytest.approx(3.0)
    assert stats["outside_bounds"] == pytest.approx(0.5)
    weights, _ = sampler_correction(old, sampler, mask, "sequence_mask", clip_max=2.0)
    assert torch.allclose(weights, torch.tensor([[0.6, 0.6, 0.6, 0.0], [0.0, 0.0, 0.0, 0.0]]), atol=1e-6)
    weights, _ = sampler_correction(old, sampler, mask, "sequence_mask", clip_min=0.7, clip_max=None)
    assert torch.allclose(weights, torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 3.0, 0.0, 0.0]]), atol=1e-6)


def test_a_token_the_sampler_could_not_score_gets_no_correction():
    old, sampler, mask = case()
    sampler[0, 0] = float("nan")
    sampler[1, 1] = float("-inf")
    weights, stats = sampler_correction(old, sampler, mask, "token_truncate", clip_max=10.0)
    assert weights[0, 0] == 1.0 and weights[1, 1] == 1.0 and torch.isfinite(weights).all()
    assert math.isfinite(stats["logp_diff_max"])


def test_the_weights_carry_no_gradient():
    old, sampler, mask = case()
    old.requires_grad_(True)
    weights, _ = sampler_correction(old, sampler, mask, "token_truncate")
    assert not weights.requires_grad


def test_trl_vllm_settings_are_llmrls():
    args = RLConfig(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.5,
                    vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_cap=2.0)
    assert args.use_vllm and args.vllm_gpu_memory_utilization == 0.5
    assert args.vllm_importance_sampling_clip_max == 2.0  # TRL's older name for the upper bound


@pytest.mark.parametrize("settings, message", [
    (dict(vllm_mode="server"), "vllm_mode: server"),
    (dict(vllm_importance_sampling_mode="sequence"), "vllm_importance_sampling_mode"),
    (dict(vllm_gpu_memory_utilization=1.5), "vllm_gpu_memory_utilization must be in (0, 1]"),
    (dict(vllm_importance_sampling_clip_min=2.0, vllm_importance_sampling_clip_max=1.0), "is above"),
    (dict(vllm_max_model_length=100, max_completion_length=256), "leaves no room"),
])
def test_bad_vllm_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RLConfig(use_vllm=True, **settings)


def test_trls_vllm_server_fields_are_refused_unless_left_at_default():
    RLConfig(vllm_server_host="0.0.0.0", vllm_tensor_parallel_size=1)  # TRL's defaults: they change nothing
    with pytest.raises(TRLFieldError, match="vllm_server_base_url.*colocated in each training process"):
        RLConfig(use_vllm=True, vllm_server_base_url="http://localhost:8000")
    with pytest.raises(TRLFieldError, match="vllm_tensor_parallel_size=2"):
        RLConfig(use_vllm=True, vllm_tensor_parallel_size=2)


def test_a_quantized_base_is_refused_before_anything_loads(tmp_path):
    from llmrl import ModelConfig, RLTrainer

    model = ModelConfig(model_name_or_path=str(tmp_path / "not-loaded"), use_peft=True, load_in_4bit=True)
    with pytest.raises(ValueError, match="use_vllm: true with a quantized base.*load_in_4bit: false"):
        RLTrainer(model.model_name_or_path, RLConfig(use_vllm=True, output_dir=str(tmp_path / "out")),
                  [{"prompt": "1+1=", "answer": "2"}], reward_funcs=["accuracy"], model_config=model)
