"""Sparse execution: the sparse_mm ops against dense masked matmul, the modules
against nn.Linear / nn.Conv2d and autograd, conversion, storage and N:M masks."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastprune
from fastprune import _ops
from fastprune.sparse import (FrozenConv2d, FrozenLinear, SemiStructuredLinear, SparseConv2d, SparseLinear, is_two_four,
                              load_sparse, save_sparse, to_dense, to_sparse)
from fastprune.sparse.semi import semi_structured_reason
from fastprune.sparse.layers import CSRWeight, _SparseMM


def random_mask(o, k, density, kind="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(o, k, generator=g) < density
    if kind == "patterns" and o >= 3:
        mask[0] = False  # empty row
        mask[1] = True   # fully dense row
        mask[2] = False
        mask[2, k - 1] = True  # one column
    return mask


def csr_of(weight, mask):
    csr, flat = CSRWeight.from_mask(mask)
    return csr, weight.reshape(-1)[flat].contiguous()


@pytest.mark.parametrize("o,k,m,b", [(7, 5, 1, 1), (16, 33, 3, 2), (40, 70, 8, 1), (9, 64, 29, 3),
                                     (5, 100, 64, 1), (33, 17, 150, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random", "patterns"])
def test_sparse_mm_matches_dense(o, k, m, b, dtype, kind):
    mask = random_mask(o, k, 0.3, kind)
    weight = torch.randn(o, k, dtype=dtype) * mask
    csr, values = csr_of(weight, mask)
    x = torch.randn(b, m, k, dtype=dtype).transpose(1, 2)  # non-contiguous (B, K, M)
    bias = torch.randn(o, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_ops.sparse_mm(csr.row_ptr, csr.col_idx, values, x, bias),
                               weight @ x + bias[:, None], **tol)
    torch.testing.assert_close(_ops.sparse_mm(csr.row_ptr, csr.col_idx, values, x), weight @ x, **tol)
    dy = torch.randn(b, o, m, dtype=dtype)
    dv = _ops.sparse_mm_values_grad(csr.row_ptr, csr.col_idx, values, x, dy)
    torch.testing.assert_close(dv, torch.einsum("bom,bkm->ok", dy, x)[mask], **tol)


@pytest.mark.parametrize("n", [1, 3, 8, 13, 64, 150])
@pytest.mark.parametrize("o", [1, 7, 21])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_mm_linear_layout(n, o, dtype):
    # (N, K) in, (N, O) out: written in blocks of rows, with ragged last blocks and column tiles.
    mask = random_mask(o, 37, 0.4, "patterns")
    weight = torch.randn(o, 37, dtype=dtype) * mask
    csr, values = csr_of(weight, mask)
    x, bias = torch.randn(37, n, dtype=dtype).t(), torch.randn(o, dtype=dtype)  # non-contiguous
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_ops.sparse_mm(csr.row_ptr, csr.col_idx, values, x, bias), x @ weight.t() + bias, **tol)
    dy = torch.randn(n, o, dtype=dtype)
    torch.testing.assert_close(_ops.sparse_mm_values_grad(csr.row_ptr, csr.col_idx, values, x, dy),
                               (dy.t() @ x)[mask], **tol)


def supported_isas():
    """Every CPU kernel variant this machine can run (the widest one is the default)."""
    best = fastprune.cpu_isa()
    order = ["generic", "avx2", "avx512"]
    return order[:order.index(best) + 1]


@pytest.fixture
def cpu_isa():
    yield fastprune.cpu_isa
    fastprune.cpu_isa("auto")


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("o,k", [(1, 1), (13, 29), (67, 130), (9, 1031)])
@pytest.mark.parametrize("n", [1, 7, 15, 16, 17, 33, 129, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_vector_kernel_matches_float64_dense(cpu_isa, isa, o, k, n, dtype):
    # Batches that fill 8, 4, 2, 1 and half vectors of 16 floats / 8 doubles plus scalar
    # tails; rows with no, one and every nonzero; an odd number of nonzeros per row.
    cpu_isa(isa)
    mask = random_mask(o, k, 0.15, "patterns", seed=n)
    weight = torch.randn(o, k, dtype=dtype) * mask
    csr, values = csr_of(weight, mask)
    bias = torch.randn(o, dtype=dtype)
    x = torch.randn(n, k, dtype=dtype)
    ref = x.double() @ weight.double().t() + bias.double()
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    out = _ops.sparse_mm(csr.row_ptr, csr.col_idx, values, x, bias)
    assert out.shape == (n, o) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **tol)
    x3 = torch.randn(2, k, n, dtype=dtype)  # the (B, K, M) layout (Conv2d) on the same tiles
    torch.testing.assert_close(_ops.sparse_mm(csr.row_ptr, csr.col_idx, values, x3).double(),
                               weight.double() @ x3.double(), **tol)


def test_cpu_isa_choice_and_errors(cpu_isa):
    best = fastprune.cpu_isa()
    assert best in ("generic", "avx2", "avx512")
    assert fastprune.cpu_isa("generic") == "generic"
    assert fastprune.cpu_isa() == "generic"
    assert fastprune.cpu_isa("auto") == best
    with pytest.raises(RuntimeError, match="expected 'auto', 'avx512', 'avx2' or 'generic'"):
        fastprune.cpu_isa("sse9")
    if best != "avx512":
        with pytest.raises(RuntimeError, match="cannot run here"):
            fastprune.cpu_isa("avx512")
    assert fastprune.cpu_isa() == best


def test_int32_columns_beyond_16_bits():
    k = (1 << 16) + 5
    mask = torch.zeros(3, k, dtype=torch.bool)
    mask[0, [0, 40000, k - 1]] = True
    mask[2, [65535, 65536]] = True
    weight = torch.randn(3, k, dtype=torch.float64) * mask
    csr, values = csr_of(weight, mask)
    assert csr.col_idx.dtype == torch.int32
    x = torch.randn(1, k, 2, dtype=torch.float64)
    torch.testing.assert_close(_ops.sparse_mm(csr.row_ptr, csr.col_idx, values, x), weight @ x)
    small, _ = CSRWeight.from_mask(mask[:, :65536])
    assert small.col_idx.dtype == torch.int16 and small.columns().max() == 65535  # read as unsigned


def test_sparse_mm_errors():
    mask = random_mask(4, 6, 0.5)
    csr, values = csr_of(torch.randn(4, 6), mask)
    with pytest.raises(RuntimeError, match=r"x must be \(B, K, M\) or \(N, K\)"):
        _ops.sparse_mm(csr.row_ptr, csr.col_idx, values, torch.randn(6))
    with pytest.raises(RuntimeError, match="Double"):
        _ops.sparse_mm(csr.row_ptr, csr.col_idx, values, torch.randn(1, 6, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="int32"):
        _ops.sparse_mm(csr.row_ptr.long(), csr.col_idx, values, torch.randn(1, 6, 2))
    with pytest.raises(RuntimeError, match="row_ptr ends at"):
        _ops.sparse_mm(csr.row_ptr, csr.col_idx[:-1], values[:-1], torch.randn(1, 6, 2))
    with pytest.raises(RuntimeError, match="bias"):
        _ops.sparse_mm(csr.row_ptr, csr.col_idx, values, torch.randn(1, 6, 2), torch.randn(3))


def test_opcheck():
    mask = random_mask(5, 8, 0.5)
    csr, values = csr_of(torch.randn(5, 8), mask)
    x = torch.randn(2, 8, 3)
    torch.library.opcheck(torch.ops.fastprune.sparse_mm.default, (csr.row_ptr, csr.col_idx, values, x, None))
    torch.library.opcheck(torch.ops.fastprune.sparse_mm_values_grad.default,
                          (csr.row_ptr, csr.col_idx, values, x, torch.randn(2, 5, 3)))


def test_autograd_gradcheck():
    mask = random_mask(6, 9, 0.4, "patterns")
    csr, values = csr_of(torch.randn(6, 9, dtype=torch.float64), mask)
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    v = values.clone().requires_grad_()
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: _SparseMM.apply(x, v, b, csr), (x, v, b))


def pruned_linear(i, o, density, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(i, o).to(dtype)
    mask = random_mask(o, i, density, seed=seed)
    with torch.no_grad():
        lin.weight.mul_(mask)
    return lin, mask


@pytest.mark.parametrize("shape", [(1, 20), (5, 20), (2, 3, 20)])
def test_sparse_linear_matches_linear_and_autograd(shape):
    lin, mask = pruned_linear(20, 11, 0.3)
    sparse = SparseLinear.from_dense(lin, mask)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y, ref = sparse(x), lin(x)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    dx, dv, db = torch.autograd.grad(y, [x, sparse.values, sparse.bias], g)
    rx, rw, rb = torch.autograd.grad(ref, [x, lin.weight, lin.bias], g)
    torch.testing.assert_close(dx, rx)
    torch.testing.assert_close(dv, rw[mask])
    torch.testing.assert_close(db, rb)


def test_sparse_linear_float32_relative_error_and_dtype_error():
    lin, mask = pruned_linear(300, 200, 0.1, torch.float32)
    sparse = SparseLinear.from_dense(lin, mask)
    x = torch.randn(64, 300)
    torch.testing.assert_close(sparse(x), lin(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="float32 weights but got a torch.float64 input"):
        sparse(x.double())


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(1, 1, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2),
                                                            ((1, 3), 2, (0, 1), 1), (1, 2, 0, 1)])
def test_sparse_conv2d_matches_conv_and_autograd(kernel, stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, kernel, stride, padding, dilation).double()
    mask = torch.rand_like(conv.weight) < 0.3
    with torch.no_grad():
        conv.weight.mul_(mask)
    sparse = SparseConv2d.from_dense(conv, mask)
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64, requires_grad=True)
    y, ref = sparse(x), conv(x)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    dx, dv = torch.autograd.grad(y, [x, sparse.values], g)
    rx, rw = torch.autograd.grad(ref, [x, conv.weight], g)
    torch.testing.assert_close(dx, rx)
    torch.testing.assert_close(dv, rw[mask])


def test_sparse_modules_check_input_sizes():
    lin, mask = pruned_linear(20, 11, 0.3)
    sparse = SparseLinear.from_dense(lin, mask)
    with pytest.raises(ValueError, match=r"inputs \(\.\.\., 20\), got \(2, 10\)"):
        sparse(torch.randn(2, 10, dtype=torch.float64))
    conv = SparseConv2d.from_dense(nn.Conv2d(5, 7, 3).double())
    with pytest.raises(ValueError, match=r"inputs \(N, 5, H, W\), got \(2, 4, 9, 9\)"):
        conv(torch.randn(2, 4, 9, 9, dtype=torch.float64))


def test_sparse_conv2d_rejects_groups():
    with pytest.raises(ValueError, match="groups=1"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
                         nn.Conv2d(16, 8, 3, groups=2), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()


@pytest.mark.parametrize("make,shape", [(mlp, (3, 64)), (cnn, (2, 3, 8, 8))])
def test_to_sparse_round_trip(make, shape):
    model = make()
    fastprune.prune(model, fastprune.criteria.Magnitude(), 0.9, scope="layer", progress=False)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x)
    masks = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_mask")}
    converted, report = to_sparse(copy.deepcopy(model), x, calibrate=False)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), ref, rtol=1e-5, atol=1e-5)
    kinds = {c.name: c.kernel for c in report.layers}
    assert all(v == "sparse" for k, v in kinds.items() if k != "4" or make is mlp)
    if make is cnn:
        grouped = next(c for c in report.layers if c.name == "4")
        assert grouped.kernel == "dense" and "grouped" in grouped.reason
    assert "sparsity" in str(report)
    trainable = [m for m in converted.modules() if isinstance(m, (SparseLinear, SparseConv2d))]
    assert trainable and all(m.values.requires_grad and m.bias.requires_grad for m in trainable)
    back = to_dense(converted)
    assert not any(isinstance(m, (SparseLinear, SparseConv2d)) for m in back.modules())
    for k, v in masks.items():
        assert torch.equal(back.state_dict()[k].bool(), v.bool())
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref, rtol=1e-5, atol=1e-5)


def test_to_sparse_calibration_and_min_sparsity():
    model = mlp()
    fastprune.prune(model, fastprune.criteria.Magnitude(), 0.5, scope="layer", progress=False,
                    modules=["0", "2"])
    fastprune.prune(model, fastprune.criteria.Magnitude(), 0.95, scope="layer", progress=False, modules=["2"])
    _, report = to_sparse(model, torch.randn(4, 64), min_sparsity=0.7, repeats=3)
    by_name = {c.name: c for c in report.layers}
    assert by_name["0"].kernel == "dense" and "min_sparsity" in by_name["0"].reason
    assert by_name["2"].dense_ms is not None and by_name["2"].sparse_ms is not None
    if by_name["2"].kernel == "sparse":
        assert by_name["2"].sparse_ms < by_name["2"].dense_ms
        assert all(t < d for t, d in zip(report.model_sparse_ms, report.model_dense_ms))
    else:
        assert "dense is faster" in by_name["2"].reason or "model-level" in by_name["2"].reason


def scripted_times(monkeypatch, layer_ms, model_ms):
    """Replaces to_sparse's clocks: layer_ms(module, x) and model_ms(sparse_names, example)
    give the times, so the decisions can be checked exactly."""
    from fastprune.sparse import convert

    monkeypatch.setattr(convert, "_time_ms", lambda fn, x, repeats: layer_ms(fn, x))

    def model_times(model, examples, swaps, repeats):
        names = frozenset(swaps)
        return [model_ms(frozenset(), e) for e in examples], [model_ms(names, e) for e in examples]
    monkeypatch.setattr(convert, "_model_times", model_times)


def pruned_mlp(sparsity=0.95):
    model = mlp()
    fastprune.prune(model, fastprune.criteria.Magnitude(), sparsity, scope="layer", progress=False)
    return model


def test_to_sparse_needs_the_sparse_kernel_faster_at_every_example_input(monkeypatch):
    # Sparse wins at batch 1 and loses at batch 256 for layer "2" only.
    def layer_ms(fn, x):
        sparse = isinstance(fn, SparseLinear)
        if sparse and fn.in_features == 128 and x.shape[0] == 256:
            return 2.0
        return 0.5 if sparse else 1.0
    scripted_times(monkeypatch, layer_ms, lambda names, e: 10.0 - len(names))
    model = pruned_mlp()
    x = torch.randn(256, 64)
    _, report = to_sparse(model, [x[:1], x], min_sparsity=0.0)
    by_name = {c.name: c for c in report.layers}
    assert by_name["0"].kernel == by_name["4"].kernel == "sparse"
    assert by_name["2"].kernel == "dense" and "one of the example inputs" in by_name["2"].reason
    assert by_name["2"].dense_ms == 2.0 and by_name["2"].sparse_ms == 2.5  # summed over both inputs
    assert report.model_dense_ms == [10.0, 10.0] and report.model_sparse_ms == [8.0, 8.0]
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], FrozenLinear)


def test_to_sparse_reverts_smallest_gains_until_the_model_is_faster(monkeypatch):
    # Each layer is faster alone (gains 4x, 2x, 1.25x), but the model is slower while
    # the 1.25x layer "4" is sparse: it goes back to dense, the others stay.
    gain = {128: 4.0, 64: 2.0, 10: 1.25}  # by out_features
    def layer_ms(fn, x):
        return 1.0 / gain[fn.out_features] if isinstance(fn, SparseLinear) else 1.0
    scripted_times(monkeypatch, layer_ms, lambda names, e: 10.0 + (3.0 if "4" in names else -len(names)))
    model = pruned_mlp()
    x = torch.randn(8, 64)
    with torch.no_grad():
        ref = model(x)
    _, report = to_sparse(model, x, min_sparsity=0.0)
    kernels = {c.name: c.kernel for c in report.layers}
    assert kernels == {"0": "sparse", "2": "sparse", "4": "dense"}
    assert "model-level" in report.layers[2].reason
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], SparseLinear) and \
        isinstance(model[4], FrozenLinear)
    assert report.model_sparse_ms == [8.0] and "model at example input 0" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_to_sparse_keeps_every_layer_dense_when_the_model_never_gains(monkeypatch):
    scripted_times(monkeypatch, lambda fn, x: 0.5 if isinstance(fn, SparseLinear) else 1.0,
                   lambda names, e: 10.0 + len(names))
    model = pruned_mlp()
    _, report = to_sparse(model, torch.randn(4, 64), min_sparsity=0.0)
    assert all(c.kernel == "dense" for c in report.layers)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    assert report.model_sparse_ms == report.model_dense_ms


def test_to_sparse_measured_on_several_batches_keeps_outputs_and_batch_norm_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))
    fastprune.prune(model, fastprune.criteria.Magnitude(), 0.95, scope="layer", progress=False,
                    modules=["0", "3"])
    model.train()
    stats = model[1].running_mean.clone(), model[1].num_batches_tracked.clone()
    xs = [torch.randn(b, 64) for b in (1, 16, 64)]
    model.eval()
    with torch.no_grad():
        refs = [model(x) for x in xs]
    model.train()
    _, report = to_sparse(model, xs, repeats=3)
    assert model.training and model[1].training  # modes restored
    assert torch.equal(model[1].running_mean, stats[0]) and torch.equal(model[1].num_batches_tracked, stats[1])
    if any(c.kernel == "sparse" for c in report.layers):
        assert len(report.model_dense_ms) == len(report.model_sparse_ms) == 3
        assert all(t < d for t, d in zip(report.model_sparse_ms, report.model_dense_ms))
    model.eval()
    with torch.no_grad():
        for x, ref in zip(xs, refs):
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_to_sparse_argument_errors():
    with pytest.raises(ValueError, match="at least one example input"):
        to_sparse(pruned_mlp(), [])
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        to_sparse(pruned_mlp(), torch.randn(2, 64), repeats=0)


def test_to_sparse_needs_masks():
    with pytest.raises(ValueError, match="no pruned Linear or Conv2d"):
        to_sparse(mlp(), torch.randn(2, 64))


@pytest.mark.parametrize("sparsity", [0.5, 0.95])
def test_save_load_round_trip_and_size(tmp_path, sparsity):
    model = mlp()
    fastprune.prune(model, fastprune.criteria.Magnitude(), sparsity, scope="layer", progress=False)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / "model.safetensors"
    info = save_sparse(model, path)
    assert info["file_bytes"] == path.stat().st_size
    if sparsity == 0.95:
        assert info["ratio"] <= 0.12
    fresh = mlp()
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
    load_sparse(path, fresh)
    for (k, v), (k2, v2) in zip(sorted(model.state_dict().items()), sorted(fresh.state_dict().items())):
        assert k == k2
        if k.endswith("_orig"):
            v = v * model.state_dict()[k[:-5] + "_mask"]  # pruned entries of orig are not stored
        assert torch.equal(v.to(v2.dtype), v2), k
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, rtol=0, atol=0)
    # A converted model saves the same tensors.
    converted, _ = to_sparse(copy.deepcopy(model), x, calibrate=False)
    save_sparse(converted, tmp_path / "converted.safetensors")
    again = load_sparse(tmp_path / "converted.safetensors", mlp())
    with torch.no_grad():
        torch.testing.assert_close(again(x), ref, rtol=0, atol=0)


def test_load_sparse_errors(tmp_path):
    model = mlp()
    fastprune.prune(model, fastprune.criteria.Magnitude(), 0.9, progress=False)
    save_sparse(model, tmp_path / "m.safetensors")
    with pytest.raises(KeyError, match="has extra"):
        load_sparse(tmp_path / "m.safetensors", nn.Sequential(nn.Linear(64, 128)))
    bigger = nn.Sequential(*mlp(), nn.Linear(10, 2))
    before = copy.deepcopy(bigger.state_dict())
    with pytest.raises(KeyError, match=r"extra \[\]"):
        load_sparse(tmp_path / "m.safetensors", bigger)
    assert bigger.state_dict().keys() == before.keys()
    converted, _ = to_sparse(copy.deepcopy(model), torch.randn(2, 64), calibrate=False)
    with pytest.raises(ValueError, match="to_dense"):
        load_sparse(tmp_path / "m.safetensors", converted)
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not written by"):
        load_sparse(tmp_path / "plain.safetensors", mlp())


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_masks_keep_exactly_n_of_m(pattern):
    n, m = map(int, pattern.split(":"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Conv2d(8, 4, 2))
    masks = fastprune.prune(model, fastprune.criteria.Magnitude(), 1 - n / m, pattern=pattern, progress=False)
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1).reshape(-1, m)
        assert (groups.sum(1) == n).all(), name
        weight = model.get_submodule(name.rsplit(".", 1)[0]).weight_orig.detach().abs().reshape(-1, m)
        kept_min = weight.masked_fill(~groups, float("inf")).min(1).values
        dropped_max = weight.masked_fill(groups, -float("inf")).max(1).values
        assert (kept_min >= dropped_max).all(), name


def test_nm_pattern_errors_leave_model_unchanged():
    model = nn.Sequential(nn.Linear(30, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="multiple of 4"):
        fastprune.prune(model, fastprune.criteria.Magnitude(), 0.5, pattern="2:4", progress=False)
    with pytest.raises(ValueError, match="sparsity=0.5"):
        fastprune.prune(model, fastprune.criteria.Magnitude(), 0.9, pattern="2:4", progress=False)
    with pytest.raises(ValueError, match="N:M"):
        fastprune.prune(model, fastprune.criteria.Magnitude(), 0.5, pattern="4:2", progress=False)
    with pytest.raises(ValueError, match="one step"):
        fastprune.prune(model, fastprune.criteria.Magnitude(), 0.5, pattern="2:4", steps=4, progress=False)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.skipif(not (torch.cuda.is_available() and _ops.has_cuda_kernels()), reason="needs CUDA kernels")
@pytest.mark.parametrize("m", [1, 5, 40])
def test_cuda_matches_cpu(m):
    mask = random_mask(37, 70, 0.2, "patterns")
    weight = torch.randn(37, 70) * mask
    csr, values = csr_of(weight, mask)
    x, dy = torch.randn(3, 70, m), torch.randn(3, 37, m)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)]:
        args = [t.cuda() for t in (csr.row_ptr, csr.col_idx)] + [values.to("cuda", dtype), x.to("cuda", dtype)]
        out = _ops.sparse_mm(*args)
        torch.testing.assert_close(out.float().cpu(), weight @ x, rtol=tol, atol=tol)
        dv = _ops.sparse_mm_values_grad(*args, dy.to("cuda", dtype))
        torch.testing.assert_close(dv.float().cpu(), torch.einsum("bom,bkm->ok", dy, x)[mask], rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("make,shape", [(mlp, (5, 64)), (cnn, (2, 3, 8, 8))])
def test_layers_left_dense_are_frozen_and_keep_their_pattern_in_training(make, shape):
    """Below min_sparsity (and the grouped conv) layers become Frozen* modules: same
    outputs, no pruning hook, and training moves only the kept weights."""
    model = make()
    fastprune.prune(model, fastprune.criteria.Magnitude(), 0.5, scope="layer", progress=False)
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    with torch.no_grad():
        ref = model(x)
    masks = {k[: -len("_mask")]: v.bool() for k, v in model.state_dict().items() if k.endswith("_mask")}
    converted, report = to_sparse(copy.deepcopy(model), x, calibrate=False)
    assert all(c.kernel == "dense" for c in report.layers)
    frozen = {n: m for n, m in converted.named_modules() if isinstance(m, (FrozenLinear, FrozenConv2d))}
    assert {f"{n}.weight" for n in frozen} == set(masks)
    assert not any(m._forward_pre_hooks for m in frozen.values())
    with torch.no_grad():
        torch.testing.assert_close(converted(x), ref, rtol=1e-6, atol=1e-6)
    start = {n: m.weight.detach().clone() for n, m in frozen.items()}
    for opt in (torch.optim.SGD(converted.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2),
                torch.optim.AdamW(converted.parameters(), lr=0.1, weight_decay=1e-2)):
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(converted.train()(x), y).backward()
            opt.step()
    for name, m in frozen.items():
        keep = masks[f"{name}.weight"]
        assert torch.equal(m.pattern, keep)
        assert (m.weight[~keep] == 0).all() and (m.weight.grad[~keep] == 0).all()
        assert (m.weight[keep] != start[name][keep]).all()  # every kept weight trained
    again = copy.deepcopy(converted)
    again.load_state_dict(converted.state_dict())
    back = to_dense(again)
    assert not any(isinstance(m, (FrozenLinear, FrozenConv2d)) for m in back.modules())
    for key, keep in masks.items():
        assert torch.equal(back.state_dict()[f"{key}_mask"].bool(), keep)


def test_freeze_dense_false_leaves_masked_layers():
    model = mlp()
    fastprune.prune(model, fastprune.criteria.Magnitude(), 0.5, scope="layer", progress=False)
    converted, _ = to_sparse(model, torch.randn(2, 64), calibrate=False, freeze_dense=False)
    assert not any(isinstance(m, (FrozenLinear, FrozenConv2d, SparseLinear)) for m in converted.modules())
    assert all(hasattr(converted[i], "weight_mask") for i in (0, 2, 4))


def test_two_four_detection_and_reasons_off_gpu():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    masks = fastprune.prune(model, fastprune.criteria.Magnitude(), 0.5, pattern="2:4", progress=False)
    assert all(is_two_four(m) for m in masks.values())
    assert not is_two_four(torch.rand(32, 64) > 0.5)
    assert not is_two_four(torch.ones(4, 6, dtype=torch.bool).tril())  # 6 inputs: no groups of 4
    assert is_two_four(torch.zeros(3, 8, dtype=torch.bool))  # fewer than 2 kept is fine too
    if not torch.cuda.is_available():
        assert "CUDA device" in semi_structured_reason(model[0], masks["0.weight"])
        with pytest.raises(ValueError, match="need a CUDA device"):
            SemiStructuredLinear(model[0], masks["0.weight"])
    assert "Linear" in semi_structured_reason(nn.Conv2d(4, 4, 1), torch.ones(4, 4, 1, 1))
    # Off the GPU a 2:4 model converts as any other: 50 % is below min_sparsity, so frozen dense.
    converted, report = to_sparse(model, torch.randn(2, 64), repeats=2)
    assert all(c.kernel == "dense" and c.semi_ms is None for c in report.layers)
    assert "2:4 ms" in str(report)


def _ampere():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.skipif(not _ampere(), reason="needs an Ampere or newer GPU")
def test_two_four_on_gpu_matches_dense_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64)).half().cuda().eval()
    fastprune.prune(model, fastprune.criteria.Magnitude(), 0.5, pattern="2:4", progress=False)
    x = torch.randn(64, 256, dtype=torch.half, device="cuda")
    with torch.no_grad():
        ref = model(x)
    converted, report = to_sparse(copy.deepcopy(model), x, calibrate=False)
    assert [c.kernel for c in report.layers] == ["2:4", "2:4"], str(report)
    assert isinstance(converted[0], SemiStructuredLinear)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), ref, rtol=1e-2, atol=1e-2)
    timed, report = to_sparse(copy.deepcopy(model), x, repeats=5)
    assert all(c.semi_ms is not None and c.dense_ms is not None for c in report.layers)
    save_sparse(converted, tmp_path / "m.safetensors")
    back = to_dense(converted)
    loaded = load_sparse(tmp_path / "m.safetensors", copy.deepcopy(back))
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(loaded(x), back(x), rtol=0, atol=0)


def test_pruning_a_converted_layer_asks_for_to_dense():
    model = mlp()
    fastprune.prune(model, fastprune.criteria.Magnitude(), 0.5, scope="layer", progress=False)
    converted, _ = to_sparse(model, torch.randn(2, 64), calibrate=False)
    before = copy.deepcopy(converted.state_dict())
    with pytest.raises(ValueError, match=r"\['0.weight', '2.weight', '4.weight'\] were converted .*to_dense"):
        fastprune.prune(converted, fastprune.criteria.Magnitude(), 0.8, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in converted.state_dict().items())
    fastprune.prune(to_dense(converted), fastprune.criteria.Magnitude(), 0.8, progress=False)
    assert fastprune.sparsity_report(converted, print_table=False)["global"]["sparsity"] > 0.79
