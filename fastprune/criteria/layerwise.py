"""Layer-wise criteria from calibration inputs: SparseGPT and Wanda on every target
Linear (and GPT-2 ``Conv1D``), each layer judged by how well it reconstructs its own
outputs from its input Hessian H = 2/n X X^T.

By default they prune the Linear layers inside the model's repeated blocks (an
``nn.ModuleList`` of same-type layers: Llama's ``model.layers``, GPT-2's
``transformer.h``, BERT's ``encoder.layer``, ``nn.TransformerEncoder.layers``), not the
embeddings or the LM head, and, with ``sequential=True`` (the default), one block after
another as in the papers: the first block's inputs are captured with every keyword
argument it receives (attention masks, position embeddings; caches off), each block's
Hessians come from its inputs, and the pruned block's outputs are the next block's
inputs. Layers reading the same tensor (q/k/v, gate/up) share one Hessian and one
Cholesky factor. Targets outside the blocks (and every target of a model without
blocks) take their Hessians from one pass of the dense model. Nothing is written to the
model before the pruning step applies the result, so a failure in any block leaves the
model as it was.
"""
from __future__ import annotations

import inspect
import warnings
import zlib
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .._ops import acc_dtype
from ..batches import call_args, model_device, move, split_batch
from ..distributed import resolve_group
from ..memory import check_budget
from ..profiling import phase
from ..second_order.sparsegpt import LayerHessian, factor_hessian, sparsegpt_prune, wanda_prune
from ..stats.layer_inputs import InputHessians, as_rows, from_rows, in_features, is_linear_like
from ..targets import DEFAULT_PRUNABLE, has_weight
from ..validate import integer, optional_integer, real
from .base import Criterion
from .block_sparsity import check_block_sparsity, outlier_ratio, owl_allocation, scaled_allocation

__all__ = ["SparseGPT", "Wanda", "layer_hessians", "find_blocks", "block_layers"]


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


def _bypassed(module: nn.Module) -> set[int]:
    """ids of the Linears whose parent reads their weight without calling them
    (nn.MultiheadAttention's out_proj): no input to observe."""
    return {id(m.out_proj) for m in module.modules() if isinstance(m, nn.MultiheadAttention)}


def block_layers(model: nn.Module, blocks=None) -> tuple[list[str], list[str]]:
    """``(pruned, skipped)``: the names of the layers the layer-wise criteria prune by
    default (every Linear and Conv1D inside the blocks, or in the whole model when it has
    none) and of the weighted layers there that have no Hessian path (convolutions,
    nn.MultiheadAttention's projections), which stay dense."""
    found = find_blocks(model, blocks)
    root = found if found is not None else model
    prefix = next(n for n, m in model.named_modules() if m is root)
    bypassed = _bypassed(root)
    pruned, skipped = [], []
    for n, m in root.named_modules():
        name = f"{prefix}.{n}".strip(".")
        if is_linear_like(m) and has_weight(m) and id(m) not in bypassed:
            pruned.append(name)
        elif id(m) in bypassed or isinstance(m, nn.MultiheadAttention) or (
                isinstance(m, DEFAULT_PRUNABLE) and has_weight(m)):
            skipped.append(name)
    return pruned, skipped


def _calibration_inputs(data, nsamples: int | None):
    """The model inputs of each calibration batch: a tensor of inputs, a dict of keyword
    arguments (``labels`` dropped, and optional here), or an ``(inputs, targets)`` pair
    as :func:`fastprune.batches.split_batch` reads it; the first ``nsamples`` batches."""
    for i, batch in enumerate([data] if isinstance(data, torch.Tensor) else data):
        if nsamples is not None and i >= nsamples:
            return
        if isinstance(batch, torch.Tensor):
            yield batch
        elif isinstance(batch, dict):
            yield {k: v for k, v in batch.items() if k != "labels"}
        else:
            yield split_batch(batch)[0]


def _run_model(model: nn.Module, inputs, device) -> None:
    """One calibration forward, with Hugging Face's key/value cache off where the model
    takes ``use_cache`` (a cache would make each block attend to earlier batches)."""
    args, kwargs = call_args(move(inputs, device))
    try:
        takes_cache = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_cache = False
    if takes_cache:
        kwargs = {**kwargs, "use_cache": False}
    model(*args, **kwargs)


@contextmanager
def _observable():
    """No autograd graph (it would hold every intermediate of a block) and no fused
    attention path (nn.TransformerEncoderLayer's skips the Linear forwards the hooks
    watch)."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def _check_linear(modules: dict) -> None:
    odd = [f"{type(m).__name__} {n!r}" for n, m in modules.items() if not is_linear_like(m)]
    if odd:
        raise ValueError(f"layer-wise criteria prune Linear layers from their input Hessians; {odd} are not: "
                         "select the Linear layers with modules=[...] (or modules=[torch.nn.Linear])")


def layer_hessians(step, nsamples: int | None = None, max_memory: int | None = None, names=None,
                   share: bool = True, diagonal: bool = False, group=None, stop_after: nn.Module | None = None
                   ) -> list[tuple[list[str], torch.Tensor]]:
    """``[(target names, H of their common input)]`` from one no-grad pass of the model
    over ``step.data`` (its first ``nsamples`` batches), for the targets in ``names``
    (default: all); with ``diagonal``, diag(H) only. Each forward ends after
    ``stop_after`` when given (the last module that holds a target: the LM head's logits
    are neither needed nor computed)."""
    modules = {t.name: t.module for t in step.targets if names is None or t.name in names}
    _check_linear(modules)
    device = model_device(step.model)

    def stop(module, args, out):
        raise _Stop

    handle = None if stop_after is None else stop_after.register_forward_hook(stop)
    try:
        with InputHessians(modules, device, max_memory=max_memory, share=share, diagonal=diagonal,
                           group=group) as stats, _observable(), phase("forward"):
            for x in _calibration_inputs(step.data, nsamples):
                stats.new_forward()
                try:
                    _run_model(step.model, x, device)
                except _Stop:
                    pass
    finally:
        if handle is not None:
            handle.remove()
    return stats.result(stacklevel=4)


def _inner_name(block: nn.Module, target) -> str:
    """The name, inside ``block``, of the parameter holding ``target``'s weight."""
    prefix = next(n for n, m in block.named_modules() if m is target.module)
    local = target.tensor_name + ("_orig" if target.mask is not None else "")
    return f"{prefix}.{local}" if prefix else local


def _no_cache(value):
    """None in place of a key/value cache object (anything with ``get_seq_length``)."""
    return None if hasattr(value, "get_seq_length") else value


def _next_inputs(args: tuple, kwargs: dict, out) -> tuple[tuple, dict]:
    """The next block's call: this block's output (the first of a tuple) in place of
    the hidden states, every other argument as it was."""
    hidden = (out[0] if isinstance(out, (tuple, list)) else out).detach()
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _hidden_bytes(calls) -> int:
    return sum(t.numel() * t.element_size() for args, kwargs in calls for t in [*args, *kwargs.values()]
               if isinstance(t, torch.Tensor))


class _LayerWise(Criterion):
    requires_data = True
    calibration = True
    #: Whether the solver needs only diag(H).
    diagonal = False

    def __init__(self, nsamples=None, max_memory=None, sequential=True, blocks=None, true_sequential=False,
                 share_hessians=True, device=None, progress=True, block_sparsity=None, owl_m=5.0, owl_lambda=0.08):
        self.nsamples = optional_integer(nsamples, "nsamples", 1)
        self.max_memory = optional_integer(max_memory, "max_memory", 0, hint=" (bytes)")
        self.sequential, self.blocks, self.true_sequential = bool(sequential), blocks, bool(true_sequential)
        self.share_hessians, self.progress = bool(share_hessians), bool(progress)
        self.device = None if device is None else torch.device(device)
        self.block_sparsity = check_block_sparsity(block_sparsity)
        self.owl_m = real(owl_m, "owl_m", 0, low_open=True, hint=" (OWL's M: outliers are above M x the mean)")
        self.owl_lambda = real(owl_lambda, "owl_lambda", 0, 0.5, high_open=True,
                               hint=" (OWL's lambda: block sparsities stay within +-lambda of the target)")
        #: What the last pruning did, per target: ``block`` (None outside the blocks),
        #: ``shared_with`` (the targets sharing its Hessian) and, for SparseGPT, ``loss``,
        #: ``percdamp`` and ``dead`` (see ``sparsegpt_prune``); and under
        #: ``"skipped"`` the block layers without a Hessian path, left dense.
        self.report: dict = {}

    def default_modules(self, model: nn.Module) -> list[str]:
        pruned, skipped = block_layers(model, self.blocks)
        if not pruned:
            raise ValueError(f"layer-wise criteria prune Linear layers (and GPT-2 Conv1D) from their input Hessians, "
                             f"and the model's blocks have none (layers without a Hessian path: {skipped}); name "
                             "the Linear layers with modules=[...], or the blocks with blocks=")
        return pruned

    def scores(self, model, params, data=None, loss_fn=None):
        """Layer-wise saliencies on the dense model's activations, for ``importance_scores``."""
        from .base import PruningStep
        step = PruningStep.of(model, params, data, loss_fn)
        out = {}
        for names, h in layer_hessians(step, self.nsamples, self.max_memory, share=self.share_hessians,
                                       diagonal=self.diagonal):
            for n in names:
                module = next(t.module for t in step.targets if t.name == n)
                out[n] = from_rows(self._scores(as_rows(params[n], module), h), module)
        return out

    def score_step(self, step):
        return None, {}  # the masks come out of choose_masks' own solver

    def choose_masks(self, step, context, sparsity, pattern):
        pattern = None if pattern is None else f"{pattern[0]}:{pattern[1]}"
        _check_linear({t.name: t.module for t in step.targets})
        self.report = {"skipped": block_layers(step.model, self.blocks)[1]}
        blocks = find_blocks(step.model, self.blocks) if self.sequential else None
        if self.sequential and blocks is None:
            raise ValueError(f"{type(self).__name__}(sequential=True) prunes the model's repeated blocks one after "
                             "another, but found no nn.ModuleList of same-type layers: name the block list with "
                             "blocks='...' (an nn.ModuleList or nn.Sequential), or pass sequential=False to prune "
                             "every target from one pass of the dense model")
        self._check_ranks_agree(step, sparsity, pattern)
        sparsities = self._sparsities(step, sparsity, pattern)
        done = self._sequential(step, blocks, sparsities, pattern) if blocks is not None else {}
        rest = {t.name for t in step.targets if t.name not in done}
        if rest:  # outside the blocks: the dense model's Hessians
            for names, h in layer_hessians(step, self.nsamples, self.max_memory, rest, self.share_hessians,
                                           self.diagonal, resolve_group(step.process_group)):
                done.update(self._prune_group(step, names, h, sparsities, pattern, None))
        masks = {}
        for t in step.targets:
            weight, keep = done[t.name]
            old = step.masks.get(t.name)
            keep = keep if old is None else keep & old.bool()
            context.setdefault("weights", {})[t.name] = weight * keep
            masks[t.name] = keep
        return masks

    def _check_ranks_agree(self, step, sparsity, pattern) -> None:
        """Under torch.distributed every rank must prune the same model the same way (their
        Hessians are summed layer by layer): a clear error otherwise, before any work."""
        group = resolve_group(step.process_group)
        if group is None:
            return
        names = ",".join(f"{t.name}{tuple(t.shape)}" for t in step.targets)
        settings = repr((sparsity, pattern, sorted((k, repr(v)) for k, v in vars(self).items() if k != "report")))
        sig = torch.tensor([float(zlib.crc32(names.encode())), float(zlib.crc32(settings.encode()))],
                           dtype=torch.float64)
        low, high = sig.clone(), sig.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
        if not torch.equal(low, high):
            what = "models (their pruned layers or shapes)" if low[0] != high[0] else "settings (sparsity, pattern " \
                "or the criterion's arguments)"
            raise ValueError(f"the ranks disagree on their {what}: every rank must call fastprune.prune with the same "
                             "model and arguments, each with its own share of the calibration data")

    def _sparsities(self, step, sparsity, pattern) -> dict[str, float]:
        """{target: this step's sparsity}: ``sparsity`` everywhere, or per block from
        ``block_sparsity`` (a list, or OWL from the current model's Wanda metric)."""
        if self.block_sparsity is None:
            return {t.name: sparsity for t in step.targets}
        if pattern is not None:
            raise ValueError(f"block_sparsity sets unstructured sparsities per block; pattern {pattern!r} keeps the "
                             "same N of every M in every layer: drop one of them")
        blocks = find_blocks(step.model, self.blocks)
        if blocks is None:
            raise ValueError("block_sparsity needs the model's repeated blocks, and none were found: name them with "
                             "blocks='...'")
        of = {t.name: i for t in step.targets for i, b in enumerate(blocks) if any(t.module is m for m in b.modules())}
        sizes = [sum(t.numel for t in step.targets if of.get(t.name) == i) for i in range(len(blocks))]
        empty = [i for i, n in enumerate(sizes) if n == 0]
        if empty:
            raise ValueError(f"blocks {empty} hold no target, so they cannot take a share of block_sparsity; prune "
                             "every block's layers (the default modules) or leave block_sparsity out")
        if self.block_sparsity == "owl":
            ratios = self._outlier_ratios(step, of, blocks)
            per_block = owl_allocation(ratios, sizes, sparsity, self.owl_lambda)
            self.report["outlier_ratios"] = ratios
        else:
            per_block = scaled_allocation(check_block_sparsity(self.block_sparsity, len(blocks)), sizes, sparsity)
        self.report["block_sparsity"] = per_block
        return {t.name: per_block[of[t.name]] if t.name in of else sparsity for t in step.targets}

    def _outlier_ratios(self, step, of, blocks) -> list[float]:
        """Each block's OWL outlier ratio, from one pass of the current model (up to the
        last block)."""
        metrics = [[] for _ in blocks]
        modules = {t.name: t.module for t in step.targets}
        for names, h in layer_hessians(step, self.nsamples, self.max_memory, set(of), self.share_hessians, True,
                                       resolve_group(step.process_group), stop_after=blocks[max(of.values())]):
            for n in names:
                w = as_rows(step.params[n], modules[n]).to(h.device)
                metrics[of[n]].append(w.abs().to(h.dtype) * h.clamp_min(0).sqrt())
        return [outlier_ratio(m, self.owl_m) for m in metrics]

    def _prune_group(self, step, names, hessian, sparsities, pattern, block, prepared=None) -> dict:
        """{name: (new weight, keep)} for the targets sharing ``hessian`` (or its
        ``prepared`` form)."""
        modules = {t.name: t.module for t in step.targets}
        if prepared is None:
            prepared = self._prepare(hessian)
        result = {}
        for n in names:
            w = as_rows(step.params[n], modules[n])
            old = step.masks.get(n)
            fixed = None if old is None else ~as_rows(old, modules[n]).bool().to(self._device_of(prepared))
            new, keep, info = self._apply(w.to(self._device_of(prepared)), prepared, sparsities[n], pattern, fixed)
            result[n] = (from_rows(new, modules[n]).to(w.device), from_rows(keep, modules[n]).to(w.device))
            self.report[n] = {"block": block, "shared_with": [m for m in names if m != n], **info}
        return result

    def _capture(self, step, blocks, device) -> list[tuple[tuple, dict]]:
        """The first block's (args, kwargs) for each calibration batch, on ``device``."""
        calls = []

        def grab(module, args, kwargs):
            calls.append((tuple(move(a.detach(), device) if isinstance(a, torch.Tensor) else a for a in args),
                          {k: _no_cache(move(v, device)) for k, v in kwargs.items()}))
            raise _Stop

        handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with _observable(), phase("forward"):
                for x in _calibration_inputs(step.data, self.nsamples):
                    try:
                        _run_model(step.model, x, model_device(step.model))
                    except _Stop:
                        pass
        finally:
            handle.remove()
        if not calls:
            raise ValueError("the calibration data never reached the model's first block; check data=")
        return calls

    def _sequential(self, step, blocks, sparsities, pattern) -> dict:
        """Block after block: each block's Hessians from its inputs, its layers pruned, and
        its pruned outputs (computed functionally on a copy of the block's tensors, the
        model untouched) the next block's inputs. With ``device``, the copy is made there."""
        device = self.device or model_device(step.model)
        calls = self._capture(step, blocks, device)
        # The inputs and the outputs of one block are held at once.
        check_budget(2 * _hidden_bytes(calls), self.max_memory, device, "the calibration activations of one block "
                     f"({len(calls)} batches, inputs and outputs)", "use fewer calibration batches (nsamples=)")
        done = {}
        with _observable():
            for i, block in enumerate(tqdm(blocks, desc="blocks", disable=not self.progress, leave=False)):
                state = {n: t.detach().to(device, copy=True) for n, t in
                         [*block.named_parameters(remove_duplicate=False),
                          *block.named_buffers(remove_duplicate=False)]}
                inside = {t.name: t for t in step.targets if any(t.module is m for m in block.modules())}
                if self.true_sequential and len(calls) == 1:
                    out = self._one_pass(step, block, i, inside, state, calls[0], sparsities, pattern, done)
                    calls = [_next_inputs(*calls[0], out)]
                    continue
                self._staged(step, block, i, inside, state, calls, sparsities, pattern, done)
                with phase("forward"):
                    calls = [_next_inputs(args, kwargs, functional_call(block, state, args, kwargs))
                             for args, kwargs in calls]
        return done

    def _staged(self, step, block, i, inside, state, calls, sparsities, pattern, done) -> None:
        """Prunes ``block``'s targets from block forwards over every call: all at once from
        the block as it came, or (true sequential) one input group per forward, each from
        the block with the earlier groups pruned."""
        device = next(iter(state.values())).device
        modules = {n: t.module for n, t in inside.items()}
        while modules:
            with InputHessians(modules, device, max_memory=self.max_memory, share=self.share_hessians,
                               first=1 if self.true_sequential else None, diagonal=self.diagonal,
                               group=resolve_group(step.process_group)) as stats, \
                    phase("forward"):
                for args, kwargs in calls:
                    stats.new_forward()
                    functional_call(block, state, args, kwargs)
            for names, h in stats.result(stacklevel=6):
                for n, (new, keep) in self._prune_group(step, names, h, sparsities, pattern, i).items():
                    done[n] = (new, keep)
                    state[_inner_name(block, inside[n])] = new.to(device, inside[n].param.dtype)
                    del modules[n]

    def _one_pass(self, step, block, i, inside, state, call, sparsities, pattern, done):
        """True sequential order in one forward, when the calibration is one batch: each
        target is pruned in a pre-hook, from the Hessian of the input it is about to read
        (shared with the layers that read the same tensor), and the forward goes on with
        the pruned weight, so its output is the pruned block's."""
        device = next(iter(state.values())).device
        seen: list[tuple[torch.Tensor, object, list[str]]] = []  # (input, prepared, names), inputs held
        budget = {"bytes": 0}

        def prune_here(module, args, name):
            x = args[0]
            entry = next((e for e in seen if e[0] is x), None) if self.share_hessians else None
            if entry is None:
                cols = in_features(module)
                acc_type = acc_dtype(x.dtype)
                budget["bytes"] += acc_type.itemsize * cols * (1 if self.diagonal else cols)
                check_budget(budget["bytes"], self.max_memory, device, f"the input Hessians of block {i}",
                             "prune fewer layers per call (modules=)")
                acc = LayerHessian(cols, device=device, dtype=acc_type, diagonal=self.diagonal)
                acc.add(x)
                acc.all_reduce(resolve_group(step.process_group))
                if acc.rows < cols and not self.diagonal:
                    warnings.warn(f"fastprune: {name!r} saw {acc.rows} calibration rows for {cols} input features: "
                                  "its Hessian is rank-deficient and the damping carries it; use more calibration "
                                  "data", stacklevel=2)
                entry = (x, self._prepare(acc.hessian), [])
                seen.append(entry)
            entry[2].append(name)
            new, keep = self._prune_group(step, [name], None, sparsities, pattern, i, entry[1])[name]
            done[name] = (new, keep)
            state[_inner_name(block, inside[name])].copy_(new)

        handles = [t.module.register_forward_pre_hook(lambda mod, args, n=n: prune_here(mod, args, n), prepend=True)
                   for n, t in inside.items()]
        try:
            with phase("forward"):
                out = functional_call(block, state, *call)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in inside if n not in done]
        if missing:
            raise ValueError(f"the calibration data never reached {missing}: no inputs, so no Hessian; check that "
                             "these layers run their own forward")
        for _, _, names in seen:
            for n in names:
                self.report[n]["shared_with"] = [m for m in names if m != n]
        return out

class SparseGPT(_LayerWise):
    """SparseGPT (Frantar & Alistarh, 2023): each Linear is pruned by the column sweep of
    layer-wise OBS on its input Hessian, which picks the mask block by block and moves
    the remaining weights to reconstruct the layer's outputs (see
    :func:`fastprune.second_order.sparsegpt.sparsegpt_prune`).

    Use ``fastprune.prune(model, SparseGPT(), 0.5, data=calibration)`` (or
    ``pattern="2:4"``); every target tensor gets the sparsity (``scope`` does not apply).
    ``calibration`` is a (B, L) tensor of token ids, or an iterable of such tensors, of
    dicts of model keyword arguments (``labels`` is dropped) or of (inputs, targets)
    pairs. The scores, for ``importance_scores`` use, are the layer-wise OBD saliency
    w^2 H_jj / 2 on the dense model's activations.

    Args:
        block_size: columns per block (128 in the paper).
        percdamp: damping as a fraction of the mean diagonal of H (0.01 in the paper).
        nsamples: calibration batches used (default: all of ``data``).
        max_memory: bytes the Hessians, and the activations of one block, may take
            (default: half the free memory of the device).
        sequential: prune the model's repeated blocks one after another, each from the
            pruned model's activations (see the module doc).
        blocks: the block list, by name or module, when the largest repeated
            ``nn.ModuleList`` is not it.
        true_sequential: inside each block, prune the layers reading one input (q/k/v,
            then o, then gate/up, then down) before collecting the next input's Hessian,
            from the block with those layers pruned (one block forward per input).
        share_hessians: one Hessian and one factor per distinct layer input (False:
            one per layer, as the reference code does; the same numbers, more work).
        device: where each block is pruned (e.g. ``"cuda"`` for a model kept on CPU);
            default the model's device.
        progress: a progress bar over the blocks.
        block_sparsity: None (every target at the step's sparsity), a list with one
            sparsity per block (their relative sizes: scaled so the mean over the
            prunable weights is the step's sparsity), or ``"owl"``: OWL's allocation,
            blocks with more outliers of the Wanda metric pruned less (recomputed from the
            current model at every step).
        owl_m, owl_lambda: OWL's M (an outlier exceeds M x the block's mean metric; 5 in
            the paper) and lambda (block sparsities span target +- lambda; 0.08).
        refit_iters: after each layer's sweep, up to this many conjugate-gradient
            iterations towards the least-squares optimal kept weights for its mask
            (:func:`fastprune.second_order.sparsegpt.refit`; 0: the paper's weights).

    With ``steps > 1`` in ``fastprune.prune``, every step recalibrates on the pruned
    model and sweeps with the earlier steps' pruned weights fixed (compensated again).
    """

    def __init__(self, block_size: int = 128, percdamp: float = 0.01, nsamples: int | None = None,
                 max_memory: int | None = None, sequential: bool = True, blocks=None, true_sequential: bool = False,
                 share_hessians: bool = True, device=None, progress: bool = True, block_sparsity=None,
                 owl_m: float = 5.0, owl_lambda: float = 0.08, refit_iters: int = 0):
        super().__init__(nsamples, max_memory, sequential, blocks, true_sequential, share_hessians, device, progress,
                         block_sparsity, owl_m, owl_lambda)
        self.refit_iters = integer(refit_iters, "refit_iters", 0)
        self.block_size = integer(block_size, "block_size", 1)
        self.percdamp = real(percdamp, "percdamp", 0, low_open=True)

    def _scores(self, weight, hessian):
        return 0.5 * weight.to(hessian.dtype).square() * hessian.diagonal()

    def _prepare(self, hessian):
        return factor_hessian(hessian, self.percdamp)

    @staticmethod
    def _device_of(factor):
        return factor.upper.device

    def _apply(self, weight, factor, sparsity, pattern, fixed):
        return sparsegpt_prune(weight, None, sparsity, pattern, self.block_size, factor=factor, fixed=fixed,
                               refit_iters=self.refit_iters)

    def compensate(self, step, new_masks, context):
        return context["weights"]


class Wanda(_LayerWise):
    """Wanda (Sun et al., 2024): score |W_ij| * ||x_j|| with the norms of each Linear's
    calibration inputs, pruned within each output row (or per N:M group); no weight
    update. Use ``fastprune.prune(model, Wanda(), 0.5, data=calibration)``.

    Args:
        nsamples, max_memory, sequential, blocks, true_sequential, share_hessians, device,
        progress, block_sparsity, owl_m, owl_lambda: as for :class:`SparseGPT`.
    """

    diagonal = True

    def _scores(self, weight, hessian):
        return weight.abs().to(hessian.dtype) * hessian.sqrt()

    @staticmethod
    def _prepare(hessian):
        return hessian

    @staticmethod
    def _device_of(diagonal):
        return diagonal.device

    def _apply(self, weight, diagonal, sparsity, pattern, fixed):
        # An earlier step's zeros score 0 and go first; the caller keeps them pruned.
        return (*wanda_prune(weight, diagonal, sparsity, pattern), {})
