"""keep_freed_memory: a large block freed and allocated again is not faulted in again (glibc, Linux)."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from slit.train.host_memory import keep_freed_memory

    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = np.ones(64 << 20, np.float32)  # 256 MiB, far above glibc's largest mmap threshold
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(faults[-1])
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_are_reused_without_page_faults():
    def faults(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "SLIT_KEEP_FREED_MEMORY"}  # conftest sets it
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env
        )
        return int(out.stdout.split()[-1])

    # A fresh mmap each time: every page faulted in again (128 with numpy's 2 MiB transparent huge pages,
    # 65,536 with 4 KiB pages); kept, the freed block is reused.
    default = faults("default")
    assert default >= 100
    assert faults("keep") <= default // 10


def test_turned_off_by_the_environment(monkeypatch):
    from slit.train import host_memory

    monkeypatch.setenv("SLIT_KEEP_FREED_MEMORY", "0")
    assert host_memory.keep_freed_memory() is False
