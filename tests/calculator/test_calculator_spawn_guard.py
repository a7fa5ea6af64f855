"""The spawn pitfall: a flat script (no main guard) that starts a calculator's cluster fails fast
with a message naming the fix; the same script under ``if __name__ == "__main__":`` runs."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap

import pytest

from dvl_ooc.exceptions import MainGuardError
from dvl_ooc.runtime import _guarded_lines, check_main_guard

pytest.importorskip("distributed")

BODY = """\
with open({marker!r}, "a") as f:  # one line per execution of this module-level code
    f.write("ran\\n")
torch.manual_seed(0)
x, y = torch.randn(12, 3), torch.arange(12) % 2
model = DirectInfluence(nn.Linear(3, 2), F.cross_entropy, regularization=0.1).fit((x, y))
with DaskInfluenceCalculator(model, n_workers=1, dashboard_address=None) as calc:
    got = calc.influences(x[:4], y[:4], x, y, test_chunk=2, train_chunk=5).compute()
assert abs(got - model.influences(x[:4], y[:4], x, y).numpy()).max() < 1e-5
print("finished")
"""
HEADER = """\
import torch
import torch.nn.functional as F
from torch import nn

from dvl_ooc import DaskInfluenceCalculator, DirectInfluence

"""


def _run(tmp_path, guarded: bool, timeout: float) -> tuple[subprocess.CompletedProcess, str]:
    marker = tmp_path / f"runs-{guarded}.txt"
    body = BODY.format(marker=str(marker))
    if guarded:
        body = 'if __name__ == "__main__":\n' + textwrap.indent(body, "    ")
    script = tmp_path / f"script_{'guarded' if guarded else 'flat'}.py"
    script.write_text(HEADER + body)
    proc = subprocess.run([sys.executable, str(script)], timeout=timeout, capture_output=True,
                          text=True, cwd=tmp_path)
    return proc, marker.read_text()


def test_flat_script_fails_fast_and_guarded_script_runs(tmp_path):
    # without the check this hangs for minutes (each spawned worker re-runs the script); with
    # it, the script stops in the parent before any worker starts: imports + fit, seconds
    proc, runs = _run(tmp_path, guarded=False, timeout=60)
    assert proc.returncode != 0, proc.stdout
    assert "MainGuardError" in proc.stderr, proc.stderr[-2000:]
    assert 'if __name__ == "__main__"' in proc.stderr
    assert "DaskInfluenceCalculator" in proc.stderr  # names the caller
    assert "finished" not in proc.stdout
    assert runs == "ran\n", "a worker process re-ran the script"

    # the same script under the guard starts its spawned worker and computes (slower on a
    # busy machine: the worker imports torch; one worker shows the guard as well as two)
    proc, runs = _run(tmp_path, guarded=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished" in proc.stdout and runs == "ran\n"


def test_guarded_lines_of_a_script(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent("""\
        import os
        x = 1
        if __name__ == "__main__":
            y = 2
            z = 3
        if "__main__" == __name__:
            w = 4
        if __name__ != "__main__":
            v = 5
        """))
    assert _guarded_lines(str(script), script.stat().st_mtime) == ((4, 5), (7, 7))
    (tmp_path / "bad.py").write_text("def (:\n")
    assert _guarded_lines(str(tmp_path / "bad.py"), 0.0) is None


def test_check_main_guard_in_this_process_and_in_a_spawned_child(monkeypatch):
    check_main_guard("a test")  # pytest's own main module is guarded: no error
    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(MainGuardError, match='a test was called while a spawned worker'):
        check_main_guard("a test")
