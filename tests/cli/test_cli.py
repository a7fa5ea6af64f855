"""The ``dvl-ooc`` command line: info/query on hand-written stores, errors, and the demo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from store_helpers import write_store

from dvl_ooc.cli import main


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "dvl-ooc"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("dvl-ooc")
    return [found] if found else [sys.executable, "-m", "dvl_ooc.cli"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(1)
    v = rng.standard_normal((9, 14)).astype(np.float32)
    tl = np.arange(9) % 3
    rl = np.arange(14) % 3
    si = rng.random(14).astype(np.float32)
    p = write_store(tmp_path_factory.mktemp("cli") / "s.zarr", v, (4, 5), test_label=tl,
                    train_label=rl, self_influence=si)
    return p, v, tl, rl, si


def test_info(store, capsys):
    p = store[0]
    assert main(["info", str(p)]) == 0
    out = capsys.readouterr().out
    assert "9 x 14" in out and "4 x 5" in out and "100.0%" in out and "Test" in out
    assert main(["info", str(p), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [9, 14] and info["tiles_done"] == info["tiles_total"] == 9


def test_query_quantile_table_and_json(store, capsys):
    p, v, tl, rl, _ = store
    assert main(["query", str(p), "quantile", "--q", "0.25", "--q", "0.5", "--same-label",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 14
    ref = {r: np.quantile(v[tl == rl[r], r], [0.25, 0.5]) for r in range(14)}
    lows = [ref[r][0] for r in range(14)]
    assert [row["train"] for row in rows] == list(np.argsort(lows, kind="stable"))
    for row in rows:
        np.testing.assert_allclose([row["q0.25"], row["q0.5"]], ref[row["train"]], rtol=1e-6)
        assert row["label"] == rl[row["train"]]
    assert main(["query", str(p), "quantile", "--limit", "3", "--save", "q"]) == 0
    out = capsys.readouterr().out
    assert "q0.25" in out and "11 more rows" in out and "saved as" in out
    assert main(["info", str(p)]) == 0
    assert "['q']" in capsys.readouterr().out


def test_query_topk_mean_self(store, capsys):
    p, v, _, _, si = store
    assert main(["query", str(p), "topk", "--k", "2", "--test", "3", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["test"] == 3
    assert row["helpful train"] == list(np.argsort(-v[3])[:2])
    assert row["harmful train"] == list(np.argsort(v[3])[:2])
    assert main(["query", str(p), "topk", "--k", "2"]) == 0
    assert "helpful train" in capsys.readouterr().out
    assert main(["query", str(p), "mean", "--sum", "--json", "--limit", "1"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    s = v.astype(np.float64).sum(0)
    assert row["train"] == int(np.argmin(s))
    np.testing.assert_allclose(row["sum"], s.min(), rtol=1e-12)
    assert main(["query", str(p), "self", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["train"] for r in rows] == list(np.argsort(-si, kind="stable"))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*_cli(), *args], capture_output=True, text=True, timeout=300)


def test_errors_are_one_line(store, tmp_path, capsys):
    p = store[0]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.txt").write_text("x")
    inc = write_store(tmp_path / "inc.zarr", np.ones((4, 4), np.float32), (2, 2),
                      skip_tiles={(0, 1)})
    cases = [
        (("info", str(tmp_path / "missing.zarr")), 1, "no dvl_ooc influence store"),
        (("query", str(tmp_path / "foreign"), "mean"), 1, "no dvl_ooc influence store"),
        (("query", str(p), "quantile", "--q", "1.5"), 1, "[0, 1]"),
        (("query", str(p), "quantile", "--method", "bogus"), 1, "unknown quantile method"),
        (("query", str(p), "topk", "--k", "0"), 2, "--k"),
        (("query", str(p), "topk", "--test", "99"), 2, "out of range"),
        (("query", str(p), "median"), 2, "invalid choice"),
        (("query", str(p), "quantile", "--q", "abc"), 2, "invalid float"),
        (("query", str(inc), "mean"), 1, "allow_incomplete"),
        (("query", str(inc), "self", "--allow-incomplete"), 1, "no self-influence"),
        (("bogus",), 2, "invalid choice"),
        ((), 2, "required"),
    ]
    for args, rc, msg in cases:
        assert main(list(args)) == rc, args
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], (args, cap.err)
        assert lines[0].startswith("dvl-ooc") and "error:" in lines[0] and cap.out == ""
    assert main(["query", str(inc), "mean", "--allow-incomplete", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    # the installed console script: same one line, no traceback
    r = _run("info", str(tmp_path / "missing.zarr"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        line for line in r.stderr.strip().splitlines() if "no dvl_ooc influence store" in line]


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    r = _run("demo", "--quick", "--out", str(out), "--seed", "0", "--workers", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test accuracy" in r.stdout and "flipped labels found" in r.stdout
    rep = json.loads((out / "report.json").read_text())
    assert (out / "report.txt").read_text().strip() in r.stdout.strip()
    for f in rep["pictures"]:
        assert (out / f).stat().st_size > 1000
    # the flipped labels are concentrated among the low scores (random: 20 % at 20 %)
    det = rep["detection"]["same-label 25th percentile (lowest first)"]
    assert det["20%"]["recall"] >= 0.5, det
    assert det["10%"]["found"] <= det["15%"]["found"] <= det["20%"]["found"] <= rep["n_flipped"]
    assert 0.5 < rep["accuracy"]["before"] <= 1 and 0.5 < rep["accuracy"]["after_cleaning"] <= 1
    # the store is complete, labelled and queryable by the CLI
    r = _run("info", str(out / "influences.zarr"), "--json")
    info = json.loads(r.stdout)
    assert info["complete_percent"] == 100.0
    assert info["shape"] == [rep["n_test"], rep["n_train"]]
    assert "q25_same_label" in info["saved_queries"]


def test_a_new_query_and_command_are_one_registration_each(store, capsys):
    """Extension points: ``register_query`` makes ``dvl-ooc query STORE <name>`` (with its
    options, the common ones and its table), ``command`` makes ``dvl-ooc <name>``."""
    from dvl_ooc import cli
    from dvl_ooc.exceptions import InputError
    from dvl_ooc.query import QUERIES, open_store, option, register_query

    p, v = store[0], store[1]

    def count_rows(res, args):
        return ["train", "above"], [[r, int(n)] for r, n in enumerate(res)], "counts:"

    @register_query("count-above", help="per training point, test points above a threshold",
                    options=[option("--t", type=float, default=0.0, help="threshold")],
                    keywords=lambda a: {"threshold": a.t}, table=count_rows)
    def query_count_above(store, *, threshold=0.0, allow_incomplete=False, save=None):
        return (open_store(store).influences[:] > threshold).sum(0)

    @cli.command("hello", help="say hello",
                 arguments=[option("name"), option("--shout", action="store_true")])
    def hello(args):
        print(f"hello {args.name}{'!' if args.shout else ''}")

    try:
        assert main(["query", str(p), "count-above", "--t", "0.5", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [r["above"] for r in rows] == list((v > 0.5).sum(0))
        assert main(["query", str(p), "count-above", "--limit", "2"]) == 0
        assert "counts:" in capsys.readouterr().out
        assert main(["query", str(p), "--help"]) == 0
        assert "count-above" in capsys.readouterr().out
        assert main(["hello", "you", "--shout"]) == 0
        assert capsys.readouterr().out == "hello you!\n"
        with pytest.raises(InputError, match="already registered"):
            register_query("topk", help="again", table=count_rows)(query_count_above)
        with pytest.raises(InputError, match="already registered"):
            cli.command("info", help="again")(hello)
    finally:
        QUERIES.pop("count-above", None)
        cli.COMMANDS.pop("hello", None)
    assert main(["hello"]) == 2
    capsys.readouterr()


def test_info_prints_the_models_curvature_diagnostics(tmp_path, capsys):
    import torch
    import torch.nn.functional as F

    from dvl_ooc import DirectInfluence, Relative, SequentialInfluenceCalculator
    from dvl_ooc.store import InfluenceStore

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x, y = torch.randn(30, 4), torch.randint(0, 2, (30,))
    m = DirectInfluence(net, F.cross_entropy, regularization=Relative(1e-2), blocks="layer")
    m.fit((x, y))
    path = tmp_path / "s.zarr"
    SequentialInfluenceCalculator(m).to_zarr(path, x[:6], y[:6], x, y, progress=False)
    d = InfluenceStore.open(path).attrs["diagnostics"]
    want = m.diagnostics(estimate=False)
    assert [b["block"] for b in d["blocks"]] == [b["block"] for b in want["blocks"]]
    for got, ref in zip(d["blocks"], want["blocks"]):
        assert got["top_eigenvalue"] == pytest.approx(ref["top_eigenvalue"])
        assert got["regularization"] == pytest.approx(1e-2 * ref["top_eigenvalue"])
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "curvature (DirectInfluence" in out
    for b in want["blocks"]:
        assert f"{b['top_eigenvalue']:.4g}"[:4] in out
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["curvature"]["blocks"][0]["top_kind"] == "exact"
