"""The statistics' cost against a plain training step on the three models of the
statistics bar: LeNet-300-100 at batch 256, the 3-conv CNN at 128, the token FFN at 64.
``fisher_diag`` (one-shot) and a reused ``FisherCollector`` against ``step`` (zero_grad,
forward, cross-entropy, backward), called in rotation so that drift hits all three,
each rotation starting with a different one (the call after another sees its caches).
Prints one markdown table; ``--label`` names the run (e.g. the allocator settings).

    python benchmarks/stats_overhead.py --label "glibc defaults"
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import fastprune  # noqa: E402
from llm_runs import cpu_model  # noqa: E402
from models import make  # noqa: E402

MODELS = {"LeNet-300-100, batch 256": "mlp-256", "3-conv CNN, batch 128": "cnn-128", "token FFN, batch 64": "ffn-64"}


def rotation_medians(fns: list, rounds: int) -> list[float]:
    for f in fns:
        for _ in range(3):
            f()
    times = [[] for _ in fns]
    for r in range(rounds):
        for i in range(len(fns)):
            j = (i + r) % len(fns)
            start = time.perf_counter()
            fns[j]()
            times[j].append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--label", default="glibc defaults")
    args = p.parse_args()
    print(f"### Statistics vs a training step: {args.label}\n")
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {args.rounds} rotations, medians; allocator "
          f"environment: {malloc or 'none'}.\n")
    print("| model | step (ms) | fisher_diag (ms) | x step | FisherCollector (ms) | x step |\n|---|---|---|---|---|---|")
    for label, key in MODELS.items():
        model, x, y = make(key)
        collector = fastprune.FisherCollector(model)

        def step():
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()

        def one_shot():
            fastprune.fisher_diag(model, [(x, y)], return_grad=True, progress=False)

        def reused():
            collector([(x, y)], return_grad=True, progress=False)
        s, d, c = rotation_medians([step, one_shot, reused], args.rounds)
        print(f"| {label} | {s:.2f} | {d:.2f} | {d / s:.2f} | {c:.2f} | {c / s:.2f} |", flush=True)
    print()


if __name__ == "__main__":
    main()
