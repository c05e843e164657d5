#!/usr/bin/env python3
"""Runs a command as N processes on this machine, each with D simulated CPU devices: the multi-host path
of a pod or cluster, on one CPU machine (tests run it this way).

    python launch/local.py --processes 2 --devices-per-process 4 -- \
        slit train --config configs/stage1_synthetic.py --workdir runs/mp

Each process gets the environment a pod host would have: SLIT_COORDINATOR (a free local port),
SLIT_NUM_PROCESSES, SLIT_PROCESS_ID, and XLA_FLAGS with --xla_force_host_platform_device_count=D. The
processes form one JAX runtime with N x D devices (cross-process collectives on the CPU go through gloo).

Every output line is prefixed with [pI], the process it came from. SIGTERM or SIGINT to this launcher
is passed on to every process (a preemption of every host: they save together and exit 75). When one
process exits with an error the launcher says so; the others notice the lost peer themselves
(slit/train/distributed.py) and exit, and any still running after --grace seconds are killed. The exit
code is the first non-zero exit code of a process (0 when all succeed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port nothing listens on now (the coordinator binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], index: int, processes: int, devices: int, port: int) -> dict[str, str]:
    """The environment of process `index`: the coordinator, its id and D simulated CPU devices."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", base.get("XLA_FLAGS", "")).strip()
    return {
        **base,
        "SLIT_COORDINATOR": f"localhost:{port}",
        "SLIT_NUM_PROCESSES": str(processes),
        "SLIT_PROCESS_ID": str(index),
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
        "JAX_PLATFORMS": base.get("JAX_PLATFORMS", "cpu"),
        "PYTHONUNBUFFERED": "1",
    }


def resolve_command(command: list[str]) -> list[str]:
    """`slit ...` runs the `slit` next to this Python when it is not on PATH (a venv not activated)."""
    if command and command[0] == "slit" and shutil.which("slit") is None:
        beside = os.path.join(os.path.dirname(sys.executable), "slit")
        if os.path.exists(beside):
            return [beside, *command[1:]]
    return command


def _relay(index: int, stream: object, out: object, lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        with lock:
            out.buffer.write(f"[p{index}] ".encode() + line)
            out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, required=True, help="how many processes (hosts) to start")
    parser.add_argument(
        "--devices-per-process", type=int, default=1, help="simulated CPU devices in each process"
    )
    parser.add_argument("--port", type=int, default=0, help="the coordinator's port (0: a free one)")
    parser.add_argument(
        "--grace",
        type=float,
        default=120.0,
        help="seconds the others may run on after one process failed, before they are killed",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. slit train ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --, e.g. -- slit train --config ... --workdir ...")
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices-per-process must be at least 1")

    port = args.port or free_port()
    command = resolve_command(command)
    lock = threading.Lock()
    procs, relays = [], []
    for i in range(args.processes):
        env = process_env(dict(os.environ), i, args.processes, args.devices_per_process, port)
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        with lock:
            print(f"[launch] process {i}: pid {proc.pid}", file=sys.stderr, flush=True)
        relay = threading.Thread(target=_relay, args=(i, proc.stdout, sys.stdout, lock), daemon=True)
        relay.start()
        relays.append(relay)

    def forward(signum: int, frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    first_failure: tuple[int, int] | None = None  # (process, exit code)
    failed_at = None
    while any(p.poll() is None for p in procs):
        for i, proc in enumerate(procs):
            code = proc.poll()
            if code not in (None, 0) and first_failure is None:
                first_failure, failed_at = (i, code), time.monotonic()
                with lock:
                    print(f"[launch] process {i} exited with code {code}", file=sys.stderr, flush=True)
        if failed_at is not None and time.monotonic() - failed_at > args.grace:
            for i, proc in enumerate(procs):
                if proc.poll() is None:
                    with lock:
                        print(
                            f"[launch] killing process {i}: still running {args.grace:.0f} s later",
                            file=sys.stderr,
                            flush=True,
                        )
                    proc.kill()
        time.sleep(0.2)
    for relay in relays:
        relay.join(timeout=5)
    codes = [p.returncode for p in procs]
    if first_failure is None:
        first_failure = next(((i, c) for i, c in enumerate(codes) if c != 0), None)
    if first_failure is not None:
        print(f"[launch] exit codes by process: {codes}", file=sys.stderr, flush=True)
        return first_failure[1] if first_failure[1] > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
