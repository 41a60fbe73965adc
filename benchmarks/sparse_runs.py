"""Sparse execution end to end: pruned models before and after fastprune.sparse.to_sparse,
and the size of save_sparse files. Prints a markdown section for RESULTS.md.

* MLPNet (the public WoodFisher checkpoint when ../shared has it, else random init) and
  LeNet-300-100, 95 % global magnitude sparsity, batch 1: the dense masked model vs
  to_sparse with the default min_sparsity (0.7) and with min_sparsity=0 (every pruned
  layer calibrated, kept dense only where measured slower), layers left dense frozen
  (the default) or, for comparison, left masked (freeze_dense=False).
* ResNet-20, 90 % global magnitude sparsity over its conv and linear weights, batch 1 and 64.
* A 3-layer Linear stack 1024-4096-1024-1024 at 95 % (per layer), batch 1, 64 and 256:
  to_sparse calibrated at all three batches against the same weights as torch.sparse CSR.
* File sizes: save_sparse of the 95 %-sparse models vs safetensors of the dense weights.
"""
import copy
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fastprune  # noqa: E402
from fastprune.bench.reference import MLPNet, load_mlpnet, resnet20  # noqa: E402
from fastprune.sparse import save_sparse, to_sparse  # noqa: E402


def median_ms(model, x, repeats=200):
    with torch.no_grad():
        for _ in range(10):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def mlpnet():
    try:
        return load_mlpnet(), "public checkpoint"
    except FileNotFoundError:
        torch.manual_seed(0)
        return MLPNet(), "random init (../shared missing)"


def lenet300():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)), \
        "random init"


def pruned(make, sparsity, modules=None):
    model, source = make()
    model.eval()
    fastprune.prune(model, fastprune.criteria.Magnitude(), sparsity, modules=modules, progress=False)
    return model, source


def speed_rows(name, model, x, label):
    rows = []
    for min_sparsity, freeze in ((0.7, True), (0.0, True), (0.7, False)):
        converted, report = to_sparse(copy.deepcopy(model), x, min_sparsity=min_sparsity, freeze_dense=freeze)
        # Timed back to back after the calibration, so both see the same warm caches.
        dense, t = median_ms(model, x), median_ms(converted, x)
        n_sparse = sum(c.kernel == "sparse" for c in report.layers)
        rows.append(f"| {name} | {label} | {min_sparsity} | {n_sparse}/{len(report.layers)} | "
                    f"{'frozen' if freeze else 'masked'} | {dense:.3f} | {t:.3f} | {dense / t:.2f} |")
    return rows


class CSRStack(nn.Module):
    """The pruned stack's weights as torch.sparse CSR matrices, ReLU between them."""

    def __init__(self, linears):
        super().__init__()
        self.layers = [(lin.weight.detach().to_sparse_csr(), lin.bias.detach()) for lin in linears]

    def forward(self, x):
        for i, (w, b) in enumerate(self.layers):
            x = torch.sparse.mm(w, x.t()).t() + b
            x = torch.relu(x) if i < len(self.layers) - 1 else x
        return x


def stack_rows():
    torch.manual_seed(0)
    dims = [1024, 4096, 1024, 1024]
    model = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())][:-1]).eval()
    fastprune.prune(model, fastprune.criteria.Magnitude(), 0.95, scope="layer", progress=False)
    fastprune.remove_masks(model)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    csr = CSRStack(linears)
    masked = copy.deepcopy(model)
    fastprune.prune(masked, fastprune.criteria.Magnitude(), 0.95, scope="layer", progress=False)
    batches = (1, 64, 256)
    converted, report = to_sparse(masked, [torch.randn(b, 1024) for b in batches], min_sparsity=0.0)
    n_sparse = sum(c.kernel == "sparse" for c in report.layers)
    rows = []
    for b in batches:
        x = torch.randn(b, 1024)
        t_csr, t_dense, t_ours = median_ms(csr, x), median_ms(model, x), median_ms(converted, x)
        rows.append(f"| {b} | {n_sparse}/3 | {t_dense:.3f} | {t_csr:.3f} | {t_ours:.3f} | {t_csr / t_ours:.2f} | "
                    f"{t_dense / t_ours:.2f} |")
    return rows


def size_row(name, model):
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as tmp:
        info = save_sparse(model, os.path.join(tmp, "sparse.safetensors"))
        plain = copy.deepcopy(model)
        fastprune.remove_masks(plain)
        dense_path = os.path.join(tmp, "dense.safetensors")
        save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, dense_path)
        dense = os.path.getsize(dense_path)
    kinds = sorted(set(info["encodings"].values()))
    return f"| {name} | {dense / 1024:.1f} | {info['file_bytes'] / 1024:.1f} | {100 * info['file_bytes'] / dense:.1f} % | " \
           f"{', '.join(kinds)} |"


def main():
    torch.manual_seed(0)
    net, net_src = pruned(mlpnet, 0.95)
    lenet, lenet_src = pruned(lenet300, 0.95)
    resnet = resnet20().eval()
    fastprune.prune(resnet, fastprune.criteria.Magnitude(), 0.9, progress=False)
    print("## Sparse execution end to end (`to_sparse`), forward under `torch.no_grad()`\n")
    print(f"Global magnitude pruning; MLPNet: {net_src}, LeNet-300-100 and ResNet-20: random init. Dense = the "
          "masked model as `torch.nn.utils.prune` runs it. Medians of 200 calls; a row where no layer was replaced "
          "shows this machine's run-to-run noise. Layers left dense are FrozenLinear/FrozenConv2d (masked weight stored "
          "once) by default, or stay masked with `freeze_dense=False`.\n")
    print("| model | input | min_sparsity | sparse layers | layers left dense | dense masked (ms) | to_sparse (ms) "
          "| speedup |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    rows = speed_rows("MLPNet 95 %", net, torch.randn(1, 784), "batch 1")
    rows += speed_rows("LeNet-300-100 95 %", lenet, torch.randn(1, 784), "batch 1")
    rows += speed_rows("ResNet-20 90 %", resnet, torch.randn(1, 3, 32, 32), "batch 1")
    rows += speed_rows("ResNet-20 90 %", resnet, torch.randn(64, 3, 32, 32), "batch 64")
    print("\n".join(rows))
    print("\n## A 1024-4096-1024-1024 Linear stack at 95 %: `to_sparse` against torch.sparse CSR\n")
    print("Magnitude per layer; `to_sparse` calibrated on batches of 1, 64 and 256 at once (a layer goes sparse "
          "only where it is faster at all three, then the whole model is checked); torch CSR: the same weights "
          "as `torch.sparse.mm` per layer. Medians of 200 calls.\n")
    print("| batch | sparse layers | dense (ms) | torch CSR (ms) | to_sparse (ms) | x CSR | x dense |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(stack_rows()))
    print("\n## Storage: `save_sparse` vs the dense weights in safetensors\n")
    print("| model | dense (KiB) | save_sparse (KiB) | ratio | encodings |\n| --- | ---: | ---: | ---: | --- |")
    print(size_row("MLPNet 95 %", net))
    print(size_row("LeNet-300-100 95 %", lenet))
    print(size_row("ResNet-20 90 %", resnet))
    print()


if __name__ == "__main__":
    main()
