"""WoodFisher on the public checkpoints: MLPNet/MNIST quality and time, ResNet-20 timing.

Prints Markdown for benchmarks/RESULTS.md:
* MLPNet, 95 % global sparsity, whole-layer blocks, damp 1e-5, no fine-tuning: accuracy
  vs steps (1000 gradients a step; plus the published 100-gradient one-shot setting),
  wall time split into statistics (per-sample gradients) and inverse + OBS, and the
  WoodFisher-style pipeline's time for the 16-step run, measured on a few gradients and
  extrapolated (its whole-layer inverse is a dense P x P matrix per layer).
* ResNet-20 (CIFAR-10 checkpoint, random inputs): one WoodFisher step over all conv layers,
  B = 128, N = 1000: time and peak memory against the WoodFisher-style pipeline.
Usage: python benchmarks/woodfisher_runs.py
"""
import copy
import io
import resource
import sys
import time
from contextlib import redirect_stdout

import torch

sys.path.insert(0, "benchmarks")
import fastprune  # noqa: E402
from fastprune.criteria import WoodFisher  # noqa: E402
from fastprune.profiling import phase_times  # noqa: E402
from fastprune.bench.models import accuracy  # noqa: E402
from fastprune.bench.reference import load_mlpnet, load_mnist, load_resnet20  # noqa: E402
from woodfisher_style import per_sample_backward, sherman_morrison  # noqa: E402


def loader(x, y, seed=0):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=100, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def mlpnet_section():
    (xt, yt), (xs, ys) = load_mnist("train"), load_mnist("test")
    print("## WoodFisher on MLPNet / MNIST (public checkpoint, dense 93.97 %), 95 % global sparsity\n")
    print("Whole-layer blocks, damp 1e-5, no fine-tuning, seed 0 (published one-shot WoodFisher: 84.18 %). "
          "One run per row, so times carry the machine's +-15 % noise.\n")
    print("| steps | gradients / step | test accuracy | time (s) | statistics (s) | inverse + OBS (s) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    runs = [(1, 100)] + [(s, 1000) for s in (1, 2, 4, 8, 16)]
    for steps, n in runs:
        model = load_mlpnet()
        with phase_times() as clock:
            t0 = time.perf_counter()
            fastprune.prune(model, WoodFisher(block_size=None, num_grads=n, damp=1e-5), 0.95, data=loader(xt, yt),
                            loss_fn="nll", steps=steps, progress=False)
            total = time.perf_counter() - t0
        print(f"| {steps} | {n} | {accuracy(model, xs, ys) * 100:.2f} % | {total:.2f} | {clock['stats']:.2f} | "
              f"{total - clock['stats']:.2f} |")
    fast_16 = total
    # WoodFisher-style, same 16 x 1000 gradients: per-sample backward + rank-1 updates of each
    # layer's dense P x P inverse, timed on a few gradients and scaled.
    model = load_mlpnet()
    targets = fastprune.find_targets(model)
    k_bwd, k_sm = 100, 3
    t0 = time.perf_counter()
    grads = per_sample_backward(model, targets, xt[:k_bwd], yt[:k_bwd], loss="nll")
    bwd = (time.perf_counter() - t0) / k_bwd
    sm = 0.0
    for t in targets:
        g = grads[t.name][:k_sm]
        t0 = time.perf_counter()
        sherman_morrison(g, t.numel, 1e-5, total=1000)
        sm += (time.perf_counter() - t0) / k_sm
    est = 16 * 1000 * (bwd + sm)
    print(f"\n16 steps x 1000 gradients: fastprune {fast_16:.1f} s; WoodFisher-style estimate {est:.0f} s "
          f"({bwd * 1e3:.2f} ms backward + {sm * 1e3:.0f} ms Sherman-Morrison per gradient, from {k_bwd} backward "
          f"and {k_sm} rank-1 updates), i.e. {est / fast_16:.0f}x.\n")


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resnet_section():
    base = load_resnet20()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, 3, 32, 32, generator=gen), torch.randint(0, 10, (1000,), generator=gen)
    modules = [torch.nn.Conv2d]
    model = copy.deepcopy(base)
    before = peak_mib()

    with phase_times() as clock:
        t0 = time.perf_counter()
        fastprune.prune(model, WoodFisher(block_size=128, num_grads=1000, damp=1e-5), 0.5, data=[(x, y)],
                        loss_fn="cross_entropy", modules=modules, progress=False)
        fast = time.perf_counter() - t0
    peak = peak_mib() - before
    model = copy.deepcopy(base)
    targets = fastprune.find_targets(model, modules)
    k = 20
    t0 = time.perf_counter()
    grads = per_sample_backward(model, targets, x[:k], y[:k])
    bwd = (time.perf_counter() - t0) / k
    t0 = time.perf_counter()
    for t in targets:
        sherman_morrison(grads[t.name], 128, 1e-5, total=1000)
    sm = (time.perf_counter() - t0) / k
    est = 1000 * (bwd + sm)
    numel = sum(t.numel for t in targets)
    print("## One WoodFisher step on ResNet-20 (CIFAR-10 checkpoint, random inputs)\n")
    print(f"All {len(targets)} conv layers ({numel} weights), B = 128, N = 1000 gradients, 50 % sparsity, "
          "OBS update included.\n")
    print("| pipeline | time (s) | x fastprune |\n| --- | ---: | ---: |")
    print(f"| fastprune (statistics {clock['stats']:.2f} s, inverse + OBS {fast - clock['stats']:.2f} s) | "
          f"{fast:.2f} | 1.0 |")
    print(f"| WoodFisher-style (scaled from {k} gradients) | {est:.1f} | {est / fast:.1f} |")
    print(f"\nPeak extra memory of the fastprune step: {peak:.0f} MiB (RSS).\n")


if __name__ == "__main__":
    # Peak RSS only grows, so the ResNet-20 step (whose peak is reported) runs first, before the
    # MLPNet Sherman-Morrison baseline allocates its dense whole-layer inverse; it prints second.
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        resnet_section()
    mlpnet_section()
    print(buffer.getvalue(), end="")
