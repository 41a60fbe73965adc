"""Sparse Linear forward: fastprune's SparseLinear vs dense nn.Linear (MKL/oneDNN)
and torch.sparse CSR matmul, float32, at the issue's shapes, sparsities and batches.
``fastprune-avx2`` is the same kernel held to 32-byte vectors (what a CPU without
AVX-512 runs); on such a CPU both rows are the AVX2 kernel."""
import pytest
import torch
from torch import nn

import fastprune
from fastprune.sparse import SparseLinear

ROUNDS = dict(rounds=30, iterations=5, warmup_rounds=3)
SHAPES = {"1024x1024": (1024, 1024), "4096x1024": (4096, 1024), "1024x4096": (1024, 4096)}


def layer(shape, sparsity):
    out_features, in_features = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(in_features, out_features)
    mask = torch.rand(out_features, in_features, generator=gen) >= sparsity
    with torch.no_grad():
        lin.weight.mul_(mask)
    return lin, mask


def method_fn(method, lin, mask):
    if method == "dense":
        return lin
    if method.startswith("fastprune"):
        return SparseLinear.from_dense(lin, mask)
    weight, bias = lin.weight.detach().to_sparse_csr(), lin.bias.detach()
    return lambda x: torch.sparse.mm(weight, x.t()).t() + bias


# The method varies fastest: each group's methods run back to back, so a slow
# phase of this shared machine hits all of them, not one method's every group.
@pytest.mark.parametrize("method", ["fastprune", "fastprune-avx2", "dense", "torch.sparse-csr"])
@pytest.mark.parametrize("batch", [1, 8, 64, 256])
@pytest.mark.parametrize("sparsity", [0.9, 0.95])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_sparse_linear(benchmark, method, shape, sparsity, batch):
    lin, mask = layer(shape, sparsity)
    fn = method_fn(method, lin, mask)
    x = torch.randn(batch, SHAPES[shape][1])
    benchmark.group = f"sparse-linear {shape} sparsity {sparsity} batch {batch}"
    benchmark.extra_info["method"] = method
    isa = fastprune.cpu_isa("avx2" if method == "fastprune-avx2" and fastprune.cpu_isa() == "avx512" else "")
    try:
        with torch.no_grad():
            torch.testing.assert_close(fn(x), lin(x), rtol=1e-4, atol=1e-4)
            benchmark.pedantic(fn, args=(x,), **ROUNDS)
    finally:
        fastprune.cpu_isa("auto")
    benchmark.extra_info["cpu_isa"] = isa
