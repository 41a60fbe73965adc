"""conv_grad_bias_sq (implicit-GEMM Conv2d statistics) against per-sample autograd in float64."""
import pytest
import torch
import torch.nn.functional as F

from fastprune import _ops

def reference(x, weight_shape, dy, stride, padding, dilation, groups):
    """Weight and bias sums of sum_n g_n and g_n**2 by one float64 backward per sample."""
    w = torch.zeros(weight_shape, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(weight_shape[0], dtype=torch.float64, requires_grad=True)
    sums = [0, 0, 0, 0]
    for n in range(x.shape[0]):
        out = F.conv2d(x[n:n + 1].double(), w, b, stride, padding, dilation, groups)
        gw, gb = torch.autograd.grad((out * dy[n:n + 1].double()).sum(), [w, b])
        sums = [sums[0] + gw, sums[1] + gw * gw, sums[2] + gb, sums[3] + gb * gb]
    return sums


# (N, C, O, H, W, kernel, stride, padding, dilation, groups): channels and positions that
# are and are not multiples of the vector tiles, 1x1 and rectangular kernels, strides,
# dilations, uneven padding, groups, a single sample and a single output position.
CASES = [
    (3, 3, 32, 9, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (5, 6, 10, 7, 11, (3, 2), (2, 1), (0, 2), (2, 1), 2),
    (2, 64, 128, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (4, 5, 7, 6, 6, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    (1, 4, 17, 5, 9, (2, 3), (1, 2), (1, 0), (1, 1), 1),
    (3, 8, 96, 3, 3, (3, 3), (1, 1), (0, 0), (1, 1), 4),
    (2, 2, 33, 20, 3, (5, 1), (3, 1), (2, 0), (1, 1), 1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_against_per_sample_autograd(every_cpu_isa, case, dtype):
    n, c, o, h, w, k, s, p, d, g = case
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w, dtype=dtype)
    ho, wo = [(size + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for size, pp, dd, kk, ss in zip((h, w), p, d, k, s)]
    dy = torch.randn(n, o, ho, wo, dtype=dtype)
    got = _ops.conv_grad_bias_sq(x, dy, k, s, p, d, g, 0.25)
    ref = reference(x, (o, c // g, *k), dy, s, p, d, g)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-5)
    for value, expected in zip(got[:4], ref):
        assert value.dtype == dtype
        torch.testing.assert_close(value.double().reshape(expected.shape), 0.25 * expected, **tol)
    assert got[0].shape == (g, o // g, c // g * k[0] * k[1]) and got[2].shape == (g, o // g)
    torch.testing.assert_close(got[4].double(), 0.25 * (ref[1].sum() + ref[3].sum()), **tol)


def test_non_contiguous_and_half_inputs():
    torch.manual_seed(0)
    x = torch.randn(4, 9, 6, 3).permute(0, 3, 1, 2)  # (4, 3, 9, 6), channels last in memory
    dy = torch.randn(4, 9, 6, 64).permute(0, 3, 1, 2)[:, ::2]  # (4, 32, 9, 6), strided channels
    ref = _ops.conv_grad_bias_sq(x.contiguous(), dy.contiguous(), (3, 3), (1, 1), (1, 1), (1, 1), 1)
    for got, want in zip(_ops.conv_grad_bias_sq(x, dy, (3, 3), (1, 1), (1, 1), (1, 1), 1), ref):
        torch.testing.assert_close(got, want)
    half = _ops.conv_grad_bias_sq(x.half(), dy.half(), (3, 3), (1, 1), (1, 1), (1, 1), 1)
    exact = _ops.conv_grad_bias_sq(x.half().float(), dy.half().float(), (3, 3), (1, 1), (1, 1), (1, 1), 1)
    for got, want in zip(half, exact):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)


def test_bound_is_non_finite_with_the_sums():
    x, dy = torch.randn(3, 2, 5, 5), torch.randn(3, 32, 5, 5)
    dy[1, 4, 2, 2] = float("inf")
    out = _ops.conv_grad_bias_sq(x, dy, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    assert not bool(out[4].isfinite()) and not bool(out[1].isfinite().all())


def test_empty_batch_and_errors():
    out = _ops.conv_grad_bias_sq(torch.randn(0, 4, 5, 5), torch.randn(0, 32, 3, 3), (3, 3), (1, 1), (0, 0), (1, 1), 1)
    assert all(float(t.abs().sum()) == 0 for t in out) and out[0].shape == (1, 32, 36)
    x, dy = torch.randn(2, 4, 5, 5), torch.randn(2, 32, 3, 3)
    with pytest.raises(RuntimeError, match="gives outputs of 5 x 5"):
        _ops.conv_grad_bias_sq(x, dy, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    with pytest.raises(RuntimeError, match="must divide"):
        _ops.conv_grad_bias_sq(x, dy, (3, 3), (1, 1), (0, 0), (1, 1), 3)
    with pytest.raises(RuntimeError, match=r"expected input \(N, C, H, W\)"):
        _ops.conv_grad_bias_sq(x[0], dy, (3, 3), (1, 1), (0, 0), (1, 1), 1)
    with pytest.raises(RuntimeError, match="disagree on the batch"):
        _ops.conv_grad_bias_sq(x, dy[:1], (3, 3), (1, 1), (0, 0), (1, 1), 1)
    with pytest.raises(RuntimeError, match="must be >= 1"):
        _ops.conv_grad_bias_sq(x, dy, (3, 3), (0, 1), (0, 0), (1, 1), 1)
    with pytest.raises(RuntimeError, match="two values each"):
        torch.ops.fastprune.conv_grad_bias_sq(x, dy, [3, 3, 3], [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="must be floating point"):
        _ops.conv_grad_bias_sq(x.long(), dy, (3, 3), (1, 1), (0, 0), (1, 1), 1)


def test_opcheck():
    x, dy = torch.randn(3, 4, 6, 5), torch.randn(3, 32, 6, 5)
    torch.library.opcheck(torch.ops.fastprune.conv_grad_bias_sq.default, (x, dy, [3, 3], [1, 1], [1, 1], [1, 1], 2, 0.5))
