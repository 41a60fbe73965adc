"""The CUDA path against the CPU path: every op with a CUDA kernel (or a device-generic
composite built on cuBLAS/cuSOLVER through ATen) and the Python layer on top of them get
the same inputs on both devices. The CPU side is itself tested against independent
references elsewhere, so agreement here checks the CUDA kernels. Skipped without a
GPU and a build with FASTPRUNE_CUDA=1 (see README, "With CUDA")."""
import copy

import pytest
import torch
from torch import nn

import fastprune
from fastprune import _ops
from fastprune.criteria import Magnitude, WoodFisher
from fastprune.inverse import FisherInverse
from fastprune.sparse import to_dense, to_sparse

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _ops.has_cuda_kernels()),
                                reason="needs a GPU and the CUDA kernels (FASTPRUNE_CUDA=1)")
DEV = "cuda"
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def on_both(fn, *args):
    """fn on the CPU arguments and on copies moved to the GPU; returns (cpu, gpu moved back)."""
    cpu = fn(*args)
    gpu = fn(*[a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args])
    back = tuple(t.cpu() for t in gpu) if isinstance(gpu, tuple) else gpu.cpu()
    return cpu, back


def close(a, b, dtype):
    torch.testing.assert_close(b, a, rtol=TOL[dtype], atol=TOL[dtype])


# (N, G, T, K, O): rank-1 samples, grouped, positions, one sample, and enough per-sample
# gradients (70 x 300k) for several tiles.
SHAPES = [(9, 1, 1, 7, 5), (5, 3, 1, 4, 6), (4, 2, 9, 6, 5), (1, 1, 1, 1, 1), (70, 1, 2, 600, 500)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_grad_sq_sum_sq_per_sample(shape, dtype):
    n, g, t, k, o = shape
    x = torch.randn(n, g, k, t, dtype=torch.float64).transpose(2, 3).to(dtype)  # non-contiguous
    dy = torch.randn(n, g, t, o, dtype=torch.float64).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for cpu, gpu in zip(*on_both(_ops.grad_sq, x, dy)):
        assert gpu.dtype == acc
        close(cpu, gpu, dtype)
    for cpu, gpu in zip(*on_both(_ops.grad_bias_sq, x, dy)):
        assert gpu.dtype == acc
        close(cpu, gpu, dtype)
    if n * g * o * k <= 1 << 22:
        close(*on_both(_ops.per_sample_grads, x, dy), dtype)
    for cpu, gpu in zip(*on_both(_ops.sum_sq, dy)):
        close(cpu, gpu, dtype)


@pytest.mark.parametrize("cfg", [((4, 3, 9, 8), 32, (3, 3), (1, 1), (1, 1), (1, 1), 1),
                                 ((3, 8, 7, 11), 48, (3, 2), (2, 1), (0, 2), (2, 1), 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_conv_grad_bias_sq(cfg, dtype):
    shape, o, k, s, p, d, g = cfg
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    out = torch.nn.functional.conv2d(x.double(), torch.zeros(o, shape[1] // g, *k, dtype=torch.float64), None, s, p,
                                     d, g)
    dy = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    for cpu, gpu in zip(*on_both(_ops.conv_grad_bias_sq, x, dy, k, s, p, d, g, 0.5)):
        close(cpu, gpu, dtype)


@pytest.mark.parametrize("block", [1, 7, 64])
def test_grad_blocks_accumulate(block):
    x, dy = torch.randn(6, 3, 4, 5, dtype=torch.float64), torch.randn(6, 3, 4, 3, dtype=torch.float64)
    nb = -(-(3 * 3 * 5) // block)

    def run(x, dy):
        blocks = torch.zeros(nb, block, block, dtype=torch.float64, device=x.device)
        _ops.grad_blocks_accumulate(x, dy, blocks)
        return blocks
    close(*on_both(run, x, dy), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inverse_ops(dtype):
    grads = torch.randn(5, 12, 16, dtype=dtype)  # 5 blocks, 12 gradients of 16
    blocks = grads.transpose(1, 2) @ grads / 12
    inv_cpu, inv_gpu = on_both(_ops.fisher_inverse, blocks, 1e-2)
    close(inv_cpu, inv_gpu, dtype)
    close(*on_both(_ops.lowrank_factor, grads, 1e-2), dtype)


@pytest.mark.parametrize("lowrank", [False, True])
def test_fisher_inverse_with_pruned_slots(lowrank):
    n = 6 if lowrank else 80
    alive = torch.rand(130) > 0.4
    alive[:32] = True  # a fully alive block beside pruned ones
    grads = torch.randn(n, 130, dtype=torch.float64) * alive

    def run(g):
        inv = FisherInverse.from_grads(g, 1e-3, 32, alive=alive.to(g.device))
        return inv.diag(), inv.mul(torch.ones(130, 2, dtype=g.dtype, device=g.device))
    for cpu, gpu in zip(*on_both(run, grads)):
        close(cpu[alive], gpu[alive], torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_kth_smallest(dtype):
    tensors = [torch.randn(1000), torch.randn(37, 5), torch.empty(0), torch.randn(3, 3, 3) * 1e-30,
               torch.randn(70_000), torch.tensor([0.0, -0.0, 1.0, 1.0])]
    tensors = [t.to(dtype) for t in tensors]
    n = sum(t.numel() for t in tensors)
    for k in [1, 2, 17, n // 3, n // 2, n - 1, n]:
        value, less = fastprune.kth_smallest(tensors, k)
        value_gpu, less_gpu = fastprune.kth_smallest([t.to(DEV) for t in tensors], k)
        assert value_gpu.device.type == DEV
        assert value_gpu.item() == value.item() and less_gpu == less


def test_kth_smallest_rejects_nan():
    with pytest.raises(RuntimeError, match="NaN"):
        fastprune.kth_smallest([torch.tensor([1.0, float("nan")], device=DEV)], 1)


class Net(nn.Module):
    """Grouped and strided convs, eval BatchNorm, LayerNorm, Embedding, Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, groups=3, padding="valid")
        self.emb = nn.Embedding(11, 4)
        self.norm = nn.LayerNorm(6 * 3 * 3 + 4)
        self.fc = nn.Linear(6 * 3 * 3 + 4, 5)

    def forward(self, inputs):
        x, ids = inputs[:, :-1].view(-1, 3, 8, 8), inputs[:, -1].long()
        h = torch.tanh(self.conv2(torch.relu(self.bn(self.conv1(x))))).flatten(1)
        return self.fc(self.norm(torch.cat([h, self.emb(ids)], 1)))


def net_and_data(n=24, batch=8):
    torch.manual_seed(0)
    model = Net().double().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.cat([torch.randn(n, 3 * 8 * 8, dtype=torch.float64),
                   torch.randint(0, 11, (n, 1)).double()], 1)
    y = torch.randint(0, 5, (n,))
    return model, [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def to_device(data):
    return [(x.to(DEV), y.to(DEV)) for x, y in data]


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_fisher_diag_and_blocks(fisher):
    model, data = net_and_data()
    gpu = copy.deepcopy(model).to(DEV)
    diag, grad = fastprune.fisher_diag(model, data, fisher=fisher, return_grad=True, progress=False)
    diag_gpu, grad_gpu = fastprune.fisher_diag(gpu, to_device(data), fisher=fisher, return_grad=True,
                                               progress=False)
    assert list(diag_gpu) == list(diag)
    for k in diag:
        close(diag[k], diag_gpu[k].cpu(), torch.float64)
        close(grad[k], grad_gpu[k].cpu(), torch.float64)
    if fisher == "empirical":
        fb, fb_gpu = fastprune.FisherBlocks(model, 16), fastprune.FisherBlocks(gpu, 16)
        for (x, y), (xg, yg) in zip(data, to_device(data)):
            fb.accumulate(x, y)
            fb_gpu.accumulate(xg, yg)
        for name in fb.names:
            close(fb.blocks(name), fb_gpu.blocks(name).cpu(), torch.float64)


@pytest.mark.parametrize("criterion", [lambda: Magnitude(), lambda: WoodFisher(block_size=16, num_grads=20, damp=1e-3)])
def test_prune_matches_cpu(criterion):
    model, data = net_and_data()
    gpu = copy.deepcopy(model).to(DEV)
    masks = fastprune.prune(model, criterion(), 0.7, data=data, steps=2, progress=False)
    masks_gpu = fastprune.prune(gpu, criterion(), 0.7, data=to_device(data), steps=2, progress=False)
    for k in masks:
        assert torch.equal(masks_gpu[k].cpu(), masks[k]), k
    for (k, p), p_gpu in zip(model.named_parameters(), gpu.parameters()):
        close(p.detach(), p_gpu.detach().cpu(), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_to_sparse_on_gpu(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.Flatten(),
                          nn.Linear(16 * 6 * 6, 64), nn.ReLU(), nn.Linear(64, 10)).to(DEV, dtype).eval()
    fastprune.prune(model, Magnitude(), 0.9, progress=False)
    x = torch.randn(4, 8, 6, 6, device=DEV, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
    sparse, report = to_sparse(copy.deepcopy(model), x, min_sparsity=0.0, calibrate=False, freeze_dense=False)
    assert all(row.kernel != "dense" for row in report.layers), report
    with torch.no_grad():
        close(ref, sparse(x), dtype)
    xg = x.clone().requires_grad_()
    sparse(xg).float().sum().backward()
    assert xg.grad is not None and xg.grad.isfinite().all()
    with torch.no_grad():
        close(ref, to_dense(sparse)(x), dtype)


@pytest.mark.parametrize("args", [(16, 0.5, 0, 0), (16, 0.0, 2, 4), (8, 0.0, 4, 8), (128, 0.7, 0, 0)])
def test_sparsegpt_sweep_on_gpu(args):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 48, generator=gen, dtype=torch.float64)
    h = 2 / 300 * x.T @ x + 0.01 * torch.eye(48, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w = torch.randn(37, 48, generator=gen, dtype=torch.float64)
    (w_cpu, keep_cpu, loss_cpu), (w_gpu, keep_gpu, loss_gpu) = on_both(_ops.sparsegpt_sweep, w, u, *args)
    assert torch.equal(keep_cpu, keep_gpu)
    close(w_cpu, w_gpu, torch.float64)
    close(loss_cpu, loss_gpu, torch.float64)


def test_layerwise_blocks_pruned_on_the_gpu_for_a_cpu_model():
    # device="cuda": each block's copy moves to the GPU for its turn; the model stays on CPU
    # and ends with what pruning it all on CPU gives.
    transformers = pytest.importorskip("transformers")
    from fastprune.criteria import SparseGPT, Wanda
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    base = transformers.LlamaForCausalLM(cfg).double().eval()
    calib = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    for make in (lambda **k: SparseGPT(block_size=8, progress=False, **k), lambda **k: Wanda(progress=False, **k)):
        cpu, gpu = copy.deepcopy(base), copy.deepcopy(base)
        fastprune.prune(cpu, make(), 0.5, data=calib, progress=False)
        fastprune.prune(gpu, make(device=DEV), 0.5, data=calib, progress=False)
        for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
            assert b.device.type == "cpu", name
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10, msg=name)
