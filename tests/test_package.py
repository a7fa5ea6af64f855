"""The package namespace: cheap to import, every public name resolves."""

from __future__ import annotations

import subprocess
import sys

import dvl_ooc


def test_import_is_cheap_and_loads_heavy_modules_on_first_use():
    # a fresh interpreter: this one has torch and scikit-learn loaded by other tests
    code = ("import sys, dvl_ooc, dvl_ooc.valuation\n"
            "heavy = ('torch', 'sklearn', 'zarr', 'xarray', 'distributed')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n"
            "dvl_ooc.valuation.TorchEstimator\n"
            "print('sklearn' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    # dvl_ooc.valuation needs torch, but neither scikit-learn nor the store/cluster stack
    assert out[0] == "['torch']", out
    assert out[1] == "True"  # TorchEstimator subclasses sklearn's BaseEstimator


def test_every_public_name_resolves():
    for name in dvl_ooc.__all__:
        assert getattr(dvl_ooc, name) is not None, name
    assert set(dvl_ooc.__all__) <= set(dir(dvl_ooc))
    from dvl_ooc import valuation

    for name in valuation.__all__:
        assert getattr(valuation, name) is not None, name
    assert set(valuation.__all__) <= set(dir(valuation))
    from dvl_ooc.valuation.utility import TorchEstimator

    assert TorchEstimator is valuation.TorchEstimator
