"""``dvl_ooc.evaluate`` imports nothing heavy and resolves every public name."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light_and_names_resolve():
    code = ("import sys, dvl_ooc, dvl_ooc.evaluate as e\n"
            "heavy = ('torch', 'scipy', 'zarr', 'xarray', 'distributed', 'dask')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n"
            "import dvl_ooc.evaluate.groundtruth\n"  # the module first, then the names
            "print(all(getattr(e, n) is not None for n in e.__all__))\n"
            "print(callable(dvl_ooc.evaluate.ground_truth), dvl_ooc.evaluate is e)\n"
            "print(set(e.__all__) <= set(dir(e)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[:4] == ["[]", "True", "True True", "True"], out
