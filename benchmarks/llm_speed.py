"""Tokens per second of SmolLM2-135M pruned per matrix (the masks' layout is what the
kernels see; which criterion chose them does not matter for speed), dense against
masked against ``to_sparse``, at decode (one new token per sequence, 128 cached) and
prefill (128 tokens), batch 1 and 16, in one process. Prints a markdown section.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/llm_speed.py
"""
from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llm_runs import cpu_model  # noqa: E402

from fastprune import prune  # noqa: E402
from fastprune.bench import llm  # noqa: E402
from fastprune.criteria import Magnitude  # noqa: E402
from fastprune.criteria.layerwise import block_layers  # noqa: E402
from fastprune.sparse import to_sparse  # noqa: E402


@torch.no_grad()
def tokens_per_second(model, batch: int, mode: str, repeats: int = 5) -> float:
    """Median tokens per second of ``repeats`` timed calls (decode: 4x as many, each on its
    own copy of the 128-token cache, copied before the clock starts)."""
    ids = torch.randint(0, 1000, (batch, 129), generator=torch.Generator().manual_seed(0))
    if mode == "prefill":
        runs, tokens = [lambda: model(input_ids=ids[:, :128], use_cache=False)] * (repeats + 1), batch * 128
    else:
        cache = model(input_ids=ids[:, :128], use_cache=True).past_key_values
        copies = [copy.deepcopy(cache) for _ in range(4 * repeats + 1)]
        runs = [lambda c=c: model(input_ids=ids[:, 128:], past_key_values=c, use_cache=True) for c in copies]
        tokens = batch
    runs[0]()
    times = []
    for run in runs[1:]:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return tokens / sorted(times)[len(times) // 2]


def main() -> None:
    model, _ = llm.load_causal_lm("smollm2")
    layers = block_layers(model)[0]
    print("## Language models: tokens per second after pruning (`benchmarks/llm_speed.py`)\n")
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; SmolLM2-135M's block Linears pruned per matrix by "
          "magnitude (embeddings and head dense); decode: one token per sequence after 128 cached (20 calls, "
          "the cache copied outside the clock); prefill: 128 tokens (5 calls). `to_sparse` times each layer dense and sparse at the measured shape, keeps the faster, then "
          "checks the whole model and moves the smallest gains back to dense until it is faster.\n")
    print("| sparsity | mode | batch | dense tok/s | masked tok/s | to_sparse tok/s | to_sparse / dense | layers "
          "sparse |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for sparsity in (0.5, 0.7):
        for mode in ("decode", "prefill"):
            for batch in (1, 16):
                dense = tokens_per_second(model, batch, mode)
                pruned = copy.deepcopy(model)
                prune(pruned, Magnitude(), sparsity, modules=layers, scope="layer", progress=False)
                masked = tokens_per_second(pruned, batch, mode)
                example = torch.zeros(batch, 1 if mode == "decode" else 128, dtype=torch.long)
                _, report = to_sparse(pruned, example, min_sparsity=0.0, repeats=5)
                fast = tokens_per_second(pruned, batch, mode)
                chosen = sum(1 for c in report.layers if c.kernel != "dense")
                print(f"| {sparsity:.0%} | {mode} | {batch} | {dense:.0f} | {masked:.0f} | {fast:.0f} | "
                      f"{fast / dense:.2f}x | {chosen} / {len(layers)} |", flush=True)
                del pruned


if __name__ == "__main__":
    main()
