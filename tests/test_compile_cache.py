"""The `slit` command's persistent compilation cache (slit/train/compile_cache.py)."""

import os
import subprocess
import sys

from slit.train import compile_cache

SCRIPT = """
import jax, jax.numpy as jnp
from jax._src import monitoring
from slit.train import compile_cache
hits = []
monitoring.register_event_listener(lambda event, **kw: hits.append(event))
print(compile_cache.enable_compilation_cache())
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
f(jnp.ones((64, 64))).block_until_ready()
print(sum(e == "/jax/compilation_cache/cache_hits" for e in hits))
"""


def run(env: dict[str, str]) -> list[str]:
    full = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **env}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env=full)
    return out.stdout.split()


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    where = str(tmp_path / "cache")
    assert run({compile_cache.ENV: where}) == [where, "0"]
    assert os.listdir(where)  # the first process wrote its executable
    second = run({compile_cache.ENV: where})  # loads what the first compiled (jnp.ones' program too)
    assert second[0] == where and int(second[1]) >= 1


def test_off_means_no_cache(tmp_path):
    assert run({compile_cache.ENV: "0"}) == ["None", "0"]


def test_where_it_goes(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, "0")
    assert compile_cache.cache_directory() is None
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.cache_directory() == str(tmp_path / "slit" / "jax")
