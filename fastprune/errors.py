"""The exceptions fastprune raises, for callers that want to catch them.

- ``ValueError`` / ``TypeError``: a bad argument or input; the message names the
  argument, the value and the fix. Nothing was changed.
- :class:`NonFiniteError`: NaN or inf in per-sample gradients, Fisher blocks or
  inverses, scores or weight updates, wherever it is found. It subclasses both
  ``FloatingPointError`` and ``ValueError``.
- ``MemoryError``: a path's memory estimate exceeds ``max_memory``; raised before
  allocating, with the numbers and the options.
- ``RuntimeError``: a damped Fisher block that is not positive definite ("increase
  damp"), torch.distributed misuse, or a compiled op's own input check.
"""
from __future__ import annotations

import torch

__all__ = ["NonFiniteError", "check_finite"]


class NonFiniteError(FloatingPointError, ValueError):
    """NaN or inf where fastprune needs finite values; the message names the tensor."""


def check_finite(named: list[tuple[str, torch.Tensor]], what: str, hint: str, *, exact: bool = True) -> None:
    """Raises :class:`NonFiniteError` for the first of the ``(name, tensor)`` pairs that
    holds NaN or inf, as "<what> in '<name>'; <hint>". ``exact=False`` checks each
    tensor's sum instead (one pass, one host sync for all of them; a sum that
    overflows counts as non-finite, which for statistics is worth reporting too)."""
    if not named:
        return
    flags = torch.stack([t.isfinite().all() if exact else t.sum().isfinite() for _, t in named])
    if bool(flags.all()):
        return
    name = named[int((~flags).nonzero()[0])][0]
    raise NonFiniteError(f"{what} (NaN or inf) in {name!r}; {hint}")
