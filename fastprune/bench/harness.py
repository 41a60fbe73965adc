"""The criteria comparison behind ``fastprune bench``: train (or load) a dense model,
prune copies with every criterion at every sparsity and step count, optionally fine-tune
with the masks kept, and measure the ShrinkBench metrics plus wall time."""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import criteria as C
from ..pruning import prune
from ..profiling import phase_times
from .models import accuracy, train

__all__ = ["BenchConfig", "CRITERIA", "run", "summarize", "findings", "flops", "config_dict"]

# name -> (factory(config, seed), scope). OBD and QM use the true Fisher diagonal (the
# loss-modelling paper's choice); WoodFisher whole-layer blocks with config's num_grads/damp.
CRITERIA = {
    "magnitude": (lambda cfg, seed: C.Magnitude(), "global"),
    "random": (lambda cfg, seed: C.Random(seed=seed), "layer"),
    "erk": (lambda cfg, seed: C.Random(seed=seed, distribution="erk"), "global"),
    "taylor": (lambda cfg, seed: C.Taylor(max_samples=cfg.fisher_samples), "global"),
    "qm": (lambda cfg, seed: C.QM(fisher="true", max_samples=cfg.fisher_samples), "global"),
    "obd": (lambda cfg, seed: C.OBD(fisher="true", max_samples=cfg.fisher_samples), "global"),
    "woodfisher": (lambda cfg, seed: C.WoodFisher(block_size=None, num_grads=cfg.num_grads, damp=cfg.damp), "global"),
    "snip": (lambda cfg, seed: C.SNIP(), "global"),
}


@dataclass
class BenchConfig:
    criteria: list[str] = field(default_factory=lambda: ["magnitude", "random", "taylor", "qm", "obd", "woodfisher"])
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9, 0.95])
    steps: list[int] = field(default_factory=lambda: [1, 8])
    seeds: list[int] = field(default_factory=lambda: [0])
    finetune_epochs: int = 0
    batch_size: int = 256
    num_grads: int = 512
    damp: float = 1e-4
    # Samples behind each step's Fisher diagonal and gradient (Taylor, QM, OBD), drawn
    # afresh from the shuffled training set: the budget of WoodFisher's num_grads, not the
    # whole set (a 60k-sample true Fisher is ten backward passes over MNIST per step).
    fisher_samples: int | None = 1024

    def __post_init__(self):
        unknown = [c for c in self.criteria if c not in CRITERIA]
        if unknown:
            raise ValueError(f"unknown criteria {unknown}; choose from {sorted(CRITERIA)}")
        bad = [s for s in self.sparsities if not 0.0 <= s < 1.0]
        if bad:
            raise ValueError(f"sparsities must be fractions in [0, 1), got {bad}")
        if any(s < 1 for s in self.steps) or self.finetune_epochs < 0:
            raise ValueError("steps must be >= 1 and finetune_epochs >= 0")
        if self.fisher_samples is not None and self.fisher_samples < 1:
            raise ValueError(f"fisher_samples must be >= 1 (or None for the whole training set), got "
                             f"{self.fisher_samples}")


def flops(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(dense, remaining) multiply-adds of the Linear/Conv layers for one input: each
    weight counts once per output position, pruned weights not at all."""
    counts = []

    def hook(module, args, out):
        positions = out[0, 0].numel() if isinstance(module, nn.modules.conv._ConvNd) else out[0].numel() // out.shape[-1]
        weight = module.weight.detach()
        counts.append((weight.numel() * positions, int(weight.count_nonzero()) * positions))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return sum(c[0] for c in counts), sum(c[1] for c in counts)




@torch.no_grad()
def _loss(model, x, y) -> float:
    return nn.functional.cross_entropy(model(x), y).item()


def run(dense: nn.Module, x_tr, y_tr, x_te, y_te, config: BenchConfig, progress: bool = True) -> list[dict]:
    """One row per (seed, criterion, steps, sparsity); see :func:`summarize` for the mean/std."""
    dense_flops, _ = flops(dense, x_te)
    base = {"dense_top1": accuracy(dense, x_te, y_te), "dense_loss": _loss(dense, x_te, y_te)}
    jobs = [(seed, name, steps, s) for seed in config.seeds for name in config.criteria
            for steps in config.steps for s in config.sparsities]
    rows = []
    for seed, name, steps, sparsity in tqdm(jobs, desc="bench", disable=not progress):
        factory, scope = CRITERIA[name]
        model = copy.deepcopy(dense)
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_tr, y_tr), batch_size=config.batch_size,
                                             shuffle=True, generator=torch.Generator().manual_seed(seed))
        with phase_times() as times:
            t0 = time.perf_counter()
            prune(model, factory(config, seed), sparsity, data=loader, loss_fn="cross_entropy", steps=steps, scope=scope,
                  progress=False)
            total = time.perf_counter() - t0
        _, left = flops(model, x_te)
        weights = [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
        numel, nonzero = sum(w.numel() for w in weights), sum(int(w.count_nonzero()) for w in weights)
        row = {"seed": seed, "criterion": name, "steps": steps, "target_sparsity": sparsity,
               "sparsity": 1 - nonzero / numel, "compression": numel / max(nonzero, 1),
               "speedup": dense_flops / max(left, 1), "loss": _loss(model, x_te, y_te),
               "top1": accuracy(model, x_te, y_te), "time_total_s": total, "time_stats_s": times["stats"],
               "time_inverse_s": times["inverse"], "time_update_s": times["update"],
               "time_select_s": total - times["stats"] - times["inverse"] - times["update"], **base}
        if config.finetune_epochs:
            train(model, x_tr, y_tr, epochs=config.finetune_epochs, seed=seed)  # torch's mask hook keeps sparsity
            row.update(finetuned_loss=_loss(model, x_te, y_te), finetuned_top1=accuracy(model, x_te, y_te))
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of every metric, per (criterion, steps, target sparsity)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["criterion"], r["steps"], r["target_sparsity"]), []).append(r)
    out = []
    for (name, steps, sparsity), rs in groups.items():
        item = {"criterion": name, "steps": steps, "target_sparsity": sparsity, "seeds": len(rs)}
        for key in rs[0]:
            if key in ("seed", "criterion", "steps", "target_sparsity"):
                continue
            values = [r[key] for r in rs]
            item[key] = statistics.fmean(values)
            item[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(item)
    return out


def config_dict(config: BenchConfig) -> dict:
    return asdict(config)


def findings(summary: list[dict]) -> list[str]:
    """The loss-modelling paper's two questions, answered from the summary: does pruning
    in more steps (locality) help each criterion, and do LM and QM end up close?"""
    lines = []
    by = {(s["criterion"], s["steps"], s["target_sparsity"]): s for s in summary}
    steps = sorted({s["steps"] for s in summary})
    if len(steps) > 1:
        for name in dict.fromkeys(s["criterion"] for s in summary):
            gains = [100 * (by[(name, steps[-1], sp)]["top1"] - by[(name, steps[0], sp)]["top1"])
                     for (n, st, sp) in by if n == name and st == steps[0] and (name, steps[-1], sp) in by]
            if gains:
                verdict = "helps" if statistics.fmean(gains) > 0.5 else "does not help"
                lines.append(f"locality: {steps[-1]} steps vs {steps[0]} {verdict} {name} "
                             f"(mean {statistics.fmean(gains):+.1f} top-1 points over sparsities)")
    if any(s["criterion"] == "taylor" for s in summary) and any(s["criterion"] == "qm" for s in summary):
        gaps = [100 * abs(by[("taylor", st, sp)]["top1"] - by[("qm", st, sp)]["top1"])
                for (n, st, sp) in by if n == "taylor" and ("qm", st, sp) in by and st == steps[-1]]
        lines.append(f"LM vs QM at {steps[-1]} step(s): mean |top-1 gap| {statistics.fmean(gaps):.1f} points "
                     f"({'close' if statistics.fmean(gaps) < 2 else 'apart'})")
    return lines
