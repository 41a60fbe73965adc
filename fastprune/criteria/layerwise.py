"""Layer-wise criteria from calibration inputs: SparseGPT and Wanda on every target
Linear, each layer judged by how well it reconstructs its own outputs from its input
Hessian H = 2/n X X^T.

With ``sequential=True`` (the default) and a model built of repeated blocks (an
``nn.ModuleList`` of same-type layers: Llama's ``model.layers``, GPT-2's
``transformer.h``, ``nn.TransformerEncoder.layers``), the blocks are pruned one after
another as in the papers: the first block's inputs are captured with every keyword
argument it receives (attention masks, position embeddings), each block's Hessians come
from its inputs, and the pruned block's outputs are the next block's inputs. Targets
outside the blocks (and every target of a model without blocks) take their Hessians
from one pass of the dense model. Nothing is written to the model before the pruning
step applies the result.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call

from .._ops import acc_dtype
from ..batches import call, model_device, move, split_batch
from ..memory import check_budget
from ..second_order.sparsegpt import LayerHessian, sparsegpt_prune, wanda_prune
from ..validate import integer, optional_integer, real
from .base import Criterion

__all__ = ["SparseGPT", "Wanda", "layer_hessians", "find_blocks"]


class _Stop(Exception):
    """Ends a forward once the first block's inputs are captured."""


def find_blocks(model: nn.Module, blocks=None) -> nn.ModuleList | None:
    """The model's repeated blocks: ``blocks`` (a name or a module list) if given, else
    the ``nn.ModuleList`` of two or more modules of one type with the most parameters;
    None when there is none."""
    if blocks is not None:
        found = model.get_submodule(blocks) if isinstance(blocks, str) else blocks
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise ValueError(f"blocks= must name an nn.ModuleList (or nn.Sequential) of the model's repeated "
                             f"blocks, got {type(found).__name__}")
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and all(type(c) is type(m[0]) for c in m)]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def _calibration_inputs(data):
    """The model inputs of each calibration batch: a tensor of inputs, a dict of keyword
    arguments (``labels`` dropped, and optional here), or an ``(inputs, targets)`` pair
    as :func:`fastprune.batches.split_batch` reads it."""
    for batch in [data] if isinstance(data, torch.Tensor) else data:
        if isinstance(batch, torch.Tensor):
            yield batch
        elif isinstance(batch, dict):
            yield {k: v for k, v in batch.items() if k != "labels"}
        else:
            yield split_batch(batch)[0]


def _check_linear(modules: dict) -> None:
    odd = [f"{type(m).__name__} {n!r}" for n, m in modules.items() if not isinstance(m, nn.Linear)]
    if odd:
        raise ValueError(f"layer-wise criteria prune Linear layers from their input Hessians; {odd} are not: "
                         "select the Linear layers with modules=[...] (or modules=[torch.nn.Linear])")


def _hessians_while(modules: dict, run, device, max_memory) -> dict[str, torch.Tensor]:
    """{name: H of the module's inputs} over the forwards that ``run()`` makes."""
    need = sum(acc_dtype(m.weight.dtype).itemsize * m.in_features ** 2 for m in modules.values())
    check_budget(need, max_memory, device, f"the input Hessians of {len(modules)} layers",
                 "prune fewer layers per call (modules=)")
    # float32 (float64 for a float64 model), whatever the activations' dtype.
    acc = {n: LayerHessian(m.in_features, device=device, dtype=acc_dtype(m.weight.dtype)) for n, m in modules.items()}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: acc[n].add(args[0].detach()))
               for n, m in modules.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    empty = [n for n, a in acc.items() if a.rows == 0]
    if empty:
        raise ValueError(f"the calibration data never reached {empty}: no inputs, so no Hessian; check data= and "
                         "that these layers run their own forward (nn.MultiheadAttention's out_proj does not: "
                         "leave it out with modules=)")
    short = [n for n, a in acc.items() if a.rows < a.columns]
    if short:
        warnings.warn(f"fastprune: {short} saw fewer calibration rows than input features: their Hessians are "
                      "rank-deficient and the damping carries them; use more calibration data", stacklevel=4)
    return {n: a.hessian for n, a in acc.items()}


def layer_hessians(step, nsamples: int | None = None, max_memory: int | None = None) -> dict[str, torch.Tensor]:
    """{target name: H of its module's inputs} from one no-grad pass of the model over
    ``step.data`` (its first ``nsamples`` batches when given)."""
    modules = {t.name: t.module for t in step.targets}
    _check_linear(modules)
    device = model_device(step.model)

    def run():
        for i, x in enumerate(_calibration_inputs(step.data)):
            if nsamples is not None and i >= nsamples:
                break
            call(step.model, move(x, device))
    return _hessians_while(modules, run, device, max_memory)


def _inner_name(block: nn.Module, target) -> str:
    """The name, inside ``block``, of the parameter holding ``target``'s weight."""
    prefix = next(n for n, m in block.named_modules() if m is target.module)
    local = target.tensor_name + ("_orig" if target.mask is not None else "")
    return f"{prefix}.{local}" if prefix else local


def _next_inputs(args: tuple, kwargs: dict, out) -> tuple[tuple, dict]:
    """The next block's call: this block's output (the first of a tuple) in place of
    the hidden states, every other argument as it was."""
    hidden = (out[0] if isinstance(out, (tuple, list)) else out).detach()
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _LayerWise(Criterion):
    requires_data = True
    calibration = True

    def __init__(self, nsamples: int | None = None, max_memory: int | None = None, sequential: bool = True,
                 blocks=None):
        self.nsamples = optional_integer(nsamples, "nsamples", 1)
        self.max_memory = optional_integer(max_memory, "max_memory", 0, hint=" (bytes)")
        self.sequential, self.blocks = bool(sequential), blocks

    def score_step(self, step):
        hessians = layer_hessians(step, self.nsamples, self.max_memory)
        return self._scores(step, hessians), {"hessians": hessians}

    def choose_masks(self, step, context, sparsity, pattern):
        pattern = None if pattern is None else f"{pattern[0]}:{pattern[1]}"
        blocks = find_blocks(step.model, self.blocks) if self.sequential else None
        done = self._sequential(step, blocks, sparsity, pattern) if blocks is not None else {}
        for t in step.targets:  # outside the blocks: the dense model's Hessians
            if t.name not in done:
                done[t.name] = self._prune(step.params[t.name], context["hessians"][t.name], sparsity, pattern)
        masks = {}
        for t in step.targets:
            weight, keep = done[t.name]
            old = step.masks.get(t.name)
            keep = keep if old is None else keep & old.bool()
            context.setdefault("weights", {})[t.name] = weight * keep
            masks[t.name] = keep
        return masks

    def _sequential(self, step, blocks, sparsity, pattern) -> dict:
        """Block after block: each block's Hessians from its inputs, its layers pruned, and
        its pruned outputs (computed functionally, the model untouched) the next block's
        inputs."""
        device = model_device(step.model)
        calls = []

        def grab(module, args, kwargs):
            calls.append((args, kwargs))
            raise _Stop

        handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            # Autograd on (nothing is differentiated): fused inference paths such as
            # nn.TransformerEncoderLayer's would skip the Linear forwards the hooks watch.
            with torch.enable_grad():
                for i, x in enumerate(_calibration_inputs(step.data)):
                    if self.nsamples is not None and i >= self.nsamples:
                        break
                    try:
                        call(step.model, move(x, device))
                    except _Stop:
                        pass
        finally:
            handle.remove()
        if not calls:
            raise ValueError("the calibration data never reached the model's first block; check data=")
        calls = [(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kwargs)
                 for args, kwargs in calls]
        done = {}
        for block in blocks:
            inside = {t.name: t for t in step.targets if any(t.module is m for m in block.modules())}
            if inside:
                modules = {n: t.module for n, t in inside.items()}
                _check_linear(modules)

                def run(block=block):
                    with torch.enable_grad():
                        for args, kwargs in calls:
                            block(*args, **kwargs)
                hessians = _hessians_while(modules, run, device, self.max_memory)
                for n in inside:
                    done[n] = self._prune(step.params[n], hessians[n], sparsity, pattern)
            override = {_inner_name(block, t): done[n][0].to(t.param.dtype) for n, t in inside.items()}
            with torch.enable_grad():
                calls = [_next_inputs(args, kwargs, functional_call(block, override, args, kwargs))
                         for args, kwargs in calls]
        return done



class SparseGPT(_LayerWise):
    """SparseGPT (Frantar & Alistarh, 2023): each Linear is pruned by the column sweep of
    layer-wise OBS on its input Hessian, which picks the mask block by block and moves
    the remaining weights to reconstruct the layer's outputs (see
    :func:`fastprune.second_order.sparsegpt.sparsegpt_prune`).

    Use ``fastprune.prune(model, SparseGPT(), 0.5, data=calibration)`` (or
    ``pattern="2:4"``); every target tensor gets the sparsity (``scope`` does not apply).
    The scores, for ``importance_scores`` use, are the layer-wise OBD saliency
    w^2 H_jj / 2 on the dense model's activations.

    Args:
        block_size: columns per block (128 in the paper).
        percdamp: damping as a fraction of the mean diagonal of H (0.01 in the paper).
        nsamples: calibration batches used (default: all of ``data``).
        max_memory: bytes the Hessians may take (default: half the free memory).
        sequential: prune the model's repeated blocks one after another, each from the
            pruned model's activations (see the module doc).
        blocks: the block list, by name or module, when the largest repeated
            ``nn.ModuleList`` is not it.
    """

    def __init__(self, block_size: int = 128, percdamp: float = 0.01, nsamples: int | None = None,
                 max_memory: int | None = None, sequential: bool = True, blocks=None):
        super().__init__(nsamples, max_memory, sequential, blocks)
        self.block_size = integer(block_size, "block_size", 1)
        self.percdamp = real(percdamp, "percdamp", 0, low_open=True)

    def _scores(self, step, hessians):
        return {t.name: 0.5 * step.params[t.name].to(hessians[t.name].dtype).square() * hessians[t.name].diagonal()
                for t in step.targets}

    def _prune(self, weight, hessian, sparsity, pattern):
        new, keep, _ = sparsegpt_prune(weight, hessian, sparsity, pattern, self.block_size, self.percdamp)
        return new, keep

    def compensate(self, step, new_masks, context):
        return context["weights"]


class Wanda(_LayerWise):
    """Wanda (Sun et al., 2024): score |W_ij| * ||x_j|| with the norms of each Linear's
    calibration inputs, pruned within each output row (or per N:M group); no weight
    update. Use ``fastprune.prune(model, Wanda(), 0.5, data=calibration)``.

    Args:
        nsamples: calibration batches used (default: all of ``data``).
        max_memory: bytes the Hessians (whose diagonals give the norms) may take.
        sequential, blocks: as for :class:`SparseGPT`.
    """

    def _scores(self, step, hessians):
        return {t.name: step.params[t.name].abs().to(hessians[t.name].dtype) * hessians[t.name].diagonal().sqrt()
                for t in step.targets}

    def _prune(self, weight, hessian, sparsity, pattern):
        return wanda_prune(weight, hessian, sparsity, pattern)
