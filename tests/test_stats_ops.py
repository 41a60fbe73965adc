"""The per-sample statistics ops against einsum over explicit per-sample gradients."""
import pytest
import torch
import torch.nn.functional as F

from fastprune import _ops


def explicit(x, dy):
    return torch.einsum("ngto,ngtk->ngok", dy.double(), x.double()).flatten(1)


@pytest.mark.parametrize("shape", [(5, 1, 1, 7, 3), (4, 1, 9, 6, 5), (3, 4, 5, 2, 3), (1, 1, 1, 1, 1), (3, 2, 40, 64, 30)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_sq_and_per_sample(shape, dtype):
    n, g, t, k, o = shape
    x = torch.randn(n, g, k, t, dtype=dtype).transpose(2, 3)  # non-contiguous
    dy = torch.randn(n, g, t, o, dtype=dtype)
    ps = explicit(x, dy)
    grad, sq = _ops.grad_sq(x, dy)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert grad.dtype == dtype and grad.shape == (g, o, k)
    torch.testing.assert_close(grad.flatten().double(), ps.sum(0), rtol=tol, atol=tol)
    torch.testing.assert_close(sq.flatten().double(), ps.square().sum(0), rtol=tol, atol=tol)
    torch.testing.assert_close(_ops.per_sample_grads(x, dy).double(), ps, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(5, 1, 1, 7, 3), (4, 1, 9, 6, 5), (3, 4, 5, 2, 3), (1, 1, 1, 1, 1), (3, 2, 40, 64, 30),
                                   (257, 1, 1, 33, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_grad_bias_sq_adds_the_bias_sums(shape, dtype):
    # The bias of a Linear / Conv layer: per-sample gradient sum_t dy[n, g, t, :].
    n, g, t, k, o = shape
    x = torch.randn(n, g, k, t, dtype=dtype).transpose(2, 3)  # non-contiguous
    dy = torch.randn(n, g, o, t, dtype=dtype).transpose(2, 3)
    ps = explicit(x, dy)
    bias = dy.double().sum(2).flatten(1)  # (N, G*O)
    tol = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 1e-2}[dtype]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for scale in (1.0, 0.25):
        grad, sq, bgrad, bsq, bound = _ops.grad_bias_sq(x, dy, scale=scale)
        assert grad.dtype == bgrad.dtype == bound.dtype == acc and bgrad.shape == bsq.shape == (g, o)
        assert bound.shape == ()
        torch.testing.assert_close(grad.flatten().double(), scale * ps.sum(0), rtol=tol, atol=tol)
        torch.testing.assert_close(sq.flatten().double(), scale * ps.square().sum(0), rtol=tol, atol=tol)
        torch.testing.assert_close(bgrad.flatten().double(), scale * bias.sum(0), rtol=tol, atol=tol)
        torch.testing.assert_close(bsq.flatten().double(), scale * bias.square().sum(0), rtol=tol, atol=tol)
        torch.testing.assert_close(bound.double(), scale * (ps.square().sum() + bias.square().sum()), rtol=tol,
                                   atol=tol)


# (N, K, O) of Linear's rank-1 case (T = 1), whose CPU kernel tiles 3 vectors of K by 4
# rows of O (AVX-512; 2 by 3 otherwise) over chunks of 256 samples: none of them whole.
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 47, 5), (256, 49, 4), (257, 100, 301), (600, 785, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank1_sums_on_every_vector_path(every_cpu_isa, shape, dtype):
    n, k, o = shape
    x = torch.randn(k, n, dtype=dtype).t()  # non-contiguous, as Linear's input may be
    dy = torch.randn(n, o, dtype=dtype)
    ref = (dy.double().t() @ x.double(), dy.double().square().t() @ x.double().square())
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    grad, sq, bgrad, bsq, bound = _ops.grad_bias_sq(x.view(n, 1, 1, k), dy.view(n, 1, 1, o), scale=0.5)
    torch.testing.assert_close(grad[0].double(), 0.5 * ref[0], **tol)
    torch.testing.assert_close(sq[0].double(), 0.5 * ref[1], **tol)
    torch.testing.assert_close(bound.double(), 0.5 * (ref[1].sum() + dy.double().square().sum()), **tol)
    for got, want in zip(_ops.grad_sq(x.view(n, 1, 1, k), dy.view(n, 1, 1, o)), ref):
        torch.testing.assert_close(got[0].double(), want, **tol)


# (N, G, T, K, O) with T > 1 and O >= 32: the CPU kernel over positions, with O a whole
# number of vectors (dy read in place) or not (copied), ragged row tiles, groups.
@pytest.mark.parametrize("shape", [(3, 1, 5, 7, 32), (2, 1, 9, 13, 33), (4, 3, 2, 19, 48), (1, 2, 17, 1, 100),
                                   (5, 1, 64, 40, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_position_sums_on_every_vector_path(every_cpu_isa, shape, dtype, layout):
    n, g, t, k, o = shape
    if layout == "contiguous":
        x, dy = torch.randn(n, g, t, k, dtype=dtype), torch.randn(n, g, t, o, dtype=dtype)
    else:  # strided views, as an unfolded conv input and a transposed output gradient give
        x = torch.randn(n, g, k, t, dtype=dtype).transpose(2, 3)
        dy = torch.randn(n, g, o, t, dtype=dtype).transpose(2, 3)
    ps = explicit(x, dy)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    grad, sq, bgrad, bsq, bound = _ops.grad_bias_sq(x, dy, scale=0.5)
    torch.testing.assert_close(grad.flatten().double(), 0.5 * ps.sum(0), **tol)
    torch.testing.assert_close(sq.flatten().double(), 0.5 * ps.square().sum(0), **tol)
    bias = dy.double().sum(2).flatten(1)
    torch.testing.assert_close(bound.double(), 0.5 * (ps.square().sum() + bias.square().sum()), **tol)
    for got, want in zip(_ops.grad_sq(x, dy), (ps.sum(0), ps.square().sum(0))):
        torch.testing.assert_close(got.flatten().double(), want, **tol)


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_grad_bias_sq_bound_is_non_finite_with_the_sums(t, bad):
    # 1e30 is finite, but its square overflows float32: the sums are inf, so must be the bound.
    x, dy = torch.randn(6, 1, t, 5), torch.randn(6, 1, t, 4)
    x[2, 0, 0, 3] = bad
    grad, sq, _, bsq, bound = _ops.grad_bias_sq(x, dy)
    assert not bool(sq.isfinite().all()) and not bool(bound.isfinite())
    _, _, _, _, bound = _ops.grad_bias_sq(torch.randn(6, 1, t, 5), dy)
    assert bool(bound.isfinite())


@pytest.mark.parametrize("block", [1, 4, 7, 45, 64])
def test_grad_blocks_accumulate_ragged(block):
    x, dy = torch.randn(6, 3, 4, 5, dtype=torch.float64), torch.randn(6, 3, 4, 3, dtype=torch.float64)
    ps = explicit(x, dy)
    p = ps.shape[1]
    nb = -(-p // block)
    blocks = torch.zeros(nb, block, block, dtype=torch.float64)
    _ops.grad_blocks_accumulate(x, dy, blocks)
    _ops.grad_blocks_accumulate(x[:2], dy[:2], blocks)  # accumulates
    padded = F.pad(torch.cat([ps, ps[:2]]), (0, nb * block - p)).view(-1, nb, block)
    torch.testing.assert_close(blocks, torch.einsum("nbi,nbj->bij", padded, padded))
    if nb * block > p:
        assert (blocks[-1, p - (nb - 1) * block:, :] == 0).all()


def test_half_inputs_accumulate_in_float32():
    x, dy = torch.randn(8, 1, 3, 16), torch.randn(8, 1, 3, 4)
    grad, sq = _ops.grad_sq(x.bfloat16(), dy.bfloat16())
    assert grad.dtype == torch.float32
    ref = explicit(x.bfloat16().float(), dy.bfloat16().float()).float()
    torch.testing.assert_close(sq.flatten(), ref.square().sum(0), rtol=1e-4, atol=1e-4)


def test_errors():
    with pytest.raises(RuntimeError, match="expected x"):
        _ops.grad_sq(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="disagree"):
        _ops.grad_sq(torch.randn(3, 1, 2, 4), torch.randn(2, 1, 2, 4))
    with pytest.raises(RuntimeError, match="do not tile"):
        _ops.grad_blocks_accumulate(torch.randn(3, 1, 2, 4), torch.randn(3, 1, 2, 2), torch.zeros(1, 4, 4))


def test_opcheck():
    x, dy = torch.randn(4, 2, 3, 5), torch.randn(4, 2, 3, 2)
    torch.library.opcheck(torch.ops.fastprune.grad_sq.default, (x, dy))
    torch.library.opcheck(torch.ops.fastprune.grad_bias_sq.default, (x, dy, 0.5))
    torch.library.opcheck(torch.ops.fastprune.grad_bias_sq.default, (x[:, :, :1], dy[:, :, :1], 1.0))
    torch.library.opcheck(torch.ops.fastprune.per_sample_grads.default, (x, dy))
    torch.library.opcheck(torch.ops.fastprune.grad_blocks_accumulate.default, (x, dy, torch.zeros(3, 8, 8)))
    torch.library.opcheck(torch.ops.fastprune.sum_sq.default, (torch.randn(5, 3, 2),))


@pytest.mark.parametrize("shape", [(7,), (1, 5), (300, 257), (4, 3, 2, 5), (0, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sum_sq(shape, dtype):
    t = torch.randn(shape[::-1], dtype=dtype).permute(*reversed(range(len(shape))))  # non-contiguous
    g, q = _ops.sum_sq(t)
    assert g.shape == q.shape == t.shape[1:] and g.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(g.double(), t.double().sum(0), rtol=tol, atol=tol)
    torch.testing.assert_close(q.double(), t.double().square().sum(0), rtol=tol, atol=tol)


def test_sum_sq_half_and_errors():
    t = torch.randn(9, 4).half()
    g, q = _ops.sum_sq(t)
    assert g.dtype == torch.float32
    torch.testing.assert_close(q, t.float().square().sum(0))
    with pytest.raises(RuntimeError, match="floating-point"):
        _ops.sum_sq(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="floating-point"):
        _ops.sum_sq(torch.tensor(1.0))


def test_cached_buffers_are_never_shared_while_alive():
    # Outputs of >= 64 KiB come from the host cache: a live result must never be
    # handed out again, a freed one is, and empty_cache releases it.
    _ops.empty_cache()
    x, dy = torch.randn(64, 1, 1, 300), torch.randn(64, 1, 1, 200)
    first = _ops.grad_sq(x, dy)
    kept = [t.clone() for t in first]
    second = _ops.grad_sq(2 * x, dy)
    ptrs = {t.data_ptr() for t in first}
    assert ptrs.isdisjoint(t.data_ptr() for t in second)
    del second
    third = _ops.grad_sq(3 * x, dy)
    for a, b in zip(first, kept):
        assert torch.equal(a, b)
    torch.testing.assert_close(third[0], 3 * kept[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(third[1], 9 * kept[1], rtol=1e-5, atol=1e-4)
    del first, third
    assert _ops.empty_cache() >= 2 * 300 * 200 * 4
    assert _ops.empty_cache() == 0


def test_blocks_dtype_must_match_accumulation():
    x, dy = torch.randn(3, 1, 2, 4, dtype=torch.float64), torch.randn(3, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="dtype"):
        _ops.grad_blocks_accumulate(x, dy, torch.zeros(1, 8, 8))
