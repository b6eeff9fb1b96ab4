"""Direct preference optimisation (and its loss variants) on prompt/chosen/rejected pairs.

    pairs -> [chosen; rejected] in one forward pass -> summed answer log-probs of policy and reference
          -> llmrl.algos.preference_loss(loss_type) -> one loss per pair -> the offline loop

The reference is the policy with its LoRA adapter disabled (no second copy), a frozen copy of the
policy, a `ref_model` you give, or nothing at all during training: with `precompute_ref_log_probs`
its log-probs are computed once, before the first step, and the reference is let go.
The optimisation, accumulation, evaluation and checkpoints are `OfflineTrainer`'s.
"""

from __future__ import annotations

import torch
from accelerate.utils import set_seed
from peft import PeftModel
from transformers import AutoModelForCausalLM

from llmrl.algos import preference_loss
from llmrl.config import DPOConfig, ModelConfig
from llmrl.data import PreferenceCollator, load_datasets, tokenize_preferences
from llmrl.logprobs import completion_logprobs
from llmrl.models import disable_dropout, load_model, load_policy, load_tokenizer
from llmrl.reference import ReferenceModel, build_reference
from llmrl.trainers.checkpoint import save_recipe
from llmrl.trainers.common import make_accelerator, to_device
from llmrl.trainers.launch import refuse_unsharded_copies
from llmrl.trainers.offline import OfflineTrainer


def answer_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`(logps [2B], num_tokens [2B])`: each answer's summed log-probability under `model`, and its
    token count. The LM head runs on the answer positions only (see `completion_logprobs`)."""
    mask = batch["answer_mask"]
    logprobs = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], mask.shape[1])
    return (logprobs * mask).sum(-1), mask.sum(-1)


class DPOTrainer(OfflineTrainer):
    """DPO on a causal LM. `DPOTrainer(model, args, train_dataset).train()` returns the log history.

    Args:
        model: a hub name, a local folder or a model object (a PeftModel trains its adapter).
        args: a `DPOConfig`.
        train_dataset: a `datasets.Dataset` of `prompt`, `chosen`, `rejected` (strings, or chat
            messages; chosen/rejected may also be whole conversations sharing their first messages).
        eval_dataset: pairs in the same format, evaluated every `eval_steps` and at the end.
        processing_class: the tokenizer (default: the model's).
        peft_config: a peft `LoraConfig` to train an adapter (or set use_peft in model_config).
        model_config: how to load the model (dtype, LoRA, ...); default: plain float32 loading.
        ref_model: the reference (name, folder or model object), e.g. an SFT checkpoint; default: the
            policy as it is before training (its adapter disabled under LoRA).
        config: the settings to record with the trackers (default: `args`).
    """

    def __init__(self, model, args: DPOConfig, train_dataset, eval_dataset=None, processing_class=None,
                 peft_config=None, model_config: ModelConfig | None = None, ref_model=None,
                 config: dict | None = None):
        self.args = args
        accelerator = make_accelerator(args)
        set_seed(args.seed)  # before the LoRA adapter is initialised
        model_config = model_config or ModelConfig(model_name_or_path=model if isinstance(model, str) else None)
        tokenizer = processing_class or load_tokenizer(model_config)
        collate = PreferenceCollator(tokenizer.pad_token_id)
        with accelerator.main_process_first():  # one process writes the datasets cache, the others read it
            train_rows = self._tokenize(train_dataset, tokenizer, "train_dataset")
            eval_rows = self._tokenize(eval_dataset, tokenizer, "eval_dataset") if eval_dataset is not None else None
        policy = to_device(load_policy(model_config, model=model, peft_config=peft_config), accelerator)
        if args.disable_dropout:  # else policy and reference differ by noise, and the first loss is not ln 2
            disable_dropout(policy)
        if ref_model is not None:
            if ref_model is model and not isinstance(model, str):  # the same folder gives a frozen copy: fine
                raise ValueError("ref_model is the policy object itself; leave ref_model out and the reference is "
                                 "taken from the policy before training (adapter disabled under LoRA).")
            frozen = to_device(load_model(ref_model, AutoModelForCausalLM, model_config), accelerator)
            self.reference = ReferenceModel(frozen.eval().requires_grad_(False), shares_policy=False)
        else:
            self.reference = build_reference(policy, model_config, needed=not args.precompute_ref_log_probs)
        if self.reference is not None:
            self.reference.autocast = accelerator.autocast  # as the prepared policy computes
        refuse_unsharded_copies(accelerator, ["frozen reference"] if self.reference is not None
                                and not self.reference.shares_policy else [])
        self._own_reference = ref_model is None
        self.collate_fn, self.accelerator, self.global_step = collate, accelerator, 0
        if args.precompute_ref_log_probs:
            reference = self._reference_for_precompute(policy)
            train_rows = self._with_reference_logps(train_rows, reference)
            if eval_rows is not None:
                eval_rows = self._with_reference_logps(eval_rows, reference)
            self.reference = None  # let go: training reads the log-probs from the batches
        super().__init__(args, policy, tokenizer, train_rows, eval_rows, collate, accelerator, config)

    def _reference_for_precompute(self, policy) -> ReferenceModel:
        """The reference that can compute log-probs now. Before any update the policy is the
        reference itself (under LoRA, always is with its adapter disabled), so no copy is made."""
        if self.reference is not None:
            return self.reference
        if self._own_reference and (isinstance(policy, PeftModel) or self.global_step == 0):
            return ReferenceModel(policy, shares_policy=isinstance(policy, PeftModel))
        raise ValueError("precompute_ref_log_probs: the reference was let go once its log-probs were computed, so it "
                         "cannot score a new dataset now. Give the dataset as eval_dataset when building the "
                         "trainer, or set precompute_ref_log_probs: false.")

    def _tokenize(self, rows, tokenizer, source: str):
        prompt_limit = self.args.max_prompt_length or self.args.max_length // 2
        return tokenize_preferences(rows, tokenizer, source, prompt_limit, self.args.max_length)

    @torch.no_grad()
    def _with_reference_logps(self, rows, reference):
        """`rows` with columns `ref_chosen_logps`, `ref_rejected_logps`, computed by `reference`."""
        chosen, rejected = [], []
        for batch in self.ordered_loader(rows, self.args.per_device_eval_batch_size):
            logps = self.accelerator.gather_for_metrics(answer_logps(reference, batch)[0].view(2, -1).T)
            chosen.append(logps[:, 0].cpu())
            rejected.append(logps[:, 1].cpu())
        return (rows.add_column("ref_chosen_logps", torch.cat(chosen).tolist())
                .add_column("ref_rejected_logps", torch.cat(rejected).tolist()))

    def compute_loss(self, model, batch):
        """`(per_pair_loss [B], metrics)`: the preference loss of each pair and the logged quantities.

        The loss reads summed answer log-probs, or per-token averages with `average_log_prob` (IPO
        as in TRL). The implicit rewards `beta * (log pi - log pi_ref)` are reported on the sums
        either way, as TRL reports them.
        """
        args = self.args
        logps, num_tokens = answer_logps(model, batch)
        if "ref_logps" in batch:
            ref_logps = batch["ref_logps"]
        else:
            ref_logps, _ = answer_logps(self.reference, batch)
        scale = num_tokens.float() if args.average_log_prob else torch.ones_like(logps)
        (chosen, rejected), (ref_chosen, ref_rejected) = (logps / scale).chunk(2), (ref_logps / scale).chunk(2)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            args.loss_type, chosen_logps=chosen, rejected_logps=rejected, ref_chosen_logps=ref_chosen,
            ref_rejected_logps=ref_rejected, beta=args.beta, label_smoothing=args.label_smoothing)
        chosen_scale, rejected_scale = scale.chunk(2)
        chosen_rewards, rejected_rewards = chosen_rewards * chosen_scale, rejected_rewards * rejected_scale
        logps = logps.detach()
        return losses, {
            "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": logps.chunk(2)[0], "logps/rejected": logps.chunk(2)[1],
        }

    def evaluate(self, dataset=None) -> dict:
        """Metrics over `dataset` (raw pairs; default: the eval dataset), prefixed `eval/`."""
        if dataset is None:
            return super().evaluate()
        rows = self._tokenize(dataset, self.tokenizer, "evaluate(dataset)")
        if self.args.precompute_ref_log_probs:
            reference = self._reference_for_precompute(self.accelerator.unwrap_model(self.model))
            rows = self._with_reference_logps(rows, reference)
        return super().evaluate(rows)


def run(recipe):
    """`llmrl train` for `algorithm: dpo`: the recipe's pairs and model through `DPOTrainer`."""
    train_rows, eval_rows = load_datasets(recipe.data, required=("chosen", "rejected"), optional=("prompt",))
    trainer = DPOTrainer(recipe.model.model_name_or_path, recipe.args, train_rows, eval_dataset=eval_rows,
                         model_config=recipe.model, config=recipe.to_dict())
    save_recipe(recipe, trainer.accelerator)
    return trainer.train()
