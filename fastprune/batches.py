"""Batch iteration: the ``(inputs, targets)`` batches every data-driven path reads, and
drawing a fixed number of samples from a DataLoader, step after step."""
from __future__ import annotations

import torch

from .rng import get_rng_state, set_rng_state

__all__ = ["model_device", "split_batch", "num_samples", "take", "join", "move", "leaves", "call", "call_args",
           "with_sample_dim", "iterate_batches", "SampleStream"]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def split_batch(batch) -> tuple[object, object]:
    """``(inputs, targets)`` of one batch, in every form fastprune accepts:

    - ``(inputs, targets)``: a pair, ``inputs`` a tensor (``model(inputs)``), a tuple or
      list of tensors (``model(*inputs)``) or a dict of keyword arguments
      (``model(**inputs)``);
    - a dict of model keyword arguments whose ``"labels"`` entry holds the targets
      (``{"input_ids": ..., "attention_mask": ..., "labels": ...}``, as Hugging Face
      collators give); the model is called without ``labels``.

    Every tensor in ``inputs`` has the samples in dim 0, and ``targets`` too when it
    is a tensor; the per-sample loss ``loss_fn(outputs, targets)`` gets the model's
    outputs as it returns them."""
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise ValueError(f"a dict batch needs a 'labels' entry for the targets; it has {sorted(batch)}")
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError("data must yield (inputs, targets) pairs, e.g. a DataLoader over a TensorDataset, or dicts of "
                     "model keyword arguments with a 'labels' entry")


def leaves(inputs):
    """Every tensor in ``inputs`` (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(inputs, torch.Tensor):
        yield inputs
    elif isinstance(inputs, dict):
        for v in inputs.values():
            yield from leaves(v)
    elif isinstance(inputs, (tuple, list)):
        for v in inputs:
            yield from leaves(v)


def _map(fn, inputs):
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, dict):
        return {k: _map(fn, v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_map(fn, v) for v in inputs)
    return inputs


def num_samples(inputs) -> int:
    """Samples in ``inputs``: the length of its tensors (all must agree)."""
    sizes = {len(t) if t.dim() else None for t in leaves(inputs)}
    if len(sizes) != 1 or None in sizes:
        kinds = type(inputs).__name__ if not sizes else sorted(str(s) for s in sizes)
        raise ValueError(f"fastprune takes the samples from dim 0 of every input tensor, but these inputs have "
                         f"{kinds} there; inputs whose tensors do not share their first dim (EmbeddingBag's "
                         "(ids, offsets), a PackedSequence) must be padded to a tensor per sample first")
    return sizes.pop()


def take(inputs, s0: int, s1: int):
    """Samples [s0, s1) of ``inputs`` (every tensor sliced along dim 0)."""
    return _map(lambda t: t[s0:s1], inputs)


def join(parts: list):
    """The samples of several ``inputs`` (of one structure) in one."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: join([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(join([p[i] for p in parts]) for i in range(len(first)))
    return first


def move(inputs, device: torch.device):
    """``inputs`` with every tensor on ``device``."""
    return _map(lambda t: t.to(device), inputs)


def call_args(inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with which the model takes ``inputs`` (see :func:`split_batch`)."""
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def call(model: torch.nn.Module, inputs):
    """``model`` applied to ``inputs`` in the form of :func:`split_batch`."""
    args, kwargs = call_args(inputs)
    return model(*args, **kwargs)


def with_sample_dim(inputs):
    """One sample's inputs (as vmap hands them) as a batch of one."""
    return _map(lambda t: t.unsqueeze(0), inputs)


def iterate_batches(data, device: torch.device, max_samples: int | None):
    """Yields (inputs, targets) moved to ``device``, truncated to ``max_samples`` in total."""
    seen = 0
    for batch in data:
        x, y = split_batch(batch)
        n = num_samples(x)
        if max_samples is not None:
            if seen >= max_samples:
                return
            if seen + n > max_samples:
                x, y, n = take(x, 0, max_samples - seen), take(y, 0, max_samples - seen), max_samples - seen
        seen += n
        yield move(x, device), move(y, device)


class SampleStream:
    """Takes samples from an iterable of ``(inputs, targets)`` batches, continuing where
    the previous :meth:`take` stopped and restarting the iterable when it runs out, so
    successive pruning steps see fresh samples (as WoodFisher's ``num_grads`` does).

    :meth:`state_dict` records the RNG state from which the current pass over ``data``
    was started and how many samples of it were taken; a stream loaded with it
    restarts that pass from the same RNG state (a shuffling DataLoader draws the
    same order) and skips those samples."""

    def __init__(self, data):
        self.data = data
        self._it = None
        self._rest = None
        self._samples_this_pass = 0
        self._pass_rng: dict | None = None  # the RNG state the current pass started from
        self._taken = 0  # samples handed out in the current pass
        self._resume: dict | None = None

    def _new_pass(self):
        """Starts a pass over ``data`` and returns its first batch (None if it has none).
        Creating the iterator and fetching the first batch run back to back because a
        DataLoader draws from the RNG at both (worker seed, then shuffling seed)."""
        self._pass_rng = get_rng_state()
        self._it = iter(self.data)
        self._samples_this_pass = self._taken = 0
        return self._fetch()

    def _fetch(self):
        """The next batch of the current pass, or None at its end."""
        try:
            batch = next(self._it)
        except StopIteration:
            self._it = None
            return None
        batch = split_batch(batch)
        self._samples_this_pass += num_samples(batch[0])
        return batch

    def _replay(self, state: dict) -> None:
        """Restarts the recorded pass from its RNG state, leaving torch's RNG where it
        is, and skips the samples already taken from it."""
        now = get_rng_state()
        set_rng_state(state["pass_rng"])
        try:
            self._rest = self._new_pass()
        finally:
            set_rng_state(now)
        if state["taken"]:
            self.take(state["taken"])

    def _next_batch(self):
        if self._rest is not None:
            batch, self._rest = self._rest, None
            return batch
        if self._resume is not None:
            state, self._resume = self._resume, None
            self._replay(state)
            return self._next_batch()
        if self._it is not None:
            batch = self._fetch()
            if batch is not None:
                return batch
            if self._samples_this_pass == 0:  # a whole pass without a sample: restarting cannot help
                raise ValueError("data yielded no samples")
        batch = self._new_pass()
        if batch is None:
            raise ValueError("data yielded no samples")
        return batch

    def take(self, n: int) -> tuple[object, object]:
        """The next ``n`` samples as one ``(inputs, targets)`` pair."""
        xs, ys, got = [], [], 0
        while got < n:
            x, y = self._next_batch()
            size = num_samples(x)
            if size == 0:
                continue
            k = min(n - got, size)
            xs.append(take(x, 0, k))
            ys.append(take(y, 0, k))
            if k < size:
                self._rest = (take(x, k, size), take(y, k, size))
            got += k
            self._taken += k
        return join(xs), join(ys)

    def state_dict(self) -> dict | None:
        """The current pass's starting RNG state and samples taken (None before any)."""
        if self._resume is not None:
            return self._resume
        return None if self._pass_rng is None else {"pass_rng": self._pass_rng, "taken": self._taken}

    def load_state_dict(self, state: dict | None) -> None:
        """Continues the stream recorded by :meth:`state_dict` at the next :meth:`take`."""
        self._it, self._rest, self._resume = None, None, state
