"""fastprune.kth_smallest against torch.kthvalue on the concatenation."""
import pytest
import torch

from fastprune import kth_smallest


def reference(tensors, k):
    flat = torch.cat([t.flatten() for t in tensors])
    value = flat.kthvalue(k).values
    return value, int((flat < value).sum())


def check(tensors, k):
    value, num_less = kth_smallest(tensors, k)
    ref_value, ref_less = reference(tensors, k)
    assert value.dtype == tensors[0].dtype and value.dim() == 0
    assert value.item() == ref_value.item()
    assert num_less == ref_less


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_kthvalue_over_lists(dtype):
    tensors = [torch.randn(1000), torch.randn(37, 5), torch.empty(0), torch.randn(3, 3, 3) * 1e-30,
               torch.randn(70_000)]
    tensors = [t.to(dtype) for t in tensors]
    n = sum(t.numel() for t in tensors)
    for k in [1, 2, 17, n // 3, n // 2, n - 1, n]:
        check(tensors, k)


def test_ties_and_signed_zeros():
    tensors = [torch.tensor([2.0, 1.0, 1.0, -0.0]), torch.tensor([0.0, 1.0, -1.0, 1.0, 5.0])]
    for k in range(1, 10):
        check(tensors, k)
    value, num_less = kth_smallest(tensors, 4)  # -1, -0, 0 then the first 1.0
    assert value.item() == 1.0 and num_less == 3


def test_all_equal_and_extremes():
    check([torch.full((500,), 3.5)], 250)
    tensors = [torch.tensor([float("inf"), -float("inf"), 0.0, torch.finfo(torch.float32).max])]
    for k in range(1, 5):
        check(tensors, k)


def test_non_contiguous_inputs():
    base = torch.randn(64, 48, dtype=torch.float64)
    tensors = [base.t(), base[::3, 1::2], torch.randn(10, 10).double()[:, 3]]
    assert not tensors[0].is_contiguous() and not tensors[1].is_contiguous()
    n = sum(t.numel() for t in tensors)
    for k in [1, 100, n]:
        check(tensors, k)


def test_many_threads_agree():
    tensors = [torch.randn(300_000), torch.randn(123_457)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = kth_smallest(tensors, 200_000)
    finally:
        torch.set_num_threads(threads)
    assert single[0].item() == kth_smallest(tensors, 200_000)[0].item()
    check(tensors, 200_000)


@pytest.mark.parametrize("tensors,k,match", [
    ([], 1, "empty list"),
    ([torch.randn(4)], 0, "out of range"),
    ([torch.randn(4)], 5, "out of range"),
    ([torch.tensor([1.0, float("nan")])], 1, "NaN"),
    ([torch.randn(3), torch.randn(3).double()], 1, "dtype"),
    ([torch.arange(5)], 1, "floating point"),
])
def test_errors(tensors, k, match):
    with pytest.raises(RuntimeError, match=match):
        kth_smallest(tensors, k)


def test_opcheck_and_compile():
    tensors = [torch.randn(50), torch.randn(4, 5)]
    torch.library.opcheck(torch.ops.fastprune.kth_smallest.default, (tensors, 7))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def threshold(a, b):
        return torch.ops.fastprune.kth_smallest([a, b], 7)[0] * 2

    assert threshold(*tensors).item() == reference(tensors, 7)[0].item() * 2
