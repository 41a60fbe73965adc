"""SmolLM2-135M pruned layer-wise: fastprune's SparseGPT and Wanda against the reference
pipelines (llm_reference.py) in one process, perplexity on the Python docs (the
calibration domain, held-out windows) and on scikit-learn's dataset descriptions (a
second domain), pruning time (calibration forwards + statistics + pruning) and peak
resident memory. Prints a markdown section for RESULTS.md, row by row.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/llm_runs.py [--sparsities 0.5,2:4] [--methods wanda,sparsegpt]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llm_reference import reference_prune  # noqa: E402

from fastprune import prune, remove_masks  # noqa: E402
from fastprune.bench import llm  # noqa: E402
from fastprune.criteria import SparseGPT, Wanda  # noqa: E402
from fastprune.criteria.layerwise import block_layers, find_blocks  # noqa: E402
from fastprune.profiling import phase_times  # noqa: E402


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                flags = open("/proc/cpuinfo").read()
                ext = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
                return f"{line.split(':', 1)[1].strip()} ({ext})"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sparsities", default="0.5,0.6,0.7,2:4,4:8")
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--ours-only", default="magnitude,sparsegpt-ts", help="fastprune methods without a reference")
    p.add_argument("--variants", default="0.5,0.7,2:4", help="sparsities of the beyond-the-papers table ('' skips)")
    args = p.parse_args()
    model, tok = llm.load_causal_lm("smollm2")
    docs = tok(llm.python_docs_text(), return_tensors="pt").input_ids[0]
    other = tok(llm.dataset_descriptions_text(), return_tensors="pt").input_ids[0]
    calib = llm.calibration_windows(docs, 64, 256, 0)
    evals = {"docs": llm.evaluation_windows(docs, 48, 256, len(docs) // 2),
             "datasets": llm.evaluation_windows(other, 48, 256)}
    blocks, layers = find_blocks(model), block_layers(model)[0]
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"## Language models: SmolLM2-135M pruned layer-wise (`benchmarks/llm_runs.py`)\n")
    print(f"{date.today()}, {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}. Calibration: 64 windows of 256 tokens "
          f"(seed 0) from the first half of the Python docs ({len(docs)} tokens); perplexity on 48 windows of the "
          f"second half (docs) and on {len(evals['datasets'])} windows of scikit-learn's dataset descriptions "
          "(datasets). Time: calibration forwards + statistics + pruning; fastprune gets the 64 windows in batches "
          "of 8 (true sequential: one batch of 64, pruned in one forward per block), the reference runs them one "
          "at a time as its code does. Peak: resident memory of the process during pruning (its growth over the "
          "start of the call in brackets); the model is 513 MiB, one block's calibration inputs 36 MiB.\n",
          flush=True)
    ppl = {k: llm.perplexity(model, w) for k, w in evals.items()}
    print(f"Dense perplexity: docs {ppl['docs']:.2f}, datasets {ppl['datasets']:.2f}.\n")
    print("| method | sparsity | ppl docs (ref) | ppl docs | ppl datasets (ref) | ppl datasets | time ref (s) | "
          "time (s) | speed-up | forward / hessian / cholesky / sweep (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)

    def restore():
        remove_masks(model)
        model.load_state_dict(dense)

    def ours(method, spec, crit=None, steps=1):
        sparsity, pattern = llm._sparsity(spec)
        crit = crit or llm.METHODS[method][0]()
        base = llm._rss()
        with phase_times() as times, llm._PeakRSS() as mem:
            start = time.perf_counter()
            prune(model, crit, sparsity, data=llm.calibration_batches(crit, calib, 8), pattern=pattern,
                  modules=layers, scope="layer", steps=steps, progress=False)
            seconds = time.perf_counter() - start
        result = ({k: llm.perplexity(model, w) for k, w in evals.items()}, seconds,
                  " / ".join(f"{times.get(k, 0.0):.1f}" for k in ("forward", "hessian", "cholesky", "sweep")),
                  f"{mem.peak / 2**20:.0f} (+{(mem.peak - base) / 2**20:.0f})")
        restore()
        return result

    def reference(method, spec):
        sparsity, pattern = llm._sparsity(spec)
        n = m = 0
        if pattern:
            keep, m = (int(v) for v in pattern.split(":"))
            n = m - keep
        start = time.perf_counter()
        reference_prune(model, blocks, calib, method, sparsity, n, m)
        seconds = time.perf_counter() - start
        result = ({k: llm.perplexity(model, w) for k, w in evals.items()}, seconds)
        restore()
        return result

    methods = [m for m in args.methods.split(",") if m]
    for spec in [s for s in args.sparsities.split(",") if s]:
        for method in methods:
            (rp, rt), (op, ot, split, peak) = reference(method, spec), ours(method, spec)
            print(f"| {method} | {spec} | {rp['docs']:.2f} | {op['docs']:.2f} ({op['docs'] / rp['docs']:.3f}x) | "
                  f"{rp['datasets']:.2f} | {op['datasets']:.2f} ({op['datasets'] / rp['datasets']:.3f}x) | {rt:.1f} | "
                  f"{ot:.1f} | {rt / ot:.2f}x | {split} | {peak} |", flush=True)
        for method in [m for m in args.ours_only.split(",") if m]:
            op, ot, split, peak = ours(method, spec)
            print(f"| {method} | {spec} | | {op['docs']:.2f} | | {op['datasets']:.2f} | | {ot:.1f} | | {split} | "
                  f"{peak} |", flush=True)
    variants = [s for s in args.variants.split(",") if s]
    if not variants:
        return
    print("\n### Beyond the papers: non-uniform sparsity (OWL), several steps, least-squares refit\n")
    print("Same protocol; `steps=4` recalibrates on the pruned model between the steps of the geometric schedule; "
          "`refit` runs 30 conjugate-gradient iterations of the kept weights' normal equations per layer.\n")
    print("| configuration | sparsity | ppl docs | ppl datasets | time (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|", flush=True)
    configs = {
        "SparseGPT": (lambda: SparseGPT(progress=False), 1),
        "SparseGPT, OWL": (lambda: SparseGPT(block_sparsity="owl", progress=False), 1),
        "SparseGPT, refit": (lambda: SparseGPT(refit_iters=30, progress=False), 1),
        "SparseGPT, 4 steps": (lambda: SparseGPT(progress=False), 4),
        "SparseGPT, OWL, 4 steps, refit": (lambda: SparseGPT(block_sparsity="owl", refit_iters=30, progress=False), 4),
        "Wanda, OWL": (lambda: Wanda(block_sparsity="owl", progress=False), 1),
    }
    for spec in variants:
        for name, (make, steps) in configs.items():
            if ":" in spec and ("OWL" in name or steps > 1):
                continue  # N:M is one pattern in every layer, in one step
            op, ot, _, peak = ours(name, spec, make(), steps)
            print(f"| {name} | {spec} | {op['docs']:.2f} | {op['datasets']:.2f} | {ot:.1f} | {peak} |", flush=True)


if __name__ == "__main__":
    main()
