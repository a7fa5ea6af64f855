"""``dvl-ooc info`` / ``dvl-ooc query`` on a store on a real S3 server (moto) with
``--storage-options JSON`` (given before or after the query name); bad JSON is a usage error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dvl_ooc.cli import main
from dvl_ooc.query import query_topk
from dvl_ooc.store import InfluenceStore

sys.path.insert(0, str(Path(__file__).parents[1] / "store"))
from s3_server import s3_server  # noqa: E402


@pytest.fixture(scope="module")
def s3_store():
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with s3_server() as srv:
        url, so = srv.url("cli.zarr"), srv.storage_options
        st = InfluenceStore.create(url, storage_options=so, n_test=4, n_train=6, test_chunk=2,
                                   train_chunk=3, method="M", config={}, fingerprint="f",
                                   test_labels=[0, 1, 0, 1], train_labels=[0, 1, 1, 0, 0, 1])
        st.influences[:, :] = np.arange(24, dtype=np.float32).reshape(4, 6) % 7 - 3
        yield url, so


def test_info_and_query_with_storage_options(s3_store, capsys):
    url, so = s3_store
    opts = json.dumps(so)
    assert main(["info", url, "--json", "--storage-options", opts]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == url and info["tiles_done"] == info["tiles_total"] == 4
    ref = query_topk(url, 2, storage_options=so)
    for argv in (["query", url, "--storage-options", opts, "topk", "--k", "2", "--json"],
                 ["query", url, "topk", "--k", "2", "--json", "--storage-options", opts]):
        assert main(argv) == 0
        rows = json.loads(capsys.readouterr().out)
        assert len(rows) == 4
        got = np.array([r["helpful influence"] for r in rows])
        np.testing.assert_array_equal(got, ref["helpful_influence"].values)


def test_bad_storage_options_are_usage_errors(s3_store, capsys):
    url, _ = s3_store
    assert main(["info", url, "--storage-options", "{not json"]) == 2
    assert "not JSON" in capsys.readouterr().err
    assert main(["query", url, "--storage-options", "[1, 2]", "self"]) == 2
    assert "JSON object" in capsys.readouterr().err
