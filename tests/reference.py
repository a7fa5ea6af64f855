"""Independent float64 references: plain autograd loops, no torch.func, no dvl_ooc code."""

from __future__ import annotations

import torch
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in trainable(model)])


def _unflat(model, theta):
    out, o = {}, 0
    for n, p in trainable(model):
        out[n] = theta[o : o + p.numel()].reshape(p.shape)
        o += p.numel()
    return out


def mean_loss_fn(model, loss, x, y):
    def f(theta):
        return loss(functional_call(model, _unflat(model, theta), (x,)), y)

    return f


def ref_hessian(model, loss, x, y) -> torch.Tensor:
    """Exact Hessian of the mean loss over (x, y) w.r.t. all trainable parameters."""
    return hessian(mean_loss_fn(model, loss, x, y), flat_params(model))


def ref_gauss_newton(model, loss, x, y) -> torch.Tensor:
    """(1/n) sum_i J_i^T d2l/do2 J_i, one sample at a time."""
    theta = flat_params(model)
    H = torch.zeros(len(theta), len(theta), dtype=torch.float64)
    for i in range(len(x)):
        out_fn = lambda t: functional_call(model, _unflat(model, t), (x[i : i + 1],))[0]  # noqa
        J = jacobian(out_fn, theta).reshape(-1, len(theta))
        o = out_fn(theta).detach()
        yi = y[i : i + 1]
        Ho = hessian(lambda o_, yi=yi, shape=o.shape: loss(o_.reshape(1, *shape), yi), o)
        Ho = Ho.reshape(J.shape[0], J.shape[0])
        H += J.T @ Ho @ J
    return H / len(x)


def ref_grads(model, loss, x, y) -> torch.Tensor:
    """Per-sample gradients by a Python loop of autograd.grad calls."""
    params = [p for _, p in trainable(model)]
    rows = []
    for i in range(len(x)):
        li = loss(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, params)]))
    return torch.stack(rows)


def ref_influences(H, lam, g_test, g_train) -> torch.Tensor:
    """g_test (H + lam I)^{-1} g_train^T with a float64 dense solve."""
    A = H + lam * torch.eye(len(H), dtype=H.dtype)
    return torch.linalg.solve(A, g_test.T).T @ g_train.T


def block_diagonal(H: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    out = torch.zeros_like(H)
    o = 0
    for s in sizes:
        out[o : o + s, o : o + s] = H[o : o + s, o : o + s]
        o += s
    return out
