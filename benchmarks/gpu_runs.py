"""GPU measurements for the CUDA parts of the statistics and sparse-execution work.
Prints markdown sections for benchmarks/RESULTS.md. `make bench-gpu` builds the CUDA
kernels, runs the test suite (tests/test_cuda.py included), then this script.
`--quick` shrinks every size: a smoke test that also runs on CPU, where the 2:4
section is skipped.

* Fisher diagonal + mean gradient (fisher_diag, return_grad=True) against a plain
  training step of the same batch, and torch.func per-sample gradients: the 3-layer
  CNN of the CPU benchmark (batch 128) and CIFAR ResNet-20 (eval-mode BatchNorm,
  batch 128 and 512).
* 2:4 semi-structured Linear (SemiStructuredLinear, cuSPARSELt/CUTLASS) against the
  dense masked layer (cuBLAS), 4096x4096, float16 and bfloat16.
* The unstructured sparse_mm kernel (SparseLinear) against dense cuBLAS, 4096x4096,
  float32 and float16, over a sparsity grid: speedups and the break-even sparsity.
* SparseGPT's column sweep (sparsegpt_sweep) against the same algorithm in torch ops
  on the same device, 4096x4096, 50 % and 2:4.
"""
import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fastprune  # noqa: E402
from fastprune.criteria import Magnitude  # noqa: E402
from fastprune.bench.reference import resnet20  # noqa: E402
from fastprune.sparse import SemiStructuredLinear, SparseLinear  # noqa: E402
from models import cnn  # noqa: E402
from test_bench_fisher import fastprune_diag, plain_step, torch_func  # noqa: E402
from test_bench_sweep import torch_sweep  # noqa: E402


def median_ms(fn, device, repeats, warmup=3):
    """Median wall time of fn() in ms; on CUDA between events around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def fisher_section(device, quick):
    print("## GPU: Fisher diagonal + mean gradient vs a plain training step\n")
    print("Median of 20 calls (CUDA events). Ratios are to the step of the same model and batch.\n")
    print("| model | batch | step (ms) | fastprune (ms) | x step | torch.func (ms) | x step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    batches = {"cnn": [8] if quick else [128], "resnet20": [8] if quick else [128, 512]}
    for name, sizes in batches.items():
        for batch in sizes:
            torch.manual_seed(0)
            if name == "cnn":
                model, x, y = cnn(batch)
            else:
                model, x, y = resnet20(), torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
            model, x, y = model.to(device).eval(), x.to(device), y.to(device)
            repeats = 3 if quick else 20
            t_step = median_ms(lambda: plain_step(model, x, y), device, repeats)
            t_fp = median_ms(lambda: fastprune_diag(model, x, y), device, repeats)
            t_func = median_ms(lambda: torch_func(model, x, y), device, repeats)
            print(f"| {name} | {batch} | {t_step:.2f} | {t_fp:.2f} | {t_fp / t_step:.2f} | {t_func:.2f} | "
                  f"{t_func / t_step:.2f} |")
    print()


def two_four_section(device, quick):
    print("## GPU: 2:4 semi-structured Linear vs dense, 4096x4096\n")
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        print("Skipped: needs an Ampere or newer GPU.\n")
        return
    size = 1024 if quick else 4096
    print("Weights pruned to 2:4 by magnitude (`fastprune.prune(..., pattern='2:4')`); dense = the same masked "
          "weight through cuBLAS. Median of 50 calls.\n")
    print("| dtype | batch | dense (ms) | 2:4 (ms) | speedup |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for dtype in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        layer = nn.Sequential(nn.Linear(size, size)).to(device, dtype).eval()
        mask = fastprune.prune(layer, Magnitude(), 0.5, pattern="2:4", progress=False)["0.weight"]
        weight, bias = layer[0].weight.detach().clone(), layer[0].bias.detach()
        semi = SemiStructuredLinear(layer[0], mask)
        for batch in ([64] if quick else [16, 64, 256, 1024, 4096]):
            x = torch.randn(batch, size, device=device, dtype=dtype)
            with torch.no_grad():
                torch.testing.assert_close(semi(x), F.linear(x, weight, bias), rtol=2e-2, atol=2e-2)
                t_dense = median_ms(lambda: F.linear(x, weight, bias), device, 50)
                t_semi = median_ms(lambda: semi(x), device, 50)
            print(f"| {str(dtype).replace('torch.', '')} | {batch} | {t_dense:.4f} | {t_semi:.4f} | "
                  f"{t_dense / t_semi:.2f} |")
    print()


def break_even_section(device, quick):
    size = 256 if quick else 4096
    grid = [0.5, 0.9] if quick else [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]
    batches = [1, 8] if quick else [1, 8, 64, 256]
    dtypes = [torch.float32] + ([torch.float16] if device.type == "cuda" else [])
    print(f"## {device.type.upper()}: unstructured sparse_mm (SparseLinear) vs dense, {size}x{size}\n")
    print("Speedup over dense `F.linear` with the masked weight (cuBLAS on CUDA), random masks, median of 50 "
          "calls; break-even = the lowest sparsity of the grid from which the kernel is faster.\n")
    for dtype in dtypes:
        speed = {}
        for sparsity in grid:
            gen = torch.Generator().manual_seed(0)
            lin = nn.Linear(size, size)
            mask = torch.rand(size, size, generator=gen) >= sparsity
            with torch.no_grad():
                lin.weight.mul_(mask)
            lin = lin.to(device, dtype)
            sparse = SparseLinear.from_dense(lin, mask.to(device))
            for batch in batches:
                x = torch.randn(batch, size, device=device, dtype=dtype)
                with torch.no_grad():
                    t_dense = median_ms(lambda: lin(x), device, 50)
                    t_sparse = median_ms(lambda: sparse(x), device, 50)
                speed[sparsity, batch] = t_dense / t_sparse
        print(f"{str(dtype).replace('torch.', '')}:\n")
        print("| sparsity | " + " | ".join(f"batch {b}" for b in batches) + " |")
        print("| ---: |" + " ---: |" * len(batches))
        for sparsity in grid:
            print(f"| {sparsity:.2f} | " + " | ".join(f"{speed[sparsity, b]:.2f}x" for b in batches) + " |")
        even = []
        for b in batches:
            above = [s for s in grid if all(speed[t, b] >= 1.0 for t in grid if t >= s)]
            even.append(f"{min(above):.2f}" if above else f"> {grid[-1]:.2f}")
        print("| break-even | " + " | ".join(even) + " |\n")


def sweep_section(device, quick):
    size = 256 if quick else 4096
    print(f"## {device.type.upper()}: SparseGPT column sweep vs the same algorithm in torch ops, {size}x{size}\n")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * size, size, generator=gen) / size ** 0.5
    h = 2 / len(x) * x.T @ x
    h.diagonal().add_(0.01 * float(h.diagonal().mean()))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(device)
    w = torch.randn(size, size, generator=gen).to(device)
    print("| pattern | fastprune (ms) | torch ops (ms) | speedup |")
    print("| --- | ---: | ---: | ---: |")
    for name, args in (("50 %", (128, 0.5, 0, 0)), ("2:4", (128, 0.0, 2, 4))):
        fast = median_ms(lambda: fastprune._ops.sparsegpt_sweep(w, u, *args), device, 3, warmup=1)
        slow = median_ms(lambda: torch_sweep(w, u, *args), device, 1, warmup=0)
        print(f"| {name} | {fast:.1f} | {slow:.1f} | {slow / fast:.2f}x |")
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, also on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"<!-- gpu_runs.py on {name}; torch {torch.__version__}; {datetime.date.today()} -->\n")
    if device.type == "cuda" and not fastprune._ops.has_cuda_kernels():
        sys.exit("fastprune was built without its CUDA kernels: reinstall with FASTPRUNE_CUDA=1")
    fisher_section(device, args.quick)
    two_four_section(device, args.quick)
    break_even_section(device, args.quick)
    sweep_section(device, args.quick)


if __name__ == "__main__":
    main()
