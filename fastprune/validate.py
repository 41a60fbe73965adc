"""Argument checks shared by every entry point: each names the argument, the value
and what is expected, and accepts numpy and torch scalars (``np.float32(0.5)``,
``np.int64(2)``) as the plain numbers they stand for."""
from __future__ import annotations

import math
import numbers

__all__ = ["integer", "real", "module", "batches", "optional_integer"]


def integer(value, name: str, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    """``value`` as an int in [low, high] (either bound may be None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer{_range(low, high, '[', ']')}, got {value!r}{hint}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer{_range(low, high, '[', ']')}, got {value!r}{hint}")
    return value


def real(value, name: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
         high_open: bool = False, hint: str = "") -> float:
    """``value`` as a finite float in the range (``low_open`` / ``high_open`` exclude the bound)."""
    span = _range(low, high, "(" if low_open else "[", ")" if high_open else "]")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number{span}, got {value!r}{hint}")
    v = float(value)
    if low is not None and (v < low or (low_open and v == low)) or \
            high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be a number{span}, got {value!r}{hint}")
    return v


def _range(low, high, left: str, right: str) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if left == '(' else '>='} {low}"
    if low is None:
        return f" {'<' if right == ')' else '<='} {high}"
    return f" in {left}{low}, {high}{right}"


def optional_integer(value, name: str, low: int | None = None, hint: str = "") -> int | None:
    """None, or ``value`` as an int >= ``low``."""
    return None if value is None else integer(value, name, low, hint=hint)


def module(value, name: str = "model"):
    """``value``, which must be an ``nn.Module``."""
    from torch import nn
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


def batches(value, name: str = "data"):
    """``value``, which must be an iterable of batches (a DataLoader, a list of pairs)."""
    from collections.abc import Iterable
    if value is None or not isinstance(value, Iterable) or hasattr(value, "shape"):
        raise TypeError(f"{name} must be an iterable of (inputs, targets) batches (a DataLoader, or a list of "
                        f"pairs), got {type(value).__name__}")
    return value
