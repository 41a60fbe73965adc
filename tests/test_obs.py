"""OBS saliencies and updates against closed forms and the exact constrained minimiser."""
import pytest
import torch

from fastprune.inverse import FisherInverse
from fastprune.second_order.obs import obs_scores, obs_update


def setup(p=24, b=8, n=30, damp=1e-2, lowrank=False):
    grads = torch.randn(5 if lowrank else n, p, dtype=torch.float64)
    inv = FisherInverse.from_grads(grads, damp, b)
    gb = grads.view(len(grads), p // b, b).transpose(0, 1)
    fb = gb.transpose(1, 2) @ gb / len(grads) + damp * torch.eye(b, dtype=torch.float64)
    return inv, torch.block_diag(*fb), torch.randn(p, dtype=torch.float64)


@pytest.mark.parametrize("lowrank", [False, True])
def test_single_weight_update_closed_form(lowrank):
    inv, f, w = setup(lowrank=lowrank)
    finv = torch.linalg.inv(f)
    q = 5
    pruned = torch.zeros_like(w, dtype=torch.bool)
    pruned[q] = True
    d = obs_update(inv, w, pruned)
    torch.testing.assert_close(d, -w[q] / finv[q, q] * finv[:, q])
    assert abs(float(w[q] + d[q])) < 1e-10  # the update itself zeroes the pruned weight
    torch.testing.assert_close(obs_scores(inv, w), w.square() / (2 * finv.diagonal()))


@pytest.mark.parametrize("lowrank", [False, True])
@pytest.mark.parametrize("with_grad", [False, True])
def test_group_update_is_constrained_minimiser(lowrank, with_grad):
    inv, f, w = setup(lowrank=lowrank)
    g = torch.randn_like(w) if with_grad else torch.zeros_like(w)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    pruned[[0, 3, 4, 9, 17, 18, 19, 23]] = True  # 3, 1, 4 weights in the three blocks
    newton = inv.mul(g) if with_grad else None
    d = obs_update(inv, w, pruned, newton, group=True)
    # min g^T d + 1/2 d^T F d subject to d_Q = -w_Q: F_RR d_R = -(g_R + F_RQ d_Q)
    q, r = pruned, ~pruned
    ref = torch.zeros_like(w)
    ref[q] = -w[q]
    ref[r] = torch.linalg.solve(f[r][:, r], -(g[r] + f[r][:, q] @ ref[q]))
    torch.testing.assert_close(d, ref)


def test_independent_update_sums_single_updates():
    inv, f, w = setup()
    finv = torch.linalg.inv(f)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    pruned[[1, 2, 12]] = True
    expect = sum(-w[q] / finv[q, q] * finv[:, q] for q in (1, 2, 12))
    torch.testing.assert_close(obs_update(inv, w, pruned), expect)


def test_woodtaylor_scores_and_update():
    inv, f, w = setup()
    finv = torch.linalg.inv(f)
    g = torch.randn_like(w)
    newton = inv.mul(g)
    torch.testing.assert_close(obs_scores(inv, w, newton), (w - finv @ g).square() / (2 * finv.diagonal()))
    pruned = torch.zeros_like(w, dtype=torch.bool)
    pruned[7] = True
    lam = (w[7] - (finv @ g)[7]) / finv[7, 7]
    torch.testing.assert_close(obs_update(inv, w, pruned, newton), -finv @ g - lam * finv[:, 7])


def test_group_update_memory_error():
    inv, _, w = setup()
    with pytest.raises(MemoryError, match="update=True"):
        obs_update(inv, w, torch.ones_like(w, dtype=torch.bool), group=True, max_memory=10)
