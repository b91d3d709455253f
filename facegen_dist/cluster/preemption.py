"""Stop at a step boundary when the scheduler says so, with every rank agreeing.

SLURM sends SIGUSR1 (`#SBATCH --signal=USR1@lead`, or `scancel --signal=USR1`) before a time limit or a
preemption; submitit's jobs get SIGUSR2 (its default). The handler only records the signal; the loop asks
`agreed()` after each step, so all ranks stop and checkpoint after the same step.
"""

from __future__ import annotations

import signal
import threading

import torch

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class PreemptionWatcher:
    """Records the first SIGUSR1/SIGUSR2 of this process; `agreed()` shares it with every rank.

    SIGTERM is left alone: SLURM sends it to kill, KillWait seconds before SIGKILL, usually too short for a
    checkpoint; the atomic checkpoints keep the last one safe.
    """

    def __init__(self, signals: tuple[int, ...] = PREEMPT_SIGNALS):
        self.received: int | None = None
        self.previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for signum in signals:
                self.previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only a record: a second signal while the checkpoint is being written changes nothing.
        if self.received is None:
            self.received = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def agreed(self, accelerator) -> bool:
        """True on every rank once any rank has received a signal (one tiny all-reduce per step).

        A checkpoint needs every rank at the same step, so ranks stop on the agreed answer, not on their own signal.
        """
        if accelerator.num_processes == 1:
            return self.received is not None
        # The largest signal number any rank got (0: none), so every rank also knows which one it was.
        signums = accelerator.gather(torch.tensor([self.received or 0], device=accelerator.device))
        received = int(signums.max().item())
        if received and self.received is None:
            self.received = received
        return received > 0

    def ignore_further(self) -> None:
        """Once the run has stopped: more signals are ignored, also while the interpreter shuts down.

        (At shutdown Python resets signals it handled to SIG_DFL, and SIGUSR1's default kills: a late
        signal would turn a clean exit into a failed job. It leaves SIG_IGN alone.)
        """
        for signum in self.previous:
            signal.signal(signum, signal.SIG_IGN)

    def restore(self) -> None:
        """Put back the handlers that were there before (e.g. submitit's)."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def previous_handler(self, signum: int):
        return self.previous.get(signum)
