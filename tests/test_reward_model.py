"""Reward-model training on a real tiny model: it learns a preference held-out pairs share; the loss is
the Bradley-Terry formula (margin, centring) on the scores `llmrl.models.reward_scores` reads, even
when pad == EOS; save and reload give identical scores; LoRA trains the adapter and the score head;
resume; bad input; the recipe path."""

import random
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
import trl
import yaml
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from llmrl import RewardTrainer, train
from llmrl.config import ModelConfig, RewardConfig
from llmrl.data import DataError
from llmrl.models import reward_scores
from llmrl.recipe import load_recipe
from llmrl.trainers.hf import training_arguments

ROOT = Path(__file__).resolve().parents[1]
GOOD, BAD = ["yes", "sure", "right", "true"], ["no", "never", "wrong", "false"]


def pairs(n, seed, margin=None):
    """Chosen answers end with an agreeing word, rejected ones with a refusing word, after the same
    random filler; prompts and fillers differ between seeds, so held-out pairs are new sentences."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        filler = "".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 6)))
        row = {"prompt": f"Q{rng.randint(0, 999)}: ", "chosen": f"{filler} {rng.choice(GOOD)}",
               "rejected": f"{filler} {rng.choice(BAD)}"}
        if margin is not None:
            row["margin"] = margin(rng)
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def rm_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=16,
                    learning_rate=3e-3, save_steps=0, logging_steps=1000, disable_tqdm=True, seed=0)
    return RewardConfig(**{**settings, **overrides})


def pair_scores(model, tokenizer, rows):
    """(chosen [P], rejected [P]) scores of prompt + answer + EOS, as `reward_scores` reads them."""
    def score(column):
        texts = [p + a + tokenizer.eos_token for p, a in zip(rows["prompt"], rows[column])]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            return reward_scores(model, batch["input_ids"], batch["attention_mask"])
    return score("chosen"), score("rejected")


def accuracy(model, tokenizer, rows):
    chosen, rejected = pair_scores(model, tokenizer, rows)
    return (chosen > rejected).float().mean().item()


def test_reward_model_learns_and_reloads_with_identical_scores(tiny_model_dir, tmp_path):
    """Held-out pairwise accuracy: near chance before (measured 0.625 on these 64 pairs), above 0.9 after 16
    steps (measured 1.0; training loss 0.34 -> 0.036). The saved folder, loaded with plain
    transformers, scores exactly alike."""
    held_out = pairs(64, seed=1)
    trainer = RewardTrainer(tiny_model_dir, args=rm_args(tmp_path, max_steps=16, logging_steps=8),
                            train_dataset=pairs(128, seed=0), eval_dataset=held_out)
    tokenizer = trainer.processing_class
    before = accuracy(trainer.model, tokenizer, held_out)
    history = trainer.train()
    after = accuracy(trainer.model, tokenizer, held_out)
    assert before < 0.75 and after > 0.9, f"held-out accuracy {before:.2f} -> {after:.2f}"

    logged = [h for h in history if "loss" in h]
    assert len(logged) == 2 and logged[-1]["loss"] < 0.5 * logged[0]["loss"]
    assert logged[-1]["accuracy"] > 0.9 and logged[-1]["margin"] > logged[0]["margin"] > 0
    final_eval = history[-1]
    assert final_eval["eval_accuracy"] > 0.9 and final_eval["eval_margin"] > 0 and "eval_loss" in final_eval

    out = tmp_path / "out"
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    trainer.model.eval()
    for ours, theirs in zip(pair_scores(trainer.model, tokenizer, held_out),
                            pair_scores(reloaded, reloaded_tokenizer, held_out)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)  # float rounding only


@pytest.mark.parametrize("center", [None, 0.1])
def test_loss_is_bradley_terry_with_margin_at_the_last_real_token(tiny_model_dir, tmp_path, center):
    """The loss of a collated batch equals -mean log sigmoid(r_c - r_r - m) (+ c * mean (r_c + r_r)^2),
    computed here from `reward_scores` on each text alone. The tokenizer pads with EOS, so the
    model's own pooling (last non-pad token) would read the token before EOS; the test checks
    that it indeed differs, so the position is really pinned."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    rows = pairs(8, seed=2, margin=lambda rng: round(rng.uniform(-1, 2), 2))
    trainer = RewardTrainer(tiny_model_dir, args=rm_args(tmp_path, per_device_train_batch_size=8,
                                                         center_rewards_coefficient=center),
                            train_dataset=rows, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "margin" in batch
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))

    # The loader shuffles: find each batch row's dataset row from its text.
    row_of = {p + c + tokenizer.eos_token: i for i, (p, c) in enumerate(zip(rows["prompt"], rows["chosen"]))}
    index = [row_of[tokenizer.decode(ids[mask.bool()])]
             for ids, mask in zip(batch["input_ids"][:8], batch["attention_mask"][:8])]
    chosen, rejected = (s[index] for s in pair_scores(model, tokenizer, rows))
    margin = torch.tensor(rows["margin"])[index]
    assert torch.allclose(batch["margin"], margin)
    expected = -F.logsigmoid(chosen - rejected - margin).mean()
    if center:
        expected = expected + center * ((chosen + rejected) ** 2).mean()
    assert torch.allclose(loss, expected, atol=1e-5), (loss, expected)
    without_margin = -F.logsigmoid(chosen - rejected).mean() + (center or 0) * ((chosen + rejected) ** 2).mean()
    assert not torch.allclose(loss, without_margin, atol=1e-3), "the margin column must change the loss"

    with torch.no_grad():
        pooled_by_pad_id = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:8, 0]
    assert not torch.allclose(pooled_by_pad_id, chosen, atol=1e-4)


def test_lora_trains_adapter_and_score_head_and_reloads(tiny_model_dir, tmp_path):
    model_config = ModelConfig(model_name_or_path=tiny_model_dir, use_peft=True, lora_r=4, lora_alpha=8)
    trainer = RewardTrainer(args=rm_args(tmp_path, max_steps=3), train_dataset=pairs(48, seed=0),
                            model_config=model_config)
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_" in name for name in trainable) and any(".score." in name for name in trainable)
    assert all("lora_" in name or ".score." in name for name in trainable), trainable
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed <= trainable and any(".score." in name for name in changed)

    out = tmp_path / "out"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    # Plain peft + transformers: the base gets a one-label head, which the adapter's saved head replaces.
    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    tokenizer = trainer.processing_class
    held_out = pairs(16, seed=1)
    trainer.model.eval()
    for ours, theirs in zip(pair_scores(trainer.model, tokenizer, held_out), pair_scores(reloaded, tokenizer, held_out)):
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_resume_from_a_checkpoint_path_gives_the_weights_of_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """A new run (its own output_dir) started from the step-2 checkpoint of a 4-step run ends with
    that run's weights: model, optimizer, scheduler, RNG and data position all come back."""
    rows = pairs(48, seed=0)

    def run(name, resume=None):
        args = rm_args(tmp_path, output_dir=str(tmp_path / name), max_steps=4, save_steps=2, learning_rate=1e-3,
                       per_device_train_batch_size=8, resume_from_checkpoint=resume)
        trainer = RewardTrainer(tiny_model_dir, args=args, train_dataset=rows)
        trainer.train()
        return trainer

    whole = run("whole")
    resumed = run("resumed", resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert resumed.state.global_step == 4 and (tmp_path / "resumed" / "checkpoint-4").is_dir()
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "Q: ", "chosen": "a", "worse": "b"}], r"no column 'rejected'.*\['prompt', 'chosen', 'worse'\]"),
    ([{"prompt": "Q: ", "good": "a", "rejected": "b"}], r"no column 'chosen'.*to 'chosen'"),
    ([{"prompt": "Q: ", "chosen": "a", "rejected": "b", "margin": "big"}], r"column 'margin' must hold a finite number"),
    ([{"prompt": "Q: ", "chosen": "a" * 40, "rejected": "b"}], r"all 1 pairs are longer than max_length=16.*Raise"),
])
def test_bad_rows_name_the_column_and_the_fix(tiny_model_dir, tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        RewardTrainer(tiny_model_dir, args=rm_args(tmp_path, max_length=16),
                      train_dataset=datasets.Dataset.from_list(rows))


def test_llmrl_train_runs_a_reward_model_recipe(tiny_model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    pairs(16, seed=0).to_json(str(data))
    recipe_file = tmp_path / "rm.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "algorithm": "reward_model", "model_name_or_path": tiny_model_dir, "dataset_name": str(data),
        "eval_dataset_name": str(data), "max_steps": 2, "per_device_train_batch_size": 8, "eval_steps": 1,
        "save_steps": 1, "save_total_limit": 1, "center_rewards_coefficient": 0.01, "output_dir": str(tmp_path / "out"),
        "disable_tqdm": True}))
    history = train(load_recipe(recipe_file))
    out = tmp_path / "out"
    assert (out / "config.yaml").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"], "save_total_limit: 1 keeps the newest"
    assert [h["step"] for h in history if "eval_accuracy" in h] == [1, 2], "eval_steps: 1 evaluates every step"


def test_gpu_recipe_reaches_the_trainer():
    """The Qwen2.5-0.5B LoRA reward-model recipe resolves, and its settings become the TRL config."""
    recipe = load_recipe(ROOT / "recipes" / "qwen2.5-0.5b" / "reward_model_lora.yaml")
    assert isinstance(recipe.args, RewardConfig) and recipe.model.use_peft
    assert recipe.model.lora_modules_to_save == ["score"] and recipe.data.dataset_test_split == "test"
    hf = training_arguments(recipe.args, recipe.model, trl.RewardConfig, has_eval_data=True,
                            center_rewards_coefficient=recipe.args.center_rewards_coefficient)
    assert (hf.learning_rate, hf.per_device_train_batch_size, hf.gradient_accumulation_steps) == (1e-4, 4, 4)
    assert hf.center_rewards_coefficient == 0.01
    assert hf.bf16 == torch.cuda.is_available()
