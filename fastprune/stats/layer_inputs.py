"""Input Hessians H = 2/n X X^T of Linear-like layers from calibration forwards, one per
distinct input: layers that read the same tensor (q/k/v, gate/up) share one Hessian
and, later, one Cholesky factor, where the reference code computes one per matrix.

A layer is Linear-like when its output is ``x @ W^T`` for a weight of its own:
``nn.Linear``, and GPT-2's ``Conv1D`` (transformers), whose weight is stored
transposed, (in, out).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..memory import check_budget, default_max_memory
from ..profiling import phase
from ..second_order.sparsegpt import LayerHessian
from .._ops import acc_dtype

__all__ = ["is_conv1d", "is_linear_like", "in_features", "as_rows", "from_rows", "InputHessians"]


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D`` (recognised without importing
    transformers): a Linear whose weight is (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def in_features(module: nn.Module) -> int:
    w = module.weight if not hasattr(module, "weight_orig") else module.weight_orig
    return w.shape[0] if is_conv1d(module) else w.shape[1]


def as_rows(weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), the layout the layer-wise solvers take."""
    return weight.T if is_conv1d(module) else weight


from_rows = as_rows  # a transpose is its own inverse


class InputHessians:
    """Forward hooks on ``modules`` ({name: module}) that accumulate their inputs' Hessians.

    Layers are grouped by the tensor they read, in the order they first run: a module
    whose input *is* (the same object as) an input already seen in the same forward
    joins that module's group (with ``share=False`` every module has its own, summed over
all its calls). Call :meth:`new_forward` before each forward. With
    ``first=k``, only the first ``k`` groups accumulate (the others are still grouped
    and ordered), which is what SparseGPT's "true sequential" order needs. With
``diagonal=True`` only diag(H) is kept (Wanda).

    After the forwards, :attr:`groups` is a list of ``(names, LayerHessian)``.
    """

    def __init__(self, modules: dict[str, nn.Module], device, dtype: torch.dtype | None = None,
                 max_memory: int | None = None, first: int | None = None, share: bool = True,
                 diagonal: bool = False, group=None):
        self.modules, self.device, self.dtype, self.first, self.share = modules, device, dtype, first, share
        self.diagonal, self.group = diagonal, group
        self.budget = default_max_memory(device) if max_memory is None else max_memory
        self.groups: list[tuple[list[str], LayerHessian | None]] = []
        self._group_of: dict[str, int] = {}
        self._seen: list[tuple[torch.Tensor, int]] = []  # this forward's inputs (held, so ids stay unique)
        self._calls: set[str] = set()
        self._bytes = 0
        self._handles = []

    def __enter__(self):
        self._handles = [m.register_forward_hook(lambda mod, args, out, n=n: self._hook(n, args[0]))
                         for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._seen.clear()

    def new_forward(self) -> None:
        self._seen.clear()
        self._calls.clear()

    def _hook(self, name: str, x: torch.Tensor) -> None:
        if not self.share:
            g = self._group_of.get(name)
            if g is None:
                g = self._group_of[name] = self._new_group(name, x)
            if self.groups[g][1] is not None:
                self.groups[g][1].add(x.detach())
            return
        if name in self._calls:
            raise ValueError(f"{name!r} ran twice in one forward of its block, so its inputs cannot share a "
                             "Hessian with another layer's; pass share_hessians=False")
        self._calls.add(name)
        g = self._group_of.get(name)
        if g is None:
            g = next((i for t, i in self._seen if t is x), None)
            if g is None:
                g = self._new_group(name, x)
            else:
                self.groups[g][0].append(name)
            self._group_of[name] = g
        elif self.groups[g][0][0] != name:  # a follower reads its leader's tensor, or the grouping is wrong
            if not any(t is x and i == g for t, i in self._seen):
                raise ValueError(f"{name!r} read the same tensor as {self.groups[g][0][0]!r} in the first "
                                 "calibration forward but not in a later one, so they cannot share a Hessian; "
                                 "pass share_hessians=False")
            return
        if self.groups[g][0][0] == name:
            self._seen.append((x, g))
            acc = self.groups[g][1]
            if acc is not None:
                acc.add(x.detach())

    def _new_group(self, name: str, x: torch.Tensor) -> int:
        g = len(self.groups)
        acc = None
        if self.first is None or g < self.first:
            cols = in_features(self.modules[name])
            # float32 (float64 for a float64 model), whatever the activations' dtype.
            dtype = self.dtype or acc_dtype(x.dtype if x.is_floating_point() else torch.float32)
            need = dtype.itemsize * cols * (1 if self.diagonal else cols)
            check_budget(self._bytes + need, self.budget, torch.device(self.device),
                         f"the input Hessians of {g + 1} layer inputs", "prune fewer layers per call (modules=)")
            self._bytes += need
            with phase("hessian"):
                acc = LayerHessian(cols, device=self.device, dtype=dtype, diagonal=self.diagonal)
        self.groups.append(([name], acc))
        return g

    def result(self, stacklevel: int = 3) -> list[tuple[list[str], torch.Tensor]]:
        """``[(names, H)]`` of the accumulated groups, over every rank of ``group`` (each
        ran its own share of the calibration data), checked: every module reached, and a
        warning for Hessians from fewer rows than columns."""
        missing = [n for n in self.modules if n not in self._group_of]
        if missing:
            raise ValueError(f"the calibration data never reached {missing}: no inputs, so no Hessian; check data= "
                             "and that these layers run their own forward (nn.MultiheadAttention's out_proj does "
                             "not: leave it out with modules=)")
        done = [(names, acc) for names, acc in self.groups if acc is not None]
        for _, acc in done:  # the same groups in the same order on every rank: the same blocks ran
            acc.all_reduce(self.group)
        short = [names for names, acc in done if acc.rows < acc.columns and not self.diagonal]
        if short:
            warnings.warn(f"fastprune: {short} saw fewer calibration rows than input features: their Hessians are "
                          "rank-deficient and the damping carries them; use more calibration data",
                          stacklevel=stacklevel)
        return [(names, acc.hessian) for names, acc in done]
