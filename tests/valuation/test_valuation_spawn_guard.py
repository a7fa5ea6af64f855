"""The spawn pitfall: a flat script (no main guard) that asks for worker processes fails fast.

Without the check, each spawned worker would re-import the script and re-run its work before the
cluster failed to start (minutes, no message). The guarded form runs in test_dask.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("distributed")

FLAT_SCRIPT = """\
import numpy as np
from sklearn.linear_model import LogisticRegression

from dvl_ooc.valuation import MaxChecks, ModelUtility, TMCShapleyValuation

with open({marker!r}, "a") as f:  # one line per execution of this module-level code
    f.write("ran\\n")
rng = np.random.default_rng(0)
x = rng.normal(size=(30, 3))
y = (x[:, 0] > 0).astype(int)
utility = ModelUtility(LogisticRegression(), test_data=(x, y))
valuation = TMCShapleyValuation(utility, is_done=MaxChecks(1), seed=0, n_workers=2)
valuation.fit(x, y)
print("finished")
"""


def test_flat_script_with_n_workers_raises_main_guard_error_quickly(tmp_path):
    marker = tmp_path / "runs.txt"
    script = tmp_path / "flat_valuation.py"
    script.write_text(FLAT_SCRIPT.format(marker=str(marker)))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script)], timeout=60, capture_output=True,
                          text=True, cwd=tmp_path)
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0, proc.stdout
    assert "MainGuardError" in proc.stderr, proc.stderr[-2000:]
    assert 'if __name__ == "__main__"' in proc.stderr
    assert "TMCShapleyValuation(n_workers=2)" in proc.stderr  # names the caller
    assert "finished" not in proc.stdout
    assert marker.read_text() == "ran\n", "a worker process re-ran the script"
    assert elapsed < 60, textwrap.shorten(proc.stderr, 500)
