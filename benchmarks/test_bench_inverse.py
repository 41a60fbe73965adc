"""Blocked inverse of the damped empirical Fisher (d = 65536 weights, damp 1e-5):
fastprune's batched Cholesky (N >= B) and low-rank form (N < B) against WoodFisher's
sequential Sherman-Morrison updates (vectorised over blocks) and explicit torch.linalg.inv."""
import pytest
import torch

from fastprune.inverse import FisherInverse
from woodfisher_style import sherman_morrison

D, DAMP = 65536, 1e-5
CASES = {"dense B=128 N=256": (128, 256), "low-rank B=2048 N=64": (2048, 64)}
SM_GRADS = 16  # Sherman-Morrison is timed on this many updates and scaled to N


def fastprune_inverse(grads, b):
    return FisherInverse.from_grads(grads, DAMP, b).diag()


def linalg_inv(grads, b):
    n = len(grads)
    g = grads.view(n, -1, b).transpose(0, 1)
    f = g.transpose(1, 2) @ g / n
    f.diagonal(0, 1, 2).add_(DAMP)
    return torch.linalg.inv(f).diagonal(0, 1, 2)


def sm_prefix(grads, b):
    return sherman_morrison(grads[:SM_GRADS], b, DAMP, total=len(grads)).diagonal(0, 1, 2)


METHODS = {"fastprune": fastprune_inverse, "torch.linalg.inv": linalg_inv, "sherman-morrison": sm_prefix}


# The method varies fastest: each group's methods run back to back, so a slow
# phase of this shared machine hits all of them, not one method's every group.
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", list(CASES))
def test_fisher_inverse(benchmark, case, method):
    b, n = CASES[case]
    if method == "torch.linalg.inv" and b > 128:
        pytest.skip("explicit inverses of 2048 x 2048 blocks are the memory blow-up the low-rank path avoids")
    grads = torch.randn(n, D)
    benchmark.group = f"fisher-inverse {case}"
    benchmark.extra_info["method"] = method
    if method == "sherman-morrison":
        benchmark.extra_info["scale"] = n / SM_GRADS
    benchmark.pedantic(METHODS[method], args=(grads, b), rounds=3, iterations=1, warmup_rounds=1)
