"""SparseGPT's sweep op against a direct float64 transcription of the paper's
algorithm, and against the exact constrained least-squares solution on tiny layers."""
import pytest
import torch

from fastprune import _ops
from fastprune.second_order.sparsegpt import LayerHessian, sparsegpt_prune


def reference_sweep(w, u, block, sparsity, prune_n=0, prune_m=0, fixed=None):
    """Algorithm 1 of the SparseGPT paper, one column at a time (float64, no vectorisation
    across columns): the mask of each block from w^2 / U_jj^2 (exact count, ties in
    flat order; N:M per group when the sweep reaches it), then per column the OBS error
    and the update of the later columns of the block, then the lazy update. ``fixed``
    weights are pruned first in their block (more than k if there are more of them)."""
    w = w.clone()
    rows, cols = w.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    loss = torch.zeros(rows, dtype=w.dtype)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        count = i2 - i1
        err = torch.zeros(rows, count, dtype=w.dtype)
        if prune_m == 0:
            k = round(sparsity * rows * count)  # half to even, as the op
            score = (w[:, i1:i2] ** 2 / u.diagonal()[i1:i2] ** 2).flatten()
            forced = torch.zeros(len(score), dtype=torch.bool) if fixed is None else fixed[:, i1:i2].flatten()
            k = max(k, int(forced.sum()))
            order = sorted(range(len(score)), key=lambda i: (not bool(forced[i]), float(score[i]), i))
            flat = torch.zeros(len(score), dtype=torch.bool)
            flat[order[:k]] = True
            pruned[:, i1:i2] = flat.view(rows, count)
        for j in range(i1, i2):
            if prune_m and (j - i1) % prune_m == 0:
                for r in range(rows):
                    score = [float(w[r, c] ** 2 / u[c, c] ** 2) for c in range(j, j + prune_m)]
                    for c in sorted(range(prune_m), key=lambda c: (score[c], c))[:prune_n]:
                        pruned[r, j + c] = True
            for r in range(rows):
                q = 0.0 if pruned[r, j] else float(w[r, j])
                e = (float(w[r, j]) - q) / float(u[j, j])
                loss[r] += e * e
                for c in range(j + 1, i2):
                    w[r, c] -= e * u[j, c]
                w[r, j] = q
                err[r, j - i1] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w, ~pruned, loss


def hessian_factor(cols, n=200, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=gen, dtype=dtype) @ torch.randn(cols, cols, generator=gen, dtype=dtype)
    h = 2 / n * x.T @ x + 0.01 * torch.eye(cols, dtype=dtype)
    return h, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@pytest.mark.parametrize("rows,cols,block", [(7, 20, 8), (5, 33, 16), (3, 12, 12), (4, 9, 128)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_sweep_matches_the_transcription(rows, cols, block, sparsity):
    _, u = hessian_factor(cols)
    w = torch.randn(rows, cols, dtype=torch.float64)
    got = _ops.sparsegpt_sweep(w, u, block, sparsity)
    want = reference_sweep(w, u, block, sparsity)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("share", [0.1, 0.4, 0.7])
def test_fixed_weights_are_pruned_first(share):
    # An earlier step's mask: those weights stay pruned, and the OBS updates move the rest.
    _, u = hessian_factor(21)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(6, 21, dtype=torch.float64, generator=gen)
    fixed = torch.rand(6, 21, generator=gen) < share
    w[fixed] = 0
    got = _ops.sparsegpt_sweep(w, u, 8, 0.5, fixed=fixed)
    want = reference_sweep(w, u, 8, 0.5, fixed=fixed)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    assert torch.equal(got[1], want[1]) and not bool((got[1] & fixed).any())
    _, u24 = hessian_factor(24)
    with pytest.raises(RuntimeError, match="unstructured"):
        _ops.sparsegpt_sweep(torch.randn(6, 24, dtype=torch.float64), u24, 8, 0.0, 2, 4,
                             fixed=torch.zeros(6, 24, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="shaped and placed"):
        _ops.sparsegpt_sweep(w, u, 8, 0.5, fixed=torch.zeros(6, 20, dtype=torch.bool))


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("block", [8, 16])
def test_n_m_sweep_matches_the_transcription(pattern, block):
    prune_n, prune_m = pattern
    _, u = hessian_factor(32)
    w = torch.randn(6, 32, dtype=torch.float64)
    got = _ops.sparsegpt_sweep(w, u, block, 0.0, prune_n, prune_m)
    want = reference_sweep(w, u, block, 0.0, prune_n, prune_m)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    assert torch.equal(got[1], want[1])
    assert bool((got[1].view(6, -1, prune_m).sum(2) == prune_m - prune_n).all())


def test_float32_and_non_contiguous_inputs():
    _, u = hessian_factor(24)
    w = torch.randn(24, 10, dtype=torch.float64).T  # (10, 24), not contiguous
    got = _ops.sparsegpt_sweep(w.float(), u.float(), 8, 0.5)
    want = reference_sweep(w, u, 8, 0.5)
    assert got[0].dtype == torch.float32
    agree = (got[1] == want[1]).float().mean()
    assert agree > 0.97  # float32 rounding may swap near-tied scores
    torch.testing.assert_close(got[0][got[1] & want[1]].double(), want[0][got[1] & want[1]], rtol=1e-3, atol=1e-4)


def test_prefix_mask_is_the_exact_constrained_least_squares_solution():
    # Pruning a row's first columns one after another, each update exact for the columns
    # not yet processed, is the exact minimiser of (w' - w)^T H (w' - w) with w'_Q = 0.
    rows, cols, q = 3, 10, 4
    h, u = hessian_factor(cols)
    w = torch.randn(rows, cols, dtype=torch.float64)
    w[:, :q] *= 1e-4  # the lowest saliencies: the mask is the first q columns of every row
    new, keep, _ = _ops.sparsegpt_sweep(w, u, cols, q / cols)
    assert torch.equal(keep, (torch.arange(cols) >= q).expand(rows, -1))
    rest = slice(q, cols)
    exact = w.clone()
    exact[:, :q] = 0
    exact[:, rest] = w[:, rest] + torch.linalg.solve(h[rest, rest], h[rest, :q] @ w[:, :q].T).T
    torch.testing.assert_close(new, exact, rtol=1e-9, atol=1e-12)


def test_sparsegpt_prune_handles_dead_columns_and_reports():
    cols = 16
    x = torch.randn(300, cols, dtype=torch.float64)
    x[:, [3, 7]] = 0  # inputs that never fire
    acc = LayerHessian(cols, dtype=torch.float64)
    for part in x.split(64):
        acc.add(part)
    torch.testing.assert_close(acc.hessian, 2 / 300 * x.T @ x)
    w = torch.randn(5, cols, dtype=torch.float64)
    new, keep, info = sparsegpt_prune(w, acc.hessian, 0.5, block_size=8)
    assert info["dead"] == 2 and not bool(keep[:, [3, 7]].any()) and bool((new[~keep] == 0).all())
    assert abs(float((~keep).float().mean()) - 0.5) <= 2 / 80 + 1e-9
    # The sweep lowers the reconstruction error against plain masking.
    err = lambda v: float(((v - w) @ x.T).square().sum())  # noqa: E731
    assert err(new) < err(w * keep)
    new24, keep24, _ = sparsegpt_prune(w, acc.hessian, pattern="2:4")
    assert bool((keep24.view(5, -1, 4).sum(2) <= 2).all())


def test_indefinite_hessians_get_more_damping_and_a_warning():
    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -0.05], dtype=torch.float64))  # 1 % damping is not enough
    with pytest.warns(UserWarning, match="needed percdamp=0.1"):
        _, _, info = sparsegpt_prune(torch.randn(2, 6, dtype=torch.float64), h, 0.5, percdamp=0.01)
    assert info["percdamp"] == pytest.approx(0.1)
    from fastprune.errors import NonFiniteError
    with pytest.raises(NonFiniteError):
        sparsegpt_prune(torch.randn(2, 4, dtype=torch.float64), torch.full((4, 4), float("nan"), dtype=torch.float64))


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=0), "block_size"), (dict(sparsity=1.0), "sparsity"),
    (dict(prune_n=2, prune_m=3), "multiples of prune_m"), (dict(prune_n=4, prune_m=4), "0 < prune_n < prune_m"),
])
def test_sweep_op_errors(kwargs, match):
    _, u = hessian_factor(8)
    args = dict(block_size=4, sparsity=0.5, prune_n=0, prune_m=0) | kwargs
    with pytest.raises(RuntimeError, match=match):
        _ops.sparsegpt_sweep(torch.randn(3, 8, dtype=torch.float64), u, **args)


def test_sweep_opcheck():
    _, u = hessian_factor(8)
    torch.library.opcheck(torch.ops.fastprune.sparsegpt_sweep.default, (torch.randn(3, 8, dtype=torch.float64), u, 4,
                                                                           0.5, 0, 0), test_utils=("test_schema",
                                                                                                   "test_faketensor"))


def test_wanda_prunes_each_row_by_weight_times_input_norm():
    from fastprune.second_order.sparsegpt import wanda_prune
    x = torch.randn(64, 12, dtype=torch.float64) * torch.linspace(0.1, 3, 12, dtype=torch.float64)
    acc = LayerHessian(12, dtype=torch.float64)
    acc.add(x)
    w = torch.randn(5, 12, dtype=torch.float64)
    new, keep = wanda_prune(w, acc.hessian, 0.5)
    norms = x.norm(dim=0)
    for r in range(5):  # the transcription: the 6 lowest |w| * ||x|| of each row go
        score = [float(w[r, j].abs() * norms[j]) for j in range(12)]
        gone = sorted(range(12), key=lambda j: (score[j], j))[:6]
        assert set(torch.nonzero(~keep[r]).flatten().tolist()) == set(gone)
    assert torch.equal(new, w * keep)
    _, keep24 = wanda_prune(w, acc.hessian, pattern="2:4")
    assert bool((keep24.view(5, 3, 4).sum(2) == 2).all())
    scores = (w.abs() * norms).view(5, 3, 4)
    kept = scores.masked_fill(~keep24.view(5, 3, 4), float("inf")).amin(2)
    dropped = scores.masked_fill(keep24.view(5, 3, 4), float("-inf")).amax(2)
    assert bool((kept >= dropped).all())
    with pytest.raises(ValueError, match="multiple of 8"):
        wanda_prune(w, acc.hessian, pattern="4:8")


@pytest.mark.parametrize("cols", [7, 383, 384, 577, 1000])
def test_layer_hessian_panels_equal_one_product(cols):
    from fastprune.second_order.sparsegpt import LayerHessian
    gen = torch.Generator().manual_seed(cols)
    parts = [torch.randn(n, cols, generator=gen, dtype=torch.float64) for n in (50, 3, 90)]
    acc = LayerHessian(cols, dtype=torch.float64)
    for x in parts:
        acc.add(x)
    x = torch.cat(parts)
    torch.testing.assert_close(acc.hessian, 2 / len(x) * x.T @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sparsity", [0.3, 0.6])
def test_refit_reaches_the_least_squares_weights_of_the_mask(sparsity):
    from fastprune.second_order.sparsegpt import factor_hessian, reconstruction_error, refit
    h, _ = hessian_factor(19, n=60, seed=4)
    w = torch.randn(9, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    new, keep, info = sparsegpt_prune(w, h, sparsity, block_size=8, refit_iters=200)
    damped = factor_hessian(h, 0.01).hessian
    for r in range(9):  # the row's normal equations on its kept set, solved directly
        k = keep[r]
        want = torch.zeros(19, dtype=torch.float64)
        want[k] = torch.linalg.solve(damped[k][:, k], (damped @ w[r])[k])
        torch.testing.assert_close(new[r], want, rtol=1e-7, atol=1e-9)
    assert info["error"] <= info["error_sweep"] + 1e-12
    assert info["error"] == pytest.approx(reconstruction_error(w, new, damped))
    again = refit(w, damped, keep, start=None, iters=200)
    torch.testing.assert_close(again, new, rtol=1e-7, atol=1e-9)
