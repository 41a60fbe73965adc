"""``make demo``: train an MLP on scikit-learn's digits, prune it with every
foundation criterion at several sparsities, and print test accuracy and sparsity."""
from __future__ import annotations

import copy
import time

import torch

from . import criteria, prune, sparsity_report
from .data import load_digits
from .models import accuracy, mlp, train

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
RUNS = (
    ("magnitude", "global", criteria.Magnitude()),
    ("magnitude", "layer", criteria.Magnitude()),
    ("random-uniform", "layer", criteria.Random(seed=0)),
    ("random-erk", "erk", criteria.Random(seed=0, distribution="erk")),
)


def main() -> None:
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_digits()
    start = time.perf_counter()
    dense = train(mlp(), x_tr, y_tr)
    print(f"dense MLP 64-128-64-10 on digits: test accuracy {accuracy(dense, x_te, y_te):.2%} "
          f"(trained in {time.perf_counter() - start:.1f}s, {len(x_tr)} train / {len(x_te)} test images)\n")
    print(f"{'criterion':<16}{'scope':<8}" + "".join(f"{f's={s:.0%}':>14}" for s in SPARSITIES))
    for name, scope, criterion in RUNS:
        cells = []
        for s in SPARSITIES:
            model = copy.deepcopy(dense)
            prune(model, criterion, s, scope="global" if scope == "erk" else scope, progress=False)
            got = sparsity_report(model, print_table=False)["global"]["sparsity"]
            cells.append(f"{accuracy(model, x_te, y_te):7.2%} ({got:.1%})")
        print(f"{name:<16}{scope:<8}" + "".join(f"{c:>14}" for c in cells))
    print("\ncells: test accuracy right after pruning, no fine-tuning (achieved global sparsity)")


if __name__ == "__main__":
    main()
