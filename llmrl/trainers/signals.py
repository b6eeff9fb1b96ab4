"""SIGINT and SIGTERM end a run with a checkpoint instead of losing it.

Preemptible and SLURM machines send SIGTERM before they take the machine back, and Ctrl-C sends
SIGINT; with `save_steps: 0` (every shipped recipe) either used to lose the whole run. Now the first
signal lets the current optimizer step finish, the trainer writes `checkpoint-<step>` and stops
with `RunInterrupted` (the CLI exits 128 + the signal's number); `resume_from_checkpoint: true`
continues from there. A second signal stops the process at once.

Every process of a launch gets the signal (torchrun forwards it), but not always at the same step:
`requested()` is a collective, so they all stop after the same step and save together. A process
often gets the signal twice, directly (Ctrl-C and SLURM signal the whole process group) and again
from torchrun forwarding it: a repeat within `repeat_window()` seconds is that same request (1 s
alone; 5 s under a launcher, whose forwarding comes late on a loaded machine). torchrun gives its
workers 30 seconds to finish after it forwards a signal, then kills them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW = 1.0  # seconds: a signal repeated this soon is the same request
LAUNCHED_REPEAT_WINDOW = 5.0  # under torchrun: its forwarded copy can trail the direct one by over a second


def repeat_window() -> float:
    """How soon a repeated signal is the same request: longer in a worker of a torchrun/accelerate launch."""
    return LAUNCHED_REPEAT_WINDOW if "TORCHELASTIC_RUN_ID" in os.environ else REPEAT_WINDOW


class RunInterrupted(RuntimeError):
    """The run stopped on a signal after writing a checkpoint; `signum` says which signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopOnSignal:
    """`with StopOnSignal() as stop:` installs the handlers (main thread only); `stop.requested(accelerator)`
    is True on every process once any process got a signal."""

    def __init__(self):
        self.signum = 0
        self._first = 0.0
        self._previous = {}

    def _handle(self, signum, frame):
        if not self.signum:
            self.signum, self._first = signum, time.monotonic()
            print(f"llmrl: {signal.Signals(signum).name} received: finishing this step, then writing a checkpoint "
                  "(send it again to stop at once).", file=sys.stderr, flush=True)
        elif time.monotonic() - self._first > repeat_window():  # a second request: the previous handler acts now
            self.__exit__()
            os.kill(os.getpid(), signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
            for sig in SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def requested(self, accelerator) -> int:
        """The signal any process received (0 if none); every process must call it at the same step."""
        if accelerator.num_processes == 1:
            return self.signum
        got = accelerator.reduce(torch.tensor(float(self.signum), device=accelerator.device), "sum")
        return int(self.signum or (signal.SIGTERM if got.item() > 0 else 0))


def stop_if_requested(trainer, stop: StopOnSignal, checkpoint=None) -> None:
    """After a step: if a signal came, write the checkpoint of this step (unless `checkpoint`, this
    step's periodic one, already is it), close the logs and raise `RunInterrupted`."""
    signum = stop.requested(trainer.accelerator)
    if not signum:
        return
    checkpoint = checkpoint or trainer.save_checkpoint()
    trainer.logger.close()
    where = (f"{checkpoint} written; continue with resume_from_checkpoint: true" if checkpoint is not None
             else "no checkpoint written (the weights are not finite)")
    raise RunInterrupted(f"stopped by {signal.Signals(signum).name} after step {trainer.global_step}: {where}.", signum)
