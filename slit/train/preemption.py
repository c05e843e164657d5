"""Preemption: stop at the next step boundary, save, and exit with a code that says "re-run me".

A single process watches SIGTERM and SIGINT itself and stops at the next step. In a multi-process
run every process must stop at the same step, so a host's signal is shared with the others by an
all-gather of one flag, every `check_every` calls (steps, or evaluation batches) rather than every
step: the hosts do not meet every step, and a signal is acted on at most `check_every` steps later
(config `preemption_check_every_steps`; keep that many steps inside the grace period a scheduler
gives, e.g. 30 s on Cloud TPU). JAX's preemption sync point (the coordination service's own notice
of a coming preemption) is honoured at every check too.
"""

from __future__ import annotations

import signal
import sys
import types

import jax
import numpy as np
from jax.experimental import multihost_utils

# EX_TEMPFAIL from sysexits.h: "try again later". The run saved; re-running the same command resumes.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):  # noqa: N818 (it is a signal to stop, not an error)
    """Raised after the preemption checkpoint is written; the CLI exits with PREEMPTED_EXIT_CODE."""

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, step: int, checkpoint: str, evaluation: str = ""):
        """checkpoint: where step `step` is saved ("" for an evaluation of a saved step); evaluation:
        what a stopped evaluation kept (e.g. "12 batches saved in DIR")."""
        parts = [f"saved step {step} to {checkpoint}"] if checkpoint else []
        if evaluation:
            parts.append(f"the evaluation of step {step} kept {evaluation}")
        super().__init__(
            f"preempted: {'; '.join(parts)}; re-run the same command to resume (it computes only the rest)"
        )
        self.step = step


class PreemptionWatcher:
    """Records SIGTERM/SIGINT and answers "stop now?" at step boundaries (the same answer on every host).

    Use as a context manager: the previous signal handlers come back on exit. A second SIGINT while
    a save is pending falls through to the default handler, so Ctrl-C twice still kills the run.
    """

    def __init__(self, check_every: int = 10) -> None:
        """check_every: in a multi-process run, the hosts share their signals every this many calls of
        `should_stop` (each call a step or an evaluation batch; every process calls it equally often)."""
        if check_every < 1:
            raise ValueError(f"preemption_check_every_steps={check_every} must be at least 1")
        self.signal_name: str | None = None
        self.check_every = check_every
        self._calls = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionWatcher:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(
            f"\nslit: {self.signal_name} received; saving at the end of this step, then exiting.",
            file=sys.stderr,
            flush=True,
        )

    def should_stop(self, step: int) -> bool:
        """True when this run must save and exit now; agreed by all processes (`step`: the step just
        done, for JAX's preemption sync point)."""
        local = self.signal_name is not None
        if jax.process_count() == 1:
            return local
        self._calls += 1
        if self._calls % self.check_every:
            return False
        anyone = bool(np.any(multihost_utils.process_allgather(np.array(local))))
        return anyone or multihost_utils.reached_preemption_sync_point(self._calls)
