"""SFT (TRL's SFTTrainer behind llmrl's config) on a real tiny model: it learns; only completion or
assistant tokens carry loss; packing keeps examples apart; NEFTune noise; LoRA; resume; bad input;
the recipe path."""

from pathlib import Path

import datasets
import pytest
import torch
import trl
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from llmrl import SFTTrainer, train
from llmrl.config import ModelConfig, SFTConfig
from llmrl.data import DataError
from llmrl.recipe import load_recipe
from llmrl.tiny import EOS
from llmrl.trainers.hf import training_arguments

ROOT = Path(__file__).resolve().parents[1]


def qa_rows(indices):
    """A task the tiny model can learn in a few dozen steps: the answer is the last digit of the question."""
    return datasets.Dataset.from_list([{"prompt": f"Q{i}: ", "completion": f"answer {i % 10}"} for i in indices])


def chat_rows(n):
    return datasets.Dataset.from_list([{"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"hi {i}"},
        {"role": "assistant", "content": f"yo {i}"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok"},
    ]} for i in range(n)])


def sft_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=8, learning_rate=3e-3,
                    save_steps=0, logging_steps=1000, disable_tqdm=True, seed=0)
    return SFTConfig(**{**settings, **overrides})


def first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def test_sft_learns_and_saves_a_plain_model_folder(tiny_model_dir, tmp_path):
    """Held-out loss on the answers falls from ~4.6 (uniform over 103 tokens) to below half of that
    in 30 steps (measured: 4.62 -> 1.34); the logged training loss falls too (3.3 -> 1.4)."""
    trainer = SFTTrainer(tiny_model_dir, args=sft_args(tmp_path, max_steps=30, logging_steps=10),
                         train_dataset=qa_rows(range(64)), eval_dataset=qa_rows(range(100, 116)))
    before = trainer.evaluate()["eval_loss"]
    history = trainer.train()
    after = history[-1]["eval_loss"]
    assert after < 0.5 * before, f"held-out loss {before:.3f} -> {after:.3f}"
    train_losses = [h["loss"] for h in history if "loss" in h]
    assert len(train_losses) == 3 and train_losses[-1] < 0.6 * train_losses[0], train_losses

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[10, 20, 30, 40]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trainer.model(input_ids=ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("chat", [False, True], ids=["strings", "chat_prompt_completion"])
def test_only_completion_tokens_carry_loss(tiny_model_dir, tmp_path, chat):
    rows = [{"prompt": f"Q{i}: ", "completion": f"answer {i}"} for i in range(8)]
    if chat:
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows]
    trainer = SFTTrainer(tiny_model_dir, args=sft_args(tmp_path), train_dataset=datasets.Dataset.from_list(rows))
    batch, tokenizer = first_batch(trainer), trainer.processing_class
    answers = set()
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"].bool()):
        trained, untrained = ids[labels != -100], ids[(labels == -100) & mask]
        assert torch.equal(labels[labels != -100], trained)  # a trained position predicts its own token
        assert (labels[~mask] == -100).all()  # padding carries no loss
        text = tokenizer.decode(trained)
        answers.add(text)
        if chat:
            assert text.startswith("answer ") and text.endswith(EOS)
            assert tokenizer.decode(untrained).startswith("<|user|>Q") and tokenizer.decode(untrained).endswith(
                "<|assistant|>")
        else:
            assert text.startswith("answer ") and text.endswith(EOS)  # EOS is learned: the model learns to stop
            assert tokenizer.decode(untrained).startswith("Q") and tokenizer.decode(untrained).endswith(": ")
    assert answers <= {f"answer {i}{EOS}" for i in range(8)} and len(answers) == 8


def test_completion_only_loss_off_trains_on_every_token(tiny_model_dir, tmp_path):
    trainer = SFTTrainer(tiny_model_dir, args=sft_args(tmp_path, completion_only_loss=False),
                         train_dataset=qa_rows(range(8)))
    batch = first_batch(trainer)
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])


def test_chat_messages_train_only_the_assistant_turns(tiny_model_dir, tmp_path):
    trainer = SFTTrainer(tiny_model_dir, args=sft_args(tmp_path, per_device_train_batch_size=4),
                         train_dataset=chat_rows(4))
    batch, tokenizer = first_batch(trainer), trainer.processing_class
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"].bool()):
        i = tokenizer.decode(ids[mask]).split("hi ")[1][0]
        assert tokenizer.decode(ids[labels != -100]) == f"yo {i}{EOS}ok{EOS}"
        assert tokenizer.decode(ids[(labels == -100) & mask]) == (
            f"<|system|>be brief{EOS}<|user|>hi {i}{EOS}<|assistant|><|user|>again{EOS}<|assistant|>")


def test_chat_template_without_generation_markers_still_trains_only_the_assistant(tiny_model_dir, tmp_path):
    """The GPU recipe's path: Qwen2.5's chat template has no `{% generation %}` markers, so TRL swaps in
    its training version of the template; the labels still cover the assistant turn alone."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    rows = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": f"hi {i}"},
                                                     {"role": "assistant", "content": f"yo {i}"}]} for i in range(4)])
    trainer = SFTTrainer(tiny_model_dir, args=sft_args(tmp_path, per_device_train_batch_size=4), train_dataset=rows,
                         processing_class=tokenizer)
    batch = first_batch(trainer)
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"].bool()):
        i = tokenizer.decode(ids[mask]).split("hi ")[1][0]
        assert tokenizer.decode(ids[labels != -100]).strip() == f"yo {i}<|im_end|>"


def test_packing_keeps_examples_apart(tiny_model_dir, tmp_path):
    """12 examples packed into a few rows give the same loss as the 12 padded rows: each example
    attends only to itself (positions restart per example). Dropping the positions lets examples
    see each other and changes the loss, so the comparison can fail."""
    rows = qa_rows(range(12))
    packed = SFTTrainer(tiny_model_dir, args=sft_args(tmp_path, packing=True, max_length=64,
                                                      per_device_train_batch_size=12), train_dataset=rows)
    plain = SFTTrainer(tiny_model_dir, args=sft_args(tmp_path, per_device_train_batch_size=12), train_dataset=rows)
    assert len(packed.train_dataset) < len(rows)
    packed_batch, plain_batch = first_batch(packed), first_batch(plain)
    assert (packed_batch["labels"] != -100).sum() == (plain_batch["labels"] != -100).sum()
    model = plain.model.eval()
    with torch.no_grad():
        packed_loss = model(input_ids=packed_batch["input_ids"], position_ids=packed_batch["position_ids"],
                            labels=packed_batch["labels"]).loss
        plain_loss = model(input_ids=plain_batch["input_ids"], attention_mask=plain_batch["attention_mask"],
                           labels=plain_batch["labels"]).loss
        leaky_loss = model(input_ids=packed_batch["input_ids"], labels=packed_batch["labels"]).loss
    assert torch.allclose(packed_loss, plain_loss, atol=1e-5), (packed_loss, plain_loss)
    assert not torch.allclose(leaky_loss, plain_loss, atol=1e-4)


class EmbeddingProbe(TrainerCallback):
    """Embeds the same ids twice after each training step (the model still in training mode): with
    NEFTune noise the two differ."""

    def __init__(self):
        self.differences = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        assert model.training
        embed = model.get_input_embeddings()
        ids = torch.tensor([[10, 20, 30]])
        with torch.no_grad():
            self.differences.append((embed(ids) - embed(ids)).abs().max().item())


@pytest.mark.parametrize("alpha", [None, 5.0])
def test_neftune_noises_embeddings_while_training(tiny_model_dir, tmp_path, alpha):
    probe = EmbeddingProbe()
    trainer = SFTTrainer(tiny_model_dir, args=sft_args(tmp_path, neftune_noise_alpha=alpha),
                         train_dataset=qa_rows(range(8)), callbacks=[probe])
    trainer.train()
    assert len(probe.differences) == 1
    assert (probe.differences[0] > 0) == (alpha is not None)
    embed, ids = trainer.model.get_input_embeddings(), torch.tensor([[10, 20, 30]])
    assert torch.equal(embed(ids), embed(ids)), "the noise must be gone after training"


def test_lora_trains_only_the_adapter_and_saves_an_adapter_folder(tiny_model_dir, tmp_path):
    model_config = ModelConfig(model_name_or_path=tiny_model_dir, use_peft=True, lora_r=4, lora_alpha=8)
    trainer = SFTTrainer(args=sft_args(tmp_path, max_steps=3), train_dataset=qa_rows(range(24)),
                         model_config=model_config)
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable

    out = tmp_path / "out"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    ids = torch.tensor([[10, 20, 30, 40]])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits, atol=1e-6)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_gives_the_weights_of_an_uninterrupted_run(tiny_model_dir, tmp_path):
    rows = qa_rows(range(40))

    def run(name, resume=None, callbacks=()):
        args = sft_args(tmp_path, output_dir=str(tmp_path / name), max_steps=6, save_steps=3, learning_rate=1e-3,
                        per_device_train_batch_size=4, resume_from_checkpoint=resume)
        trainer = SFTTrainer(tiny_model_dir, args=args, train_dataset=rows, callbacks=list(callbacks))
        trainer.train()
        return trainer

    whole = run("whole")
    stopped = run("stopped", callbacks=[StopAt(3)])
    assert stopped.state.global_step == 3 and (tmp_path / "stopped" / "checkpoint-3").is_dir()
    resumed = run("stopped", resume="true")
    assert resumed.state.global_step == 6
    moved = False
    for (name, a), b, c in zip(whole.model.named_parameters(), resumed.model.parameters(), stopped.model.parameters()):
        assert torch.equal(a, b), name
        moved |= not torch.equal(b, c)
    assert moved, "the resumed run must have trained past step 3"


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "Q: ", "answer": "A"}], r"no column 'completion'.*'completion'"),
    ([{"question": "Q: ", "answer": "A"}], r"no SFT columns.*\['question', 'answer'\].*'prompt' \+ 'completion'"),
    ([{"prompt": "Q: ", "completion": ""}], r"column 'completion' is empty in 1 of 1 rows"),
])
def test_bad_rows_name_the_column_and_the_fix(tiny_model_dir, tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        SFTTrainer(tiny_model_dir, args=sft_args(tmp_path), train_dataset=datasets.Dataset.from_list(rows))


def test_llmrl_train_runs_an_sft_recipe(tiny_model_dir, tmp_path):
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    qa_rows(range(16)).to_json(str(train_file))
    qa_rows(range(100, 104)).to_json(str(eval_file))
    recipe_file = tmp_path / "sft.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "algorithm": "sft", "model_name_or_path": tiny_model_dir, "dataset_name": str(train_file),
        "eval_dataset_name": str(eval_file), "max_steps": 2, "per_device_train_batch_size": 8,
        "learning_rate": 1e-3, "save_steps": 0, "output_dir": str(tmp_path / "out"), "disable_tqdm": True,
        "report_to": ["tensorboard"]}))
    history = train(load_recipe(recipe_file))
    out = tmp_path / "out"
    assert (out / "config.yaml").exists() and (out / "model.safetensors").exists()
    assert not list(out.glob("checkpoint-*")), "save_steps: 0 writes only the final model"
    assert "eval_loss" in history[-1], "with eval_steps: 0 the run evaluates once, at the end"
    assert list((out / "runs").glob("events.out.tfevents.*")), "tensorboard logs go to logging_dir (output_dir/runs)"


def test_gpu_recipe_reaches_the_trainer():
    """The Qwen2.5-0.5B LoRA recipe resolves, and its settings become the TRL config the run uses."""
    recipe = load_recipe(ROOT / "recipes" / "qwen2.5-0.5b" / "sft_lora.yaml")
    assert isinstance(recipe.args, SFTConfig) and recipe.model.use_peft
    hf = training_arguments(recipe.args, recipe.model, trl.SFTConfig, max_length=recipe.args.max_length)
    assert (hf.learning_rate, hf.per_device_train_batch_size, hf.gradient_accumulation_steps) == (2e-4, 4, 8)
    assert hf.max_length == 1024 and hf.gradient_checkpointing
    assert hf.bf16 == torch.cuda.is_available()  # bfloat16 weights: bf16 autocast on a GPU, never on a CPU


def test_qlora_recipe_for_an_8gb_gpu_resolves():
    recipe = load_recipe(ROOT / "recipes" / "qwen2.5-0.5b" / "sft_qlora_8gb.yaml")
    assert isinstance(recipe.args, SFTConfig) and recipe.model.use_peft and recipe.model.load_in_4bit
    assert recipe.model.bnb_4bit_quant_type == "nf4" and recipe.model.gradient_checkpointing
    hf = training_arguments(recipe.args, recipe.model, trl.SFTConfig, has_eval_data=True, max_length=recipe.args.max_length)
    assert (hf.per_device_train_batch_size, hf.gradient_accumulation_steps, hf.eval_steps) == (2, 16, 200)
