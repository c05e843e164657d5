"""JAX's persistent compilation cache for every `slit` command.

XLA compiles each jitted step once per process: a minute for a BERT-base stage-one step on a CPU, and
minutes on a TPU pod. With the cache on, the compiled executable is written to a directory keyed by the
program, its shardings, the devices and the JAX/XLA versions, so that a resumed run, the next point of a
sweep with the same shapes, or `slit eval` after `slit train` loads it instead of compiling again. A
different program gets a different key, so the cache never changes a result.

`SLIT_COMPILATION_CACHE` chooses the directory (default `$XDG_CACHE_HOME/slit/jax`, i.e.
`~/.cache/slit/jax`; any path JAX accepts, such as a `gs://` bucket shared by a pod's hosts), and `0`
turns it off. Compilations under a second are not written (JAX's own threshold). The directory is not
pruned; an entry cut short by a killed process makes JAX warn and compile again (delete the directory
to clear it).
"""

from __future__ import annotations

import os
import pathlib

ENV = "SLIT_COMPILATION_CACHE"


def cache_directory() -> str | None:
    """Where compiled programs go ($SLIT_COMPILATION_CACHE, else the user's cache directory); None: off."""
    where = os.environ.get(ENV)
    if where is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
        where = str(pathlib.Path(base) / "slit" / "jax")
    return None if where in ("", "0") else where


def enable_compilation_cache() -> str | None:
    """Points JAX's persistent compilation cache at `cache_directory()`; returns it (None: left off)."""
    where = cache_directory()
    if where is None:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", where)
    return where
