"""Layer-wise criteria from calibration inputs: SparseGPT and Wanda on every target
Linear, each layer judged by how well it reconstructs its own outputs.

One forward pass over the calibration data (no gradients) accumulates each target
layer's input Hessian H = 2/n X X^T; then every layer is pruned on its own. All layers
see the dense model's activations here (the papers prune block by block, feeding each
block the pruned model's outputs; that engine is still to come, issue 18).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .._ops import acc_dtype
from ..batches import call, model_device, move
from ..memory import check_budget
from ..second_order.sparsegpt import LayerHessian, sparsegpt_prune, wanda_prune
from ..validate import integer, optional_integer, real
from .base import Criterion

__all__ = ["SparseGPT", "Wanda", "layer_hessians"]


def _calibration_inputs(data):
    """The model inputs of each calibration batch: a tensor of inputs, pairs (their inputs)
    or dicts of keyword arguments (without ``labels``)."""
    for batch in [data] if isinstance(data, torch.Tensor) else data:
        if isinstance(batch, dict):
            yield {k: v for k, v in batch.items() if k != "labels"}
        elif isinstance(batch, (tuple, list)) and len(batch) == 2 and not isinstance(batch[0], (int, float)):
            yield batch[0]
        else:
            yield batch


def layer_hessians(step, nsamples: int | None = None, max_memory: int | None = None) -> dict[str, torch.Tensor]:
    """{target name: H of its module's inputs} from one no-grad pass over ``step.data``
    (at most ``nsamples`` batches' worth of samples when given)."""
    modules = {t.name: t.module for t in step.targets}
    odd = [f"{type(m).__name__} {n!r}" for n, m in modules.items() if not isinstance(m, nn.Linear)]
    if odd:
        raise ValueError(f"layer-wise criteria prune Linear layers from their input Hessians; {odd} are not: "
                         "select the Linear layers with modules=[...] (or modules=[torch.nn.Linear])")
    need = sum(acc_dtype(m.weight.dtype).itemsize * m.in_features ** 2 for m in modules.values())
    device = model_device(step.model)
    check_budget(need, max_memory, device, f"the input Hessians of {len(modules)} layers",
                 "prune fewer layers per call (modules=)")
    # float32 (float64 for a float64 model), whatever the activations' dtype.
    acc = {n: LayerHessian(m.in_features, device=device, dtype=acc_dtype(m.weight.dtype)) for n, m in modules.items()}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: acc[n].add(args[0].detach()))
               for n, m in modules.items()]
    seen = 0
    try:
        with torch.no_grad():
            for x in _calibration_inputs(step.data):
                if nsamples is not None and seen >= nsamples:
                    break
                call(step.model, move(x, device))
                seen += 1
    finally:
        for h in handles:
            h.remove()
    empty = [n for n, a in acc.items() if a.rows == 0]
    if empty:
        raise ValueError(f"the calibration data never reached {empty}: no inputs, so no Hessian; check data= and "
                         "that these layers run in the model's forward")
    short = [n for n, a in acc.items() if a.rows < a.columns]
    if short:
        warnings.warn(f"fastprune: {short} saw fewer calibration rows than input features: their Hessians are "
                      "rank-deficient and the damping carries them; use more calibration data", stacklevel=3)
    return {n: a.hessian for n, a in acc.items()}


class _LayerWise(Criterion):
    requires_data = True
    calibration = True

    def __init__(self, nsamples: int | None = None, max_memory: int | None = None):
        self.nsamples = optional_integer(nsamples, "nsamples", 1)
        self.max_memory = optional_integer(max_memory, "max_memory", 0, hint=" (bytes)")

    def score_step(self, step):
        hessians = layer_hessians(step, self.nsamples, self.max_memory)
        return self._scores(step, hessians), {"hessians": hessians}


class SparseGPT(_LayerWise):
    """SparseGPT (Frantar & Alistarh, 2023): each Linear is pruned by the column sweep of
    layer-wise OBS on its input Hessian, which picks the mask block by block and moves
    the remaining weights to reconstruct the layer's outputs (see
    :func:`fastprune.second_order.sparsegpt.sparsegpt_prune`).

    Use ``fastprune.prune(model, SparseGPT(), 0.5, data=calibration)`` (or
    ``pattern="2:4"``); every target tensor gets the sparsity (``scope`` does not apply).
    The scores, for ``importance_scores`` use, are the layer-wise OBD saliency
    w^2 H_jj / 2.

    Args:
        block_size: columns per block (128 in the paper).
        percdamp: damping as a fraction of the mean diagonal of H (0.01 in the paper).
        nsamples: calibration batches used (default: all of ``data``).
        max_memory: bytes the Hessians may take (default: half the free memory).
    """

    def __init__(self, block_size: int = 128, percdamp: float = 0.01, nsamples: int | None = None,
                 max_memory: int | None = None):
        super().__init__(nsamples, max_memory)
        self.block_size = integer(block_size, "block_size", 1)
        self.percdamp = real(percdamp, "percdamp", 0, low_open=True)

    def _scores(self, step, hessians):
        return {t.name: 0.5 * step.params[t.name].to(hessians[t.name].dtype).square() * hessians[t.name].diagonal()
                for t in step.targets}

    def choose_masks(self, step, context, sparsity, pattern):
        pattern = None if pattern is None else f"{pattern[0]}:{pattern[1]}"
        weights, masks = {}, {}
        for t in step.targets:
            new, keep, _ = sparsegpt_prune(step.params[t.name], context["hessians"][t.name], sparsity, pattern,
                                           self.block_size, self.percdamp)
            old = step.masks.get(t.name)
            keep = keep if old is None else keep & old.bool()
            weights[t.name], masks[t.name] = new * keep, keep
        context["weights"] = weights
        return masks

    def compensate(self, step, new_masks, context):
        return context["weights"]


class Wanda(_LayerWise):
    """Wanda (Sun et al., 2024): score |W_ij| * ||x_j|| with the norms of each Linear's
    calibration inputs, pruned within each output row (or per N:M group); no weight
    update. Use ``fastprune.prune(model, Wanda(), 0.5, data=calibration)``.

    Args:
        nsamples: calibration batches used (default: all of ``data``).
        max_memory: bytes the Hessians (whose diagonals give the norms) may take.
    """

    def _scores(self, step, hessians):
        return {t.name: step.params[t.name].abs().to(hessians[t.name].dtype) * hessians[t.name].diagonal().sqrt()
                for t in step.targets}

    def choose_masks(self, step, context, sparsity, pattern):
        pattern = None if pattern is None else f"{pattern[0]}:{pattern[1]}"
        masks = {}
        for t in step.targets:
            _, keep = wanda_prune(step.params[t.name], context["hessians"][t.name], sparsity, pattern)
            old = step.masks.get(t.name)
            masks[t.name] = keep if old is None else keep & old.bool()
        return masks
