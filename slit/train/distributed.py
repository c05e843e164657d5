"""Joining a multi-process run (one process per host, one global mesh) and noticing a lost peer.

slit scales on JAX's multi-controller runtime: every host runs the same command, the processes meet at
a coordinator, and from then on one `jax.jit` spans every device of every host. A process joins when
the environment says so:

- `SLIT_COORDINATOR=host:port`, `SLIT_NUM_PROCESSES=N`, `SLIT_PROCESS_ID=i` (launch/local.py, SLURM
  scripts, any cluster);
- `SLIT_DISTRIBUTED=auto`: JAX finds the coordinator and the ids itself (Cloud TPU pods, SLURM).

A peer that dies (killed, out of memory, its host gone) would leave the others waiting forever in
their next collective. Two guards bound that wait:
- JAX's coordination service declares a process dead when its heartbeats stop for
  `SLIT_HEARTBEAT_TIMEOUT` seconds (default 100) and stops every other process;
- before that, slit's own watchdog (`PeerWatchdog`) sees a peer's progress counter in the coordination
  service's key-value store stop for `SLIT_PEER_TIMEOUT` seconds (default 60), prints which process
  was lost and exits with `LOST_PEER_EXIT_CODE`. A process that finishes its command says so first,
  so a normal end is never taken for a death.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from collections.abc import Iterator

# EX_UNAVAILABLE from sysexits.h: a service (here: a peer process) is unavailable. Re-running the same
# command on every host resumes from the last checkpoint.
LOST_PEER_EXIT_CODE = 69

_watchdog: PeerWatchdog | None = None


def requested() -> bool:
    """True when the environment asks for a multi-process run."""
    return bool(os.environ.get("SLIT_COORDINATOR")) or os.environ.get("SLIT_DISTRIBUTED") == "auto"


def initialize() -> None:
    """Joins the multi-process run the environment describes (nothing when it describes none), then
    starts the lost-peer watchdog. Call before anything touches JAX's devices."""
    global _watchdog
    if not requested():
        return
    import jax

    heartbeat = int(os.environ.get("SLIT_HEARTBEAT_TIMEOUT", "100"))
    if os.environ.get("SLIT_COORDINATOR"):
        missing = [k for k in ("SLIT_NUM_PROCESSES", "SLIT_PROCESS_ID") if not os.environ.get(k)]
        if missing:
            raise SystemExit(
                f"slit: SLIT_COORDINATOR is set but {' and '.join(missing)} not; set all three "
                "(README: GPUs, TPUs and several hosts)"
            )
        jax.distributed.initialize(
            coordinator_address=os.environ["SLIT_COORDINATOR"],
            num_processes=int(os.environ["SLIT_NUM_PROCESSES"]),
            process_id=int(os.environ["SLIT_PROCESS_ID"]),
            heartbeat_timeout_seconds=heartbeat,
        )
    else:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
    if jax.process_count() > 1:
        _watchdog = PeerWatchdog(float(os.environ.get("SLIT_PEER_TIMEOUT", "60")))
        _watchdog.start()


@contextlib.contextmanager
def only_process_0_prints(stderr: bool = False) -> Iterator[None]:
    """Within the block, the output of every process but process 0 is dropped (stdout; stderr too with
    `stderr`): for commands that every host runs alike and process 0 reports."""
    import jax

    if jax.process_index() == 0:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        if stderr:
            stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        yield


def finished() -> None:
    """Tells the peers that this process ended its command normally (not a death)."""
    if _watchdog is not None:
        _watchdog.stop()


def wait_for_lost_peer(error: BaseException) -> None:
    """In a multi-process run, an error out of a collective usually means that a peer died (its
    connections closed). Says so in one line and waits for the watchdog's verdict: when a peer is
    lost, the watchdog ends this process with a message naming it (no traceback of the collective);
    when every peer is still alive after the peer timeout, returns and the error is reported as usual."""
    if _watchdog is None:
        return
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    print(
        f"\nslit: {type(error).__name__}: {first_line}\nslit: checking whether another process was lost "
        f"(up to {_watchdog.timeout:.0f} s) ...",
        file=sys.stderr,
        flush=True,
    )
    deadline = time.monotonic() + _watchdog.timeout + 3 * _watchdog.interval
    while time.monotonic() < deadline and _watchdog.running():
        time.sleep(_watchdog.interval)


class PeerWatchdog:
    """A daemon thread: publishes this process's heartbeat counter to the coordination service's
    key-value store every `interval` seconds and checks every peer's.

    A peer whose counter has not moved for `timeout` seconds, and that has not said it finished, is
    lost: the thread prints which one and ends this process with LOST_PEER_EXIT_CODE (the main thread
    may be blocked in a collective that will never complete, so it cannot be asked to stop). When the
    coordination service itself cannot be reached, process 0 (which runs it) is the lost one.
    """

    def __init__(self, timeout: float, interval: float = 1.0):
        import jax
        from jax._src import distributed

        self.client = distributed.global_state.client
        self.me, self.count = jax.process_index(), jax.process_count()
        self.timeout, self.interval = timeout, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slit-peer-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Marks this process finished (peers stop watching it) and ends the thread."""
        self._stop.set()
        try:
            self.client.key_value_set(f"slit/peers/finished/{self.me}", "1", allow_overwrite=True)
        except Exception:  # noqa: BLE001, S110 (the service may already be shutting down)
            pass

    def _run(self) -> None:
        beats = 0
        last_seen = {p: (None, time.monotonic()) for p in range(self.count) if p != self.me}
        while not self._stop.wait(self.interval):
            beats += 1
            try:
                self.client.key_value_set(f"slit/peers/beat/{self.me}", str(beats), allow_overwrite=True)
                for peer, (value, since) in list(last_seen.items()):
                    if _try_get(self.client, f"slit/peers/finished/{peer}") == "1":
                        del last_seen[peer]
                        continue
                    now_value = _try_get(self.client, f"slit/peers/beat/{peer}")
                    if now_value != value:
                        last_seen[peer] = (now_value, time.monotonic())
                    elif time.monotonic() - since > self.timeout:
                        self._lost(peer, f"its heartbeat stopped {self.timeout:.0f} s ago")
            except Exception as e:  # noqa: BLE001 (the coordination service, on process 0, is gone)
                if self._stop.is_set():
                    return
                self._lost(0, f"the coordination service it runs cannot be reached ({type(e).__name__})")

    def _lost(self, peer: int, why: str) -> None:
        print(
            f"\nslit: lost process {peer} of {self.count} ({why}); process {self.me} exits. Re-run the same "
            "command on every host to resume from the last checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(LOST_PEER_EXIT_CODE)


def _try_get(client: object, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception as e:  # noqa: BLE001
        if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
            return None
        raise
