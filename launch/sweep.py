"""Runs the sweep of a config file (its get_sweep()): one `slit train` per point, one after another.

    python launch/sweep.py configs/stage1_synthetic.py --root runs/sweep_queries
    python launch/sweep.py CONFIG --root DIR --dry-run                  # the plan, nothing runs
    python launch/sweep.py CONFIG --root DIR --print-commands           # one command a line (a job array)
    python launch/sweep.py CONFIG --root DIR --prefix "srun -G1" --only 0,2 -- --config.total_steps=300
    slit report DIR --out DIR/report                                    # compare the points
    python launch/sweep.py CONFIG --root DIR --report --metric qa_accuracy  # then writes DIR/report

Re-running the same command resumes the sweep: finished points are skipped. Points that read cached encoder
features (features=cached) get the cache built once first. The logic is slit/sweep.py.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's slit

from slit import sweep  # noqa: E402

if __name__ == "__main__":
    sys.exit(sweep.main())
