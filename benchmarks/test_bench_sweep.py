"""SparseGPT's column sweep: the fastprune op against the same algorithm written with
torch ops (the reference implementation's loop: vectorised over rows, one column at
a time), on a 4096 x 4096 layer at 50 % unstructured and 2:4."""
import pytest
import torch

from fastprune import _ops

SIZE = 4096
BLOCK = 128


def torch_sweep(w, u, block, sparsity, prune_n=0, prune_m=0):
    """The reference loop in torch ops (exact-count unstructured masks, as the op)."""
    w = w.clone()
    rows, cols = w.shape
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        mask = torch.zeros_like(w1, dtype=torch.bool)
        if prune_m == 0:
            score = w1.square() / u1.diagonal().square()
            k = round(sparsity * score.numel())
            mask.view(-1)[score.flatten().argsort(stable=True)[:k]] = True
        for j in range(i2 - i1):
            if prune_m and j % prune_m == 0:
                score = w1[:, j:j + prune_m].square() / u1.diagonal()[j:j + prune_m].square()
                mask.scatter_(1, j + score.topk(prune_n, dim=1, largest=False)[1], True)
            q = w1[:, j].masked_fill(mask[:, j], 0)
            e = (w1[:, j] - q) / u1[j, j]
            w1[:, j:] -= e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            w1[:, j] = q
            err[:, j] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = ~mask
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w, keep


@pytest.fixture(scope="module")
def layer():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * SIZE, SIZE, generator=gen) / SIZE ** 0.5
    h = 2 / len(x) * x.T @ x
    h.diagonal().add_(0.01 * float(h.diagonal().mean()))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return torch.randn(SIZE, SIZE, generator=gen), u


# The method varies fastest: each group's methods run back to back, so a slow
# phase of this shared machine hits all of them, not one method's every group.
@pytest.mark.parametrize("method", ["fastprune", "torch-ops"])
@pytest.mark.parametrize("pattern", ["50%", "2:4"])
def test_sweep(benchmark, layer, pattern, method):
    w, u = layer
    args = (BLOCK, 0.5, 0, 0) if pattern == "50%" else (BLOCK, 0.0, 2, 4)
    fn = _ops.sparsegpt_sweep if method == "fastprune" else torch_sweep
    benchmark.group = f"sparsegpt-sweep {SIZE}x{SIZE} {pattern}"
    benchmark.extra_info["method"] = method
    rounds = dict(rounds=3, iterations=1, warmup_rounds=1) if method == "fastprune" else \
        dict(rounds=1, iterations=1, warmup_rounds=0)
    benchmark.pedantic(fn, args=(w, u, *args), **rounds)
