"""Blocked Fisher inverses (dense, low-rank, Woodbury refresh) against explicit torch.linalg inverses."""
import pytest
import torch
import torch.nn.functional as F

from fastprune import _ops
from fastprune.errors import NonFiniteError
from fastprune.inverse import FisherInverse


def explicit_blocks(grads, damp, b, alive=None):
    """The explicit inverse of every block of F = damp I + G^T G / N (pruned columns zeroed)."""
    g = grads.double() if alive is None else grads.double() * alive
    n, p = g.shape
    nb = -(-p // b)
    gb = F.pad(g, (0, nb * b - p)).view(n, nb, b).transpose(0, 1)
    f = gb.transpose(1, 2) @ gb / n + damp * torch.eye(b, dtype=torch.float64)
    return torch.linalg.inv(f)


def full_ops(inv_blocks, p):
    nb, b = inv_blocks.shape[:2]
    diag = inv_blocks.diagonal(0, 1, 2).reshape(-1)[:p]

    def mul(v):
        vb = F.pad(v, (0, 0, 0, nb * b - p)).view(nb, b, -1)
        return (inv_blocks @ vb).reshape(-1, v.shape[1])[:p]
    return diag, mul


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


CASES = [(20, 300, None), (7, 130, 32), (50, 130, 32), (100, 70, 16), (1, 5, 3), (9, 9, 9)]


@pytest.mark.parametrize("n,p,b", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
@pytest.mark.parametrize("pruned", [None, "random", "one-block-whole"])
def test_inverse_matches_explicit(n, p, b, dtype, tol, pruned):
    grads = torch.randn(n, p, dtype=torch.float64) * 0.3
    alive = (torch.rand(p) > 0.4) if pruned else None
    if pruned == "one-block-whole":  # a full slot count while other blocks have pruned weights
        alive[: p if b is None else min(b, p)] = True
        alive[-1] = False
    if alive is not None:
        grads = grads * alive  # pruned weights have zero gradients
    damp = 1e-3
    inv = FisherInverse.from_grads(grads.to(dtype), damp, b, alive=alive)
    bb = p if b is None else min(b, p)
    alive_per_block = bb if alive is None else int(F.pad(alive, (0, -(-p // bb) * bb - p)).view(-1, bb).sum(1).max())
    assert inv.lowrank == (n < alive_per_block)
    assert inv.dtype == dtype
    ref_diag, ref_mul = full_ops(explicit_blocks(grads, damp, bb), p)
    assert rel(inv.diag(), ref_diag) < tol
    v = torch.randn(p, 3, dtype=torch.float64)
    assert rel(inv.mul(v.to(dtype)), ref_mul(v)) < tol
    assert rel(inv.mul(v[:, 0].to(dtype)), ref_mul(v[:, :1])[:, 0]) < tol


@pytest.mark.parametrize("lowrank", [True, False])
def test_columns(lowrank):
    p, b = 48, 16
    n = 5 if lowrank else 40
    alive = torch.rand(p) > 0.3
    grads = torch.randn(n, p, dtype=torch.float64) * alive
    inv = FisherInverse.from_grads(grads, 1e-2, b, alive=alive)
    assert inv.lowrank == lowrank
    ref = explicit_blocks(grads, 1e-2, b)
    nb = ref.shape[0]
    ab = F.pad(alive, (0, nb * b - p)).view(nb, b)
    pos = torch.stack([torch.nonzero(ab[i])[:, 0][:2] for i in range(nb)])  # two alive positions per block
    cols = inv.columns(pos)
    torch.testing.assert_close(cols, ref.gather(2, pos.unsqueeze(1).expand(-1, b, -1)))


def test_from_blocks_matches_from_grads():
    grads = torch.randn(64, 100, dtype=torch.float64)
    b = 25
    gb = grads.view(64, 4, b).transpose(0, 1)
    blocks = gb.transpose(1, 2) @ gb / 64
    a = FisherInverse.from_blocks(blocks, 1e-4, 100)
    torch.testing.assert_close(a.diag(), FisherInverse.from_grads(grads, 1e-4, b).diag())


def test_lowrank_factor_op_identity():
    g = torch.randn(3, 6, 40, dtype=torch.float64)
    w = _ops.lowrank_factor(g, 0.5)
    lhs = torch.eye(40, dtype=torch.float64) - w.transpose(1, 2) @ w
    ref = torch.linalg.inv(0.5 * torch.eye(40, dtype=torch.float64) + g.transpose(1, 2) @ g / 6) * 0.5
    torch.testing.assert_close(lhs, ref)


def test_ops_opcheck():
    g = torch.randn(2, 5, 8)
    torch.library.opcheck(torch.ops.fastprune.lowrank_factor.default, (g, 1e-2))
    blocks = g.transpose(1, 2) @ g
    torch.library.opcheck(torch.ops.fastprune.fisher_inverse.default, (blocks, 1e-2))


@pytest.mark.parametrize("damp", [0.0, -1e-5, float("nan"), float("inf")])
def test_bad_damp(damp):
    with pytest.raises(ValueError, match="damp must be a positive"):
        FisherInverse.from_grads(torch.randn(4, 10), damp, 5)
    with pytest.raises(RuntimeError, match="damp must be a positive"):
        _ops.fisher_inverse(torch.zeros(1, 3, 3), damp)


def test_non_finite_gradients():
    g = torch.randn(4, 10)
    g[1, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        FisherInverse.from_grads(g, 1e-3, 5)  # dense
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        FisherInverse.from_grads(g, 1e-3, None)  # low-rank
    with pytest.raises(NonFiniteError, match="Fisher blocks"):
        FisherInverse.from_blocks(g.view(2, 4, 5).transpose(1, 2) @ g.view(2, 4, 5), 1e-3, 10)
    with pytest.raises(RuntimeError, match="NaN or inf"):  # the op's own check, for direct callers
        _ops.lowrank_factor(g.view(2, 4, 5), 1e-3)


def test_memory_budget():
    with pytest.raises(MemoryError, match="smaller block_size.*max_memory"):
        FisherInverse.from_grads(torch.randn(64, 256), 1e-3, 32, max_memory=1000)
    with pytest.raises(MemoryError, match="fewer gradients"):
        FisherInverse.from_grads(torch.randn(8, 256), 1e-3, None, max_memory=1000)


def test_not_positive_definite_names_the_fix():
    blocks = -torch.eye(4).expand(2, 4, 4) * 10  # F = damp I - 10 I is negative definite
    with pytest.raises(RuntimeError, match="increase damp"):
        _ops.fisher_inverse(blocks, 1e-3)


def test_shape_errors():
    with pytest.raises(ValueError, match="do not tile"):
        FisherInverse.from_blocks(torch.zeros(2, 4, 4), 1e-3, 20)
    with pytest.raises(ValueError, match="grads must be"):
        FisherInverse.from_grads(torch.zeros(0, 4), 1e-3, 2)


def test_non_contiguous_gradients():
    grads = torch.randn(60, 45, dtype=torch.float64).T  # (45, 60) view, not contiguous
    assert not grads.is_contiguous()
    for b in (None, 16):  # low-rank (45 < 60), dense (45 >= 16)
        inv = FisherInverse.from_grads(grads, 1e-2, b)
        ref_diag, _ = full_ops(explicit_blocks(grads, 1e-2, 60 if b is None else b), 60)
        assert rel(inv.diag(), ref_diag) < 1e-10


@pytest.mark.parametrize("block_size", [0, -3, 2.5, True])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size must be"):
        FisherInverse.from_grads(torch.randn(4, 10), 1e-3, block_size)
