"""The in-memory paths stream the training side in bounded batches, and ``fit`` shows a
progress bar on request.

* ``influences`` / ``self_influence`` / ``influence_factors`` / ``influences_from_factors``
  never compute more than one batch of gradients at a time (instrumented ``gradients``); the
  batch follows the memory budget; the values equal an unbatched float64 reference;
* a test set whose features exceed the budget is processed in groups (same values);
* EK-FAC's streamed representation (eigenbasis for some layers, original basis for others)
  equals the dense preconditioning of reference gradients; its hook-based gradients equal the
  functional per-sample gradients;
* in a subprocess, EK-FAC on a layer whose training-gradient matrix needs 1.2 GB completes
  ``influences`` under a 256 MiB budget with a peak RSS far below that;
* ``fit(progress=True)`` prints a bar on stderr for every method, results unchanged.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from reference import ref_grads
from torch import nn

from dvl_ooc import (
    ArnoldiInfluence,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    TracInCP,
)
from dvl_ooc.exceptions import InputError, LengthMismatchError

F64 = torch.float64


def sq_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - target) ** 2).sum(-1).mean()


class Tiny:
    """A 6-8-3 tanh MLP (83 parameters, float64) with 60 train and 9 test points."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(69, 6, generator=g, dtype=F64)
        y = torch.randn(69, 3, generator=g, dtype=F64)
        torch.manual_seed(1)
        self.model = nn.Sequential(OrderedDict(
            fc1=nn.Linear(6, 8), act=nn.Tanh(), fc2=nn.Linear(8, 3))).double().eval()
        self.x, self.y = x[:60].clone(), y[:60].clone()
        self.xt, self.yt = x[60:].clone(), y[60:].clone()
        self.ckpt = copy.deepcopy(self.model.state_dict())
        self.g_train = ref_grads(self.model, sq_loss, self.x, self.y)
        self.g_test = ref_grads(self.model, sq_loss, self.xt, self.yt)


@pytest.fixture(scope="module")
def tiny():
    return Tiny()


def _make(name: str, P: Tiny):
    lam = 0.05
    return {
        "direct": lambda: DirectInfluence(P.model, sq_loss, regularization=lam),
        "cg": lambda: CgInfluence(P.model, sq_loss, regularization=lam, rtol=1e-12),
        "lissa": lambda: LissaInfluence(P.model, sq_loss, regularization=lam, max_iter=30,
                                        rtol=None),
        "arnoldi": lambda: ArnoldiInfluence(P.model, sq_loss, regularization=lam, rank=6),
        "nystroem": lambda: NystroemSketchInfluence(P.model, sq_loss, regularization=lam,
                                                    rank=6),
        "ekfac": lambda: EkfacInfluence(P.model, sq_loss, regularization=lam),
        "ekfac-rank": lambda: EkfacInfluence(P.model, sq_loss, regularization=lam, rank=1),
        "tracin": lambda: TracInCP(P.model, sq_loss, [P.ckpt], 0.5),
        "projected": lambda: DirectInfluence(P.model, sq_loss, regularization=lam,
                                             projection=dict(k_in=3, k_out=2, dense_dim=4)),
    }[name]()


NAMES = ["direct", "cg", "lissa", "arnoldi", "nystroem", "ekfac", "ekfac-rank", "tracin",
         "projected"]


def _fitted(name: str, P: Tiny):
    m = _make(name, P)
    return m if name == "tracin" else m.fit((P.x, P.y))


def _train_sizes(sizes, P):
    """Rows of the recorded passes over the training data (slices of ``P.x``)."""
    ptr = P.x.untyped_storage().data_ptr()
    return [n for n, p in sizes if p == ptr]


def _record(m):
    """Record the number of rows of every gradient pass (``gradients``, and EK-FAC's
    ``_layer_rows``; instrumentation of the real methods: the instance's class is swapped for
    a subclass that logs and calls them)."""
    sizes: list[int] = []
    base = type(m)

    class Recording(base):  # type: ignore[misc, valid-type]
        def gradients(self, x, y):
            sizes.append((len(x), x.untyped_storage().data_ptr()))
            return base.gradients(self, x, y)

        def _layer_rows(self, x, y):  # EK-FAC's own gradient pass (its streamed features)
            sizes.append((len(x), x.untyped_storage().data_ptr()))
            return base._layer_rows(self, x, y)

    m.__class__ = Recording
    return sizes


# ---------------------------------------------------------------------- bounded batches
@pytest.mark.parametrize("name", NAMES)
def test_training_side_streams_in_budgeted_batches(tiny, name):
    """Under a budget of a few rows, no ``gradients`` call sees more rows than the planned
    batch (today's unbatched path computed all 60 training gradients at once); the values
    do not depend on the batching."""
    P = tiny
    m = _fitted(name, P)
    ref = m.influences(P.xt, P.yt, P.x, P.y, batch_size=60)
    ref_self = m.self_influence(P.x, P.y, batch_size=60)
    sizes = _record(m)
    w_train = m._stream_dims(P.xt, P.yt, 9, 60)[1]  # floats a training row holds
    row = 8 * (w_train + 9)  # with its column of the tile (see _stream_rows)
    if name in ("cg", "lissa"):  # their solves check the budget too: bound the batch alone
        m.stream_batch_bytes = 7 * row + 8
    else:
        m.memory_budget = 4 * 7 * row + 8  # target = a quarter: 7 rows of (p + k + n_test)
    got = m.influences(P.xt, P.yt, P.x, P.y)
    plan = m.info["stream"]
    assert plan["call"] == "influences" and plan["test_groups"] == 1
    assert 1 <= plan["batch_size"] <= 7 and plan["train_batches"] == -(-60 // plan["batch_size"])
    train = _train_sizes(sizes, P)
    assert max(train) <= 7 and sum(train) >= 60
    assert max(n for n, _ in sizes) <= 9  # the test side is batched too
    tol = 1e-9 if name == "cg" else 1e-12
    assert rel_err(got, ref) <= tol
    sizes.clear()
    si = m.self_influence(P.x, P.y)
    assert max(_train_sizes(sizes, P)) <= m.info["stream"]["batch_size"] <= 7
    assert rel_err(si, ref_self) <= tol
    sizes.clear()
    assert rel_err(m.self_influence(P.x, P.y, batch_size=5), ref_self) <= tol
    assert max(_train_sizes(sizes, P)) == 5


def test_values_equal_the_float64_reference(tiny):
    """Direct (exact): streamed influences, self-influences and factors equal the dense
    float64 formula on independently computed gradients, for several batch sizes."""
    from reference import ref_gauss_newton, ref_influences

    P = tiny
    m = _fitted("direct", P)
    H = ref_gauss_newton(P.model, sq_loss, P.x, P.y)
    want = ref_influences(H, 0.05, P.g_test, P.g_train)
    want_self = torch.diagonal(ref_influences(H, 0.05, P.g_train, P.g_train))
    for b in (None, 1, 7, 60, 1000):
        assert rel_err(m.influences(P.xt, P.yt, P.x, P.y, batch_size=b), want) < 1e-10
        assert rel_err(m.self_influence(P.x, P.y, batch_size=b), want_self) < 1e-10
        f = m.influence_factors(P.xt, P.yt, batch_size=b)
        assert rel_err(m.influences_from_factors(f, P.x, P.y, batch_size=b), want) < 1e-10


@pytest.mark.parametrize("name", ["direct", "ekfac", "cg"])
def test_large_test_sets_are_processed_in_groups(tiny, name):
    """Test features above the bound are held a group at a time (each group one pass over
    the training data); the matrix is the same."""
    P = tiny
    m = _fitted(name, P)
    ref = m.influences(P.xt, P.yt, P.x, P.y)
    assert m.info["stream"]["test_groups"] == 1
    sizes = _record(m)
    k_test = m._stream_dims(P.xt, P.yt, 9, 60)[0]  # width of the held test rows
    # CG also holds the group's gradients (p) to solve them together
    m.stream_test_bytes = 4 * 8 * (k_test + (m.grads.num_params if name == "cg" else 0))
    got = m.influences(P.xt, P.yt, P.x, P.y, batch_size=25)
    plan = m.info["stream"]
    assert plan["test_group_rows"] == 4 and plan["test_groups"] == 3
    assert plan["train_batches"] == 3 * 3 and sum(_train_sizes(sizes, P)) == 3 * 60
    assert rel_err(got, ref) <= (1e-9 if name == "cg" else 1e-12)


def test_bad_batch_arguments_are_refused_before_any_gradient(tiny):
    P = tiny
    m = _fitted("direct", P)
    sizes = _record(m)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="batch_size"):
            m.influences(P.xt, P.yt, P.x, P.y, batch_size=bad)
    with pytest.raises(LengthMismatchError, match="59"):
        m.influences(P.xt, P.yt, P.x, P.y[:59])
    with pytest.raises(LengthMismatchError):
        m.self_influence(P.x[:3], P.y)
    with pytest.raises(InputError, match="no samples"):
        m.influences(P.xt[:0], P.yt[:0], P.x, P.y)
    with pytest.raises(InputError, match="factors"):
        m.influences_from_factors(torch.zeros(3, 5, dtype=F64), P.x, P.y)
    assert sizes == []  # refused before any gradient pass


# ---------------------------------------------------------------------- EK-FAC
def _small_cnn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(2, 16, 3, stride=2), act1=nn.ReLU(),  # 8x8 -> 3x3
        conv2=nn.Conv2d(16, 4, 3, padding=1), act2=nn.ReLU(),
        flat=nn.Flatten(), fc=nn.Linear(4 * 3 * 3, 3))).double().eval()


def test_ekfac_streamed_forms_equal_the_dense_preconditioning():
    """The three per-layer forms of the streamed rows (original basis, eigenbasis, exact
    low-rank test factors) equal ``precondition(g_t) . g_r`` on reference gradients, and
    self-influences its diagonal."""
    model = _small_cnn()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 2, 8, 8, generator=g, dtype=F64)
    y = torch.randint(0, 3, (50,), generator=g)
    ek = EkfacInfluence(model, F.cross_entropy, regularization=1e-2).fit((x, y))
    gr = ref_grads(model, F.cross_entropy, x, y)
    # the reference layout: parameters in model order = EK-FAC's blocks (weight, bias)
    want = ek.precondition(gr[:40:2]) @ gr.T
    got = ek.influences(x[:40:2], y[:40:2], x, y, batch_size=8)
    plan = ek._stream_plan
    # conv1 (9 pixels, 16 x 19): the eigenbasis is cheaper for 20 test x 50 train rows;
    # conv2 (4 x 145): the original basis; fc (L = 1): rank-1 test factors (40 < 111 floats)
    assert [mode for mode, _, _ in plan] == ["eig", "orig", "low"], plan
    assert ek.info["stream"]["test_groups"] == 1
    assert rel_err(got, want) < 1e-12
    want_self = (ek.precondition(gr) * gr).sum(1)
    assert rel_err(ek.self_influence(x, y, batch_size=9), want_self) < 1e-12
    assert rel_err(ek.gradients(x, y), gr) < 1e-13
    assert rel_err(ek.gradients(x, y), ek.grads.per_sample_grads(x, y)) < 1e-14


def test_ekfac_gradients_with_partial_layers_match_functional_grads():
    """Frozen biases and bias-only / weight-only selections keep the flat layout."""
    model = _small_cnn()
    model.conv2.bias.requires_grad_(False)
    x = torch.randn(7, 2, 8, 8, dtype=F64)
    y = torch.randint(0, 3, (7,))
    for layers in (None, ["fc.bias", "conv1"], ["fc.weight", "conv2"]):
        ek = EkfacInfluence(model, F.cross_entropy, layers=layers)
        assert rel_err(ek.gradients(x, y), ek.grads.per_sample_grads(x, y)) < 1e-13


_SUBPROCESS = textwrap.dedent("""
    import resource, sys, torch, torch.nn.functional as F
    from torch import nn
    from dvl_ooc import EkfacInfluence
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Linear(1024, 512).eval()        # p = 524,800: 2.1 MB per gradient row
    x, y = torch.randn(600, 1024), torch.randint(0, 512, (600,))
    ek = EkfacInfluence(model, F.cross_entropy, regularization=1e-3, fisher="sampled",
                        micro_batch_size=16).fit((x[:64], y[:64]))  # ggn: 512 backward passes
    ek.memory_budget = 256 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    I = ek.influences(x[:4], y[:4], x, y)     # all 600 gradients at once: 1.26 GB
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    plan = ek.info["stream"]
    assert I.shape == (4, 600) and bool(torch.isfinite(I).all())
    print(before // 1024, after // 1024, plan["batch_size"], plan["train_batches"])
""")


def test_ekfac_influences_fit_a_budget_below_the_gradient_matrix():
    """The 600 x 524,800 float32 training-gradient matrix (1.26 GB) is never formed: with a
    256 MiB budget the peak RSS grows by far less than that during ``influences``."""
    out = subprocess.run([sys.executable, "-c", _SUBPROCESS], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    before, after, batch, batches = (int(v) for v in out.stdout.split())
    assert batch <= 64 and batches == -(-600 // batch)
    assert after - before < 450, (before, after)  # MiB; unbatched: > 1,200


# ---------------------------------------------------------------------- progress bars
@pytest.mark.parametrize("name", NAMES)
def test_fit_progress_bar_prints_and_changes_nothing(tiny, name, capsys):
    P = tiny
    quiet = _fitted(name, P)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""  # off by default
    m = _make(name, P)
    m.fit((P.x, P.y), progress=True)
    err = capsys.readouterr().err
    if name == "tracin":  # no data pass: nothing to show
        assert "sample" not in err
    else:
        assert f"{type(m).__name__}.fit" in err and "sample" in err
        if name in ("direct", "ekfac", "ekfac-rank", "projected"):  # known number of passes
            passes = 2 if name.startswith("ekfac") else 1
            assert f"{passes * 60}/{passes * 60}" in err
    assert torch.equal(m.influences(P.xt, P.yt, P.x, P.y),
                       quiet.influences(P.xt, P.yt, P.x, P.y))
    assert m.fingerprint() == quiet.fingerprint()
    assert getattr(m.grads, "_bar", None) is None  # nothing left attached


def test_ensemble_fit_progress_shows_every_member(tiny, capsys):
    from dvl_ooc.influence import Ensemble

    P = tiny
    quiet = Ensemble([_make("direct", P), _make("ekfac", P)]).fit((P.x, P.y))
    assert capsys.readouterr().err == ""
    ens = Ensemble([_make("direct", P), _make("ekfac", P)]).fit((P.x, P.y), progress=True)
    err = capsys.readouterr().err
    assert "DirectInfluence.fit" in err and "EkfacInfluence.fit" in err and "120/120" in err
    assert torch.equal(ens.influences(P.xt, P.yt, P.x, P.y),
                       quiet.influences(P.xt, P.yt, P.x, P.y))
