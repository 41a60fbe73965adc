"""``make demo``: train an MLP on scikit-learn's digits, prune it with every
criterion (one-shot and in several steps) at several sparsities, and print test
accuracy and sparsity."""
from __future__ import annotations

import copy
import time

import torch

from . import criteria, prune, sparsity_report
from .data import load_digits
from .models import accuracy, mlp, train

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
# (criterion name, scope, criterion, steps)
RUNS = (
    ("magnitude", "global", criteria.Magnitude(), 1),
    ("magnitude", "layer", criteria.Magnitude(), 1),
    ("random-uniform", "layer", criteria.Random(seed=0), 1),
    ("random-erk", "erk", criteria.Random(seed=0, distribution="erk"), 1),
    ("taylor (LM)", "global", criteria.Taylor(), 1),
    ("OBD", "global", criteria.OBD(fisher="true"), 1),
    ("QM", "global", criteria.QM(fisher="true"), 1),
    ("QM", "global", criteria.QM(fisher="true"), 8),
    ("woodfisher", "global", criteria.WoodFisher(block_size=None, num_grads=512, damp=1e-4), 1),
    ("woodfisher", "global", criteria.WoodFisher(block_size=None, num_grads=512, damp=1e-4), 8),
)


def main() -> None:
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_digits()
    start = time.perf_counter()
    dense = train(mlp(), x_tr, y_tr)
    print(f"dense MLP 64-128-64-10 on digits: test accuracy {accuracy(dense, x_te, y_te):.2%} "
          f"(trained in {time.perf_counter() - start:.1f}s, {len(x_tr)} train / {len(x_te)} test images)\n")
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_tr, y_tr), batch_size=256, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))
    print(f"{'criterion':<16}{'scope':<8}{'steps':>6}" + "".join(f"{f's={s:.0%}':>15}" for s in SPARSITIES))
    for name, scope, criterion, steps in RUNS:
        cells = []
        for s in SPARSITIES:
            model = copy.deepcopy(dense)
            prune(model, criterion, s, data=data, loss_fn="cross_entropy", steps=steps,
                  scope="global" if scope == "erk" else scope, progress=False)
            got = sparsity_report(model, print_table=False)["global"]["sparsity"]
            cells.append(f"{accuracy(model, x_te, y_te):7.2%} ({got:.1%})")
        print(f"{name:<16}{scope:<8}{steps:>6}" + "".join(f"{c:>15}" for c in cells))
    print("\ncells: test accuracy right after pruning, no fine-tuning (achieved global sparsity); second-order\n"
          "criteria use the training set (QM/OBD: true Fisher; WoodFisher: 512 gradients a step, whole layers)")


if __name__ == "__main__":
    main()
