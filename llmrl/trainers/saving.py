"""What llmrl's own loops (the online trainer and the offline DPO loop) share around training:
resuming, checkpoints, the final save, the log history and `state`.

A trainer sets `args`, `accelerator`, `model`, `tokenizer`, `scheduler`, `loader`, `global_step`,
`batches_consumed`, `max_steps` and `logger`, and overrides the hooks where it holds more than one
trained model (PPO's critic): `_trained_models`, `_schedulers`, `_exports`, `_checkpoint_state`.
"""

from __future__ import annotations

from pathlib import Path

from llmrl.adapters import policy_export
from llmrl.trainers.checkpoint import claim_output_dir, load_checkpoint, resolve_resume, save_checkpoint, save_final, write_exports
from llmrl.trainers.common import gathered_state_dict, trainer_state
from llmrl.trainers.guards import checkpoint_is_finite, require_finite_for_save


class SavedRun:
    """Mixin: `_resume`, `save_checkpoint`, `save_model`, `log_history`, `state`."""

    logger = None

    @property
    def log_history(self) -> list[dict]:
        return self.logger.history if self.logger else []

    state = property(trainer_state, doc="transformers' `TrainerState` of the run (`common.trainer_state`).")

    def _trained_models(self) -> list:
        """The prepared models whose weights train."""
        return [self.model]

    def _schedulers(self) -> list:
        """The run's LR schedules, in the order checkpoints keep them."""
        return [self.scheduler]

    def _checkpoint_state(self) -> dict:
        """What trainer_state.json keeps besides the step and the schedules."""
        return {"batches_consumed": self.batches_consumed}

    def _exports(self, folder: str) -> dict:
        """The plain folders a save writes: the policy (or its adapter) at `folder`. Every process
        must call it: sharded weights are gathered here."""
        return {folder: (policy_export(self.accelerator.unwrap_model(self.model)),
                         gathered_state_dict(self.accelerator, self.model))}

    def _resume(self) -> dict | None:
        """Claim output_dir, and restore the checkpoint `resume_from_checkpoint` names (the step
        included); returns its trainer_state.json, or None for a fresh run."""
        claim_output_dir(self.args, self.accelerator)
        resume = resolve_resume(self.args.resume_from_checkpoint, self.args.output_dir)
        if resume is None:
            return None
        state = load_checkpoint(self.accelerator, resume, self._schedulers())
        self.global_step = state["step"]
        if self.accelerator.is_main_process:
            print(f"resumed from {resume} at step {self.global_step}")
        return state

    def save_checkpoint(self) -> Path | None:
        """`checkpoint-<step>` (None, with a warning, when the weights are not finite)."""
        if not checkpoint_is_finite(self.accelerator, self._trained_models(), self.global_step):
            return None
        return save_checkpoint(self.accelerator, self.args.output_dir, self.global_step, self._checkpoint_state(),
                               self._exports("model"), self.tokenizer, self.args.save_total_limit, self._schedulers())

    def save_model(self, output_dir: str):
        """The final model (or adapter) and tokenizer as a plain `save_pretrained` folder (with what
        else `_exports` names, in its subfolders)."""
        require_finite_for_save(self.accelerator, self._trained_models(), output_dir)
        exports = self._exports(".")
        save_final(self.accelerator, output_dir, lambda folder: write_exports(folder, exports, self.tokenizer))
