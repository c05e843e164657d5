"""The step loop every trainer shares: logging, periodic evaluation, checkpoints, preemption and
non-finite guards. The stage-specific parts (the jitted step, the batches, the evaluation) come in
as functions.

Reliability rules it enforces:
- at most one step is in flight, so timings and the progress bar tell the truth;
- on SIGTERM/SIGINT (or a JAX preemption notice), every process saves at the next step boundary,
  waits for the save and raises `Preempted` (exit code 75: re-run the same command to resume);
- a step with non-finite gradients is skipped inside the jitted step (optax.apply_if_finite) and
  counted; after `max_consecutive_nonfinite` skips in a row, or a non-finite loss, the run saves,
  writes `<workdir>/nonfinite_report.json` and raises `NonFiniteTrainingError`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import ml_collections

from slit.train.checkpoint import Checkpointer
from slit.train.metrics import MetricWriter
from slit.train.preemption import Preempted, PreemptionWatcher
from slit.train.progress import Progress

ABORTED_EXIT_CODE = 3


class NonFiniteTrainingError(RuntimeError):
    """The run cannot go on (non-finite loss or too many skipped steps); a checkpoint was saved."""

    exit_code = ABORTED_EXIT_CODE


@dataclasses.dataclass
class StepFunctions:
    """What a trainer gives the loop.

    step: (state, frozen, batch, key) -> (state, metrics), jitted; metrics must include `loss`,
      `nonfinite_consecutive` and `nonfinite_total`.
    next_batch: () -> the next global batch.
    evaluate: (step, should_stop) -> a dict of scalars to log, or None if it stopped for preemption.
      Called every `eval_every_steps` (never at the last step: the trainer evaluates after the loop).
    postfix: the metric names shown on the progress bar.
    """

    step: Callable[..., tuple[dict, dict]]
    frozen: Any
    next_batch: Callable[[], dict]
    key: jax.Array
    evaluate: Callable[[int, dict, Callable[[], bool]], dict | None] | None
    postfix: tuple[str, ...] = ("loss",)


def run(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    state: dict,
    start_step: int,
    fns: StepFunctions,
    ckpt: Checkpointer,
    writer: MetricWriter,
    data_iter: grain.DatasetIterator,
    watcher: PreemptionWatcher,
) -> dict:
    """Runs steps start_step+1 .. total_steps; returns the final state (saved).

    `watcher` is entered by the caller, so that evaluation after the loop is covered too.
    """
    is_main = jax.process_index() == 0
    progress = Progress(config.total_steps, start_step, enabled=is_main)
    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
    recent = collections.deque(maxlen=5)  # the last logged metrics, for the abort report
    metrics, first_bad_step, done = None, None, start_step

    try:
        for step in range(start_step, config.total_steps):
            t0 = time.perf_counter()
            batch = fns.next_batch()
            data_wait += time.perf_counter() - t0
            previous_metrics = metrics
            state, metrics = fns.step(state, fns.frozen, batch, fns.key)
            done = step + 1
            if previous_metrics is not None:  # waits for the previous step only
                first_bad_step = _check_finite(
                    jax.device_get(previous_metrics), done - 1, first_bad_step, config, recent
                )
            window_steps += 1
            progress.update(done)

            if done % config.log_every_steps == 0 or done == config.total_steps:
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - window_start
                scalars["steps_per_second"] = window_steps / elapsed
                scalars["examples_per_second"] = window_steps * config.batch_size / elapsed
                scalars["data_wait_fraction"] = data_wait / elapsed
                writer.write(done, scalars)
                recent.append({"step": done, **scalars})
                progress.set_postfix(**{k: scalars[k] for k in fns.postfix if k in scalars})
                window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0

            if (
                fns.evaluate is not None
                and config.eval_every_steps
                and done % config.eval_every_steps == 0
                and done < config.total_steps
            ):
                report = fns.evaluate(done, state, functools.partial(watcher.should_stop, done))
                if report is not None:
                    writer.write(done, report)
                window_start = time.perf_counter()

            if watcher.should_stop(done):
                progress.close()
                _save_and_wait(ckpt, done, state, data_iter, writer)
                raise Preempted(done, str(ckpt.directory / str(done)))

            if config.checkpoint_every_steps and done % config.checkpoint_every_steps == 0:
                waited = ckpt.save(done, state, data_iter)  # the copy off the devices; writing goes on
                if waited is not None:
                    writer.write(done, {"checkpoint_blocking_seconds": waited})

        if metrics is not None:
            _check_finite(jax.device_get(metrics), done, first_bad_step, config, recent)
    except _NonFinite as bad:
        progress.close()
        _save_and_wait(ckpt, done, state, data_iter, writer)
        report = {
            "reason": bad.reason,
            "first_bad_step": bad.first_bad_step,
            "detected_at_step": bad.step,
            "checkpoint": str(ckpt.directory / str(done)),
            "metrics_of_bad_step": bad.metrics,
            "last_logged_metrics": list(recent),
        }
        path = workdir / "nonfinite_report.json"
        if is_main:
            path.write_text(json.dumps(report, indent=2) + "\n")
        raise NonFiniteTrainingError(
            f"{bad.reason}; non-finite since step {bad.first_bad_step}. Saved step {done} to "
            f"{report['checkpoint']}; report: {path}. Lower the learning rate or check the data, then "
            "re-run (it resumes from the saved step)."
        ) from None

    progress.close()
    ckpt.save(config.total_steps, state, data_iter, force=True)
    writer.write(config.total_steps, {"checkpoint_wait_seconds_at_end": ckpt.wait()})
    return state


def _save_and_wait(ckpt: Checkpointer, step: int, state: dict, data_iter: Any, writer: MetricWriter) -> None:
    start = time.perf_counter()
    ckpt.save(step, state, data_iter, force=True)
    ckpt.wait()
    writer.write(step, {"blocking_save_seconds": time.perf_counter() - start})


def _check_finite(
    metrics: dict,
    step: int,
    first_bad_step: int | None,
    config: ml_collections.ConfigDict,
    recent: collections.deque,
) -> int | None:
    """Raises _NonFinite on a non-finite loss or too many consecutive skipped steps; returns the first
    step of the current run of skips (None when the last step was fine)."""
    consecutive = int(metrics["nonfinite_consecutive"])
    loss = float(metrics["loss"])
    if consecutive == 0 and math.isfinite(loss):
        return None
    first_bad_step = first_bad_step or step
    if math.isfinite(loss) and consecutive < config.max_consecutive_nonfinite:
        return first_bad_step
    reason = (
        f"non-finite loss ({loss}) at step {step}"
        if not math.isfinite(loss)
        else f"{consecutive} consecutive steps with non-finite gradients (max_consecutive_nonfinite="
        f"{config.max_consecutive_nonfinite})"
    )
    raise _NonFinite(reason, first_bad_step, step, {k: float(v) for k, v in metrics.items()})


class _NonFinite(Exception):  # noqa: N818 (internal: becomes NonFiniteTrainingError after the save)
    def __init__(self, reason: str, first_bad_step: int, step: int, metrics: dict):
        super().__init__(reason)
        self.reason, self.first_bad_step, self.step, self.metrics = reason, first_bad_step, step, metrics
