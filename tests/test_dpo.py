"""The DPO trainer on a real tiny model: TRL's numbers, learning, the LoRA and precomputed
references, resume, gradient invariance, bad input and the recipe path."""

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
import yaml
from peft import LoraConfig
from ports import free_port
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmrl import DPOConfig, DPOTrainer
from llmrl.data import DataError
from llmrl.recipe import load_recipe
from llmrl.reference import ReferenceModel
from llmrl.trainers import train
from llmrl.trainers.dpo import answer_logps

PLAIN = [{"prompt": "2+2=", "chosen": "4", "rejected": "five"},
         {"prompt": "Name a colour:", "chosen": " red", "rejected": " the sky"},
         {"prompt": "x", "chosen": "yes, it is", "rejected": "n"},
         {"prompt": "What is 12*3? ", "chosen": "36", "rejected": "I do not know"}]
# TRL's implicit-prompt format: whole conversations that share their first messages.
CHAT = [{"chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]}
        for r in PLAIN]


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_prompt_length=32,
                    max_length=64, learning_rate=1e-3, save_steps=0, logging_steps=1000, report_to="none",
                    disable_tqdm=True, seed=0)
    return DPOConfig(**{**settings, **overrides})


def perturbed(model_dir, scale=0.1):
    """The tiny model with seeded noise on every weight: a policy that differs from its reference."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


def first_rows(trainer, n):
    return trainer.collate_fn([trainer.train_dataset[i] for i in range(n)])


# ---- the same numbers as TRL -----------------------------------------------------------------


@pytest.mark.parametrize("loss_type, rows, label_smoothing",
                         [("sigmoid", PLAIN, 0.0), ("ipo", PLAIN, 0.0), ("hinge", PLAIN, 0.0), ("sigmoid", CHAT, 0.0),
                          ("robust", PLAIN, 0.1), ("sigmoid", PLAIN, 0.1)],
                         ids=["sigmoid", "ipo", "hinge", "sigmoid-chat-implicit-prompt", "robust-ls0.1", "cdpo-ls0.1"])
def test_loss_and_rewards_equal_trl(tiny_model_dir, tmp_path, loss_type, rows, label_smoothing):
    """Per pair, our loss and implicit rewards equal trl.DPOTrainer's, computed now on the same policy,
    reference and pairs, to 1e-5 (float32; TRL runs each pair alone, we run the four padded together).
    IPO matches because `average_log_prob` defaults on for ipo, as TRL length-normalises IPO.

    The documented difference: TRL 1.16's sigmoid ignores label_smoothing; ours is then cDPO,
    -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h), checked here on TRL's own margins."""
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer as TRLTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy, reference = perturbed(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pairs = datasets.Dataset.from_list(rows)
    trl_args = TRLConfig(output_dir=str(tmp_path / "trl"), report_to="none", loss_type=loss_type, beta=0.5,
                         label_smoothing=label_smoothing, use_cpu=True, bf16=False, max_length=64,
                         per_device_train_batch_size=1)
    theirs = TRLTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=trl_args,
                        train_dataset=pairs, processing_class=tokenizer)
    theirs.model.train()
    expected = []
    for i in range(len(rows)):
        theirs._metrics["train"].clear()
        loss = theirs.compute_loss(theirs.model, theirs.data_collator([theirs.train_dataset[i]]))
        metrics = theirs._metrics["train"]
        expected.append([loss.item(), metrics["rewards/chosen"][0], metrics["rewards/rejected"][0]])

    ours = DPOTrainer(copy.deepcopy(policy), config(tmp_path, loss_type=loss_type, beta=0.5,
                                                    label_smoothing=label_smoothing), pairs,
                      processing_class=tokenizer, ref_model=copy.deepcopy(reference))
    for i in range(len(rows)):  # the same tokens: prompt, answers (EOS added to plain strings), boundaries
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert ours.train_dataset[i][key] == theirs.train_dataset[i][key], (i, key)
    with torch.no_grad():
        losses, metrics = ours.compute_loss(ours.model, first_rows(ours, len(rows)))
    got = torch.stack([losses, metrics["rewards/chosen"], metrics["rewards/rejected"]], dim=1)
    assert got[:, 1:].abs().min() > 1e-3, "the policy must differ from the reference for this to mean anything"
    expected = torch.tensor(expected)
    if loss_type == "sigmoid" and label_smoothing:
        scaled_margin = expected[:, 1] - expected[:, 2]  # beta h, from TRL's implicit rewards
        cdpo = -(1 - label_smoothing) * F.logsigmoid(scaled_margin) - label_smoothing * F.logsigmoid(-scaled_margin)
        assert (cdpo - expected[:, 0]).abs().min() > 1e-3  # TRL's loss is plain DPO: the two really differ
        expected[:, 0] = cdpo
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ---- DPO learns ---------------------------------------------------------------------------------


def digit_pairs(n, seed):
    """Random prompts; chosen = random digits, rejected = random letters of the same length."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(3, 6)
        rows.append({"prompt": "".join(rng.choice("abcdefgh") for _ in range(4)) + ":",
                     "chosen": "".join(rng.choice("0123456789") for _ in range(length)),
                     "rejected": "".join(rng.choice("qrstuvwxyz") for _ in range(length))})
    return datasets.Dataset.from_list(rows)


def test_dpo_learns_the_preference_on_held_out_pairs(tiny_model_dir, tmp_path):
    """Held out: the share of pairs whose chosen answer the policy finds likelier (about 0.47 at
    the start), TRL's implicit-reward accuracy (0 at the start: ties), and the chosen log-prob all rise."""
    trainer = DPOTrainer(tiny_model_dir, config(tmp_path, per_device_train_batch_size=8, max_steps=15,
                                                lr_scheduler_type="constant", per_device_eval_batch_size=32),
                         digit_pairs(64, seed=0), eval_dataset=digit_pairs(32, seed=1))

    def policy_accuracy():
        with torch.no_grad():
            logps, _ = answer_logps(trainer.model, trainer.collate_fn(list(trainer.eval_dataset)))
        chosen, rejected = logps.chunk(2)
        return (chosen > rejected).float().mean().item()

    before, accuracy_before = trainer.evaluate(), policy_accuracy()
    history = trainer.train()
    after, accuracy_after = history[-1], policy_accuracy()
    assert "eval/loss" in after and after["step"] == 15
    assert accuracy_before < 0.7 and accuracy_after >= 0.9, (accuracy_before, accuracy_after)
    assert before["eval/rewards/accuracies"] == 0.0 and after["eval/rewards/accuracies"] >= 0.9
    assert after["eval/logps/chosen"] > before["eval/logps/chosen"] + 2.0, (before, after)
    assert after["eval/loss"] < before["eval/loss"] - 0.2
    train_records = [h for h in history if "loss" in h]
    assert {"rewards/margins", "logps/rejected", "learning_rate", "grad_norm", "step_time"} <= set(train_records[0])


# ---- the reference ------------------------------------------------------------------------------


def test_lora_reference_is_the_policy_with_its_adapter_disabled(tiny_model_dir, tmp_path):
    trainer = DPOTrainer(tiny_model_dir, config(tmp_path, max_steps=3, learning_rate=1e-2),
                         digit_pairs(8, seed=0), peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert trainer.reference.shares_policy and trainer.reference.model is policy  # no second model
    batch = first_rows(trainer, 4)
    trainer.train()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        reference, trained, base_logps = (answer_logps(m, batch)[0] for m in (trainer.reference, policy, base))
    torch.testing.assert_close(reference, base_logps, atol=1e-5, rtol=0)  # the base model, exactly
    assert (trained - reference).abs().max() > 1e-2  # while the adapter has moved the policy


def test_chosen_and_rejected_share_one_forward_pass(tiny_model_dir, tmp_path):
    trainer = DPOTrainer(tiny_model_dir, config(tmp_path), digit_pairs(4, seed=0))
    calls = []
    hooks = [module.register_forward_hook(lambda m, args, kwargs, out, name=name: calls.append(
        (name, kwargs.get("input_ids", args[0] if args else None).shape[0])), with_kwargs=True)
        for name, module in (("policy", trainer.accelerator.unwrap_model(trainer.model)),
                             ("reference", trainer.reference.model))]
    trainer.compute_loss(trainer.model, first_rows(trainer, 4))
    for hook in hooks:
        hook.remove()
    assert calls == [("reference", 8), ("policy", 8)] or calls == [("policy", 8), ("reference", 8)], calls


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_precomputed_reference_gives_the_live_reference_run(tiny_model_dir, tmp_path, lora):
    """3 steps and an eval: the same losses with reference log-probs computed once before training
    (by the policy itself, its adapter off under LoRA: no copy, nothing held) as with a live reference."""
    runs = {}
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if lora else None
    for precompute in (False, True):
        trainer = DPOTrainer(tiny_model_dir, config(tmp_path / str(precompute), max_steps=3,
                                                    precompute_ref_log_probs=precompute,
                                                    learning_rate=1e-2 if lora else 1e-3),
                             digit_pairs(12, seed=0), eval_dataset=digit_pairs(6, seed=1), peft_config=peft_config)
        assert (trainer.reference is None) == precompute
        runs[precompute] = trainer.train()
    live, precomputed = runs[False], runs[True]
    assert [h["step"] for h in live] == [h["step"] for h in precomputed] == [1, 2, 3, 3]
    assert abs(live[1]["loss"] - 0.6931) > 1e-3, "after one update the policy must differ from its reference"
    for a, b in zip(live, precomputed):
        for key in ("loss", "rewards/chosen", "eval/loss", "eval/rewards/margins"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5, (key, a, b)


def test_precomputed_reference_cannot_score_new_data_after_training(tiny_model_dir, tmp_path):
    trainer = DPOTrainer(tiny_model_dir, config(tmp_path, max_steps=1, precompute_ref_log_probs=True),
                         digit_pairs(4, seed=0))
    assert trainer.evaluate(digit_pairs(4, seed=1))["eval/loss"] == pytest.approx(0.6931, abs=1e-4)
    trainer.train()
    with pytest.raises(ValueError, match="reference was let go.*eval_dataset"):
        trainer.evaluate(digit_pairs(4, seed=1))


# ---- resume and gradient invariance --------------------------------------------------------------


def test_resumed_run_equals_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """4 steps with a linear schedule after warmup, 3 steps an epoch: resumed from checkpoint-2, the
    run crosses the epoch boundary (a reshuffle) and ends on the same weights as without a stop."""
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, warmup_steps=1,
                  save_steps=2)
    whole = DPOTrainer(tiny_model_dir, config(tmp_path / "whole", **common), digit_pairs(12, seed=0))
    whole.train()
    checkpoint = tmp_path / "whole" / "out" / "checkpoint-2"
    assert (checkpoint / "model" / "model.safetensors").exists()
    resumed = DPOTrainer(tiny_model_dir, config(tmp_path / "resumed", resume_from_checkpoint=str(checkpoint), **common),
                         digit_pairs(12, seed=0))
    history = resumed.train()
    assert [h["step"] for h in history] == [3, 4]
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "out")  # the final model: a plain folder
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), saved.parameters()))


def test_one_step_is_the_same_for_any_micro_batch_split(tiny_model_dir, tmp_path):
    """4 pairs as 4 x 1 or 2 x 2 micro-batches: the same gradient norm and update (1e-5). adam_epsilon
    is large and clipping off so that the update scales with the gradient (Adam's first step is
    otherwise about lr x sign(gradient), blind to a wrong normaliser)."""
    steps = []
    for size, accum in [(4, 1), (2, 2)]:
        trainer = DPOTrainer(perturbed(tiny_model_dir), config(tmp_path / f"{size}x{accum}", max_steps=1,
                                                               per_device_train_batch_size=size,
                                                               gradient_accumulation_steps=accum, adam_epsilon=1.0,
                                                               learning_rate=0.1, max_grad_norm=0.0),
                             digit_pairs(8, seed=0), ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
        start = [p.detach().clone() for p in trainer.model.parameters()]
        record = trainer.train()[0]
        steps.append((record, [p.detach() - s for p, s in zip(trainer.model.parameters(), start)]))
    (record_a, update_a), (record_b, update_b) = steps
    assert record_a["grad_norm"] == pytest.approx(record_b["grad_norm"], rel=1e-5)
    assert record_a["loss"] == pytest.approx(record_b["loss"], abs=1e-6)
    for a, b in zip(update_a, update_b):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert max(u.abs().max() for u in update_a) > 1e-3


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "p", "answer": "a", "rejected": "b"}], r"no column 'chosen'.*\['prompt', 'answer', 'rejected'\]"),
    # No prompt column: TRL's implicit prompt, the start chosen and rejected share, which is nothing here.
    ([{"question": "p", "chosen": "a", "rejected": "b"}], r"'prompt' is empty once .* or a 'prompt' column"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": ""}],
     r"column 'rejected' is empty in 1 of 2 rows \(first at row 1\)"),
    ([], r"'train_dataset' has no rows"),
    ([{"chosen": CHAT[0]["chosen"], "rejected": CHAT[0]["chosen"][:1]}],  # no shared prompt to take
     r"row 0: 'prompt' is empty once the messages shared by chosen and rejected are taken as the prompt"),
])
def test_bad_pairs_are_named(tiny_model_dir, tmp_path, rows, message):
    dataset = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict(
        {"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(DataError, match=message):
        DPOTrainer(tiny_model_dir, config(tmp_path, per_device_train_batch_size=1), dataset)


def test_bad_settings_say_what_to_change(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"max_prompt_length=64 must be positive and below max_length=64"):
        config(tmp_path, max_prompt_length=64)
    with pytest.raises(ValueError, match=r"train_dataset has 4 examples, fewer than one micro-batch.*8 x 1"):
        DPOTrainer(tiny_model_dir, config(tmp_path, per_device_train_batch_size=8), digit_pairs(4, seed=0))


def test_long_prompts_and_answers_are_cut_to_fit(tiny_model_dir, tmp_path):
    """The prompt keeps its last max_prompt_length tokens; the answer its first tokens up to max_length."""
    rows = datasets.Dataset.from_list([{"prompt": "abcdefghij", "chosen": "0123456789", "rejected": "z"}])
    trainer = DPOTrainer(tiny_model_dir, config(tmp_path, per_device_train_batch_size=1, max_prompt_length=4,
                                                max_length=7), rows)
    tokenizer = trainer.tokenizer
    row = trainer.train_dataset[0]
    assert tokenizer.decode(row["prompt_ids"]) == "ghij" and tokenizer.decode(row["chosen_ids"]) == "012"
    assert tokenizer.decode(row["rejected_ids"]) == "z" + tokenizer.eos_token


# ---- the recipe path -----------------------------------------------------------------------------


def test_llmrl_train_runs_a_dpo_recipe_end_to_end(tiny_model_dir, tmp_path):
    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)

    recipe_path = tmp_path / "dpo.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "algorithm": "dpo", "model_name_or_path": tiny_model_dir, "use_peft": True, "lora_r": 4,
        "dataset_name": write("train.jsonl", list(digit_pairs(8, seed=0))),
        "eval_dataset_name": write("eval.jsonl", CHAT),
        "loss_type": "ipo", "per_device_train_batch_size": 4, "max_steps": 2, "eval_steps": 1,
        "learning_rate": 1e-3, "output_dir": str(tmp_path / "out"), "save_steps": 2, "report_to": "none"}))
    history = train(load_recipe(recipe_path))
    assert [(h["step"], "eval/loss" in h) for h in history] == [(1, False), (1, True), (2, False), (2, True)]
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["loss_type"] == "ipo" and saved["average_log_prob"] is True
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "checkpoint-2" / "model" / "adapter_config.json").exists()


def test_reference_model_wrapper_is_frozen(tiny_model_dir, tmp_path):
    """A ref_model given by the user is frozen and never trained."""
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = DPOTrainer(tiny_model_dir, config(tmp_path, max_steps=1), digit_pairs(4, seed=0), ref_model=reference)
    assert isinstance(trainer.reference, ReferenceModel) and not trainer.reference.shares_policy
    before = [p.detach().clone() for p in reference.parameters()]
    trainer.train()
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, reference.parameters()))


# ---- two processes -------------------------------------------------------------------------------


TWO_PROCESS_SETTINGS = dict(max_steps=1, learning_rate=0.1, adam_epsilon=1.0, max_grad_norm=0.0, seed=3)


def test_two_processes_give_the_one_process_update(tiny_model_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU, 2 pairs per process, makes the
    update of one process with the 4 pairs (1e-5): each process's loss is its share of the whole
    step's sum. The reference is a frozen copy: step 1's loss is log 2, its gradient is not zero."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in digit_pairs(8, seed=0)))
    recipe = tmp_path / "two.yaml"
    recipe.write_text(yaml.safe_dump({
        "algorithm": "dpo", "model_name_or_path": tiny_model_dir, "dataset_name": str(data),
        "per_device_train_batch_size": 2, "max_prompt_length": 32, "max_length": 64, "save_steps": 0,
        "output_dir": str(tmp_path / "two"), "report_to": ["tensorboard"], **TWO_PROCESS_SETTINGS}))
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_machines", "1", "--multi_gpu",
              "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port()]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launch, "-m", "llmrl", "train", str(recipe)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # With a tracker on, its closing must leave the process group to the final save (as it does now).
    assert list((tmp_path / "two" / "runs").rglob("events.out.tfevents.*")), "tensorboard wrote no events"
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two")

    one = DPOTrainer(tiny_model_dir, config(tmp_path / "one", per_device_train_batch_size=4, **TWO_PROCESS_SETTINGS),
                     digit_pairs(8, seed=0))
    one.train()
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moved = 0.0
    for (name, p0), p1, p2 in zip(start.named_parameters(), one.model.parameters(), two.parameters()):
        moved = max(moved, (p1 - p0).abs().max().item())
        assert torch.allclose(p1, p2, atol=1e-5, rtol=0), f"{name}: {(p1 - p2).abs().max():.2e}"
    assert moved > 1e-3, "the step must change the weights for the comparison to mean anything"


def test_a_policy_with_a_trained_adapter_keeps_that_adapter_in_its_reference(tiny_model_dir, tmp_path, caplog):
    """The reference is the policy as training starts. A PeftModel passed in with an adapter trained
    before is not its base model with the adapter off: it gets a frozen copy, and a warning says why."""
    from peft import get_peft_model

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="llmrl.models"):
        trainer = DPOTrainer(policy, config(tmp_path), digit_pairs(4, seed=0),
                             processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    assert not trainer.reference.shares_policy and "already trained" in caplog.text
    batch = first_rows(trainer, 4)
    with torch.no_grad():
        start, reference = (answer_logps(m, batch)[0] for m in (trainer.accelerator.unwrap_model(trainer.model),
                                                                 trainer.reference))
    torch.testing.assert_close(reference, start, atol=1e-5, rtol=0)  # the adapter included


@pytest.mark.parametrize("name", ["dpo_lora", "dpo_qlora_8gb"])
def test_gpu_recipes_resolve_to_lora_dpo(name):
    """The Qwen2.5-0.5B DPO recipes: LoRA (the reference is the base with the adapter off), the 8 GB
    one on 4-bit NF4 weights, both with a held-out split for the eval loop."""
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "qwen2.5-0.5b" / f"{name}.yaml")
    assert isinstance(recipe.args, DPOConfig) and recipe.model.use_peft
    assert (recipe.args.loss_type, recipe.args.beta) == ("sigmoid", 0.1) and recipe.data.dataset_test_split == "test"
    assert recipe.model.load_in_4bit == (name == "dpo_qlora_8gb")
    if recipe.model.load_in_4bit:
        assert recipe.model.bnb_4bit_quant_type == "nf4" and recipe.args.per_device_train_batch_size <= 2
