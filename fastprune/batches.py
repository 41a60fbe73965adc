"""Batch iteration: the ``(inputs, targets)`` batches every data-driven path reads, and
drawing a fixed number of samples from a DataLoader, step after step."""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence, unpack_sequence

from .rng import get_rng_state, set_rng_state

__all__ = ["model_device", "split_batch", "num_samples", "take", "join", "move", "leaves", "call", "call_args",
           "with_sample_dim", "splittable", "has_packed", "iterate_batches", "SampleStream"]


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


def _packed(x) -> bool:
    return isinstance(x, PackedSequence)


def leaves(inputs):
    """Every tensor in ``inputs`` (a tensor, a PackedSequence's data, or tuples, lists and
    dicts of them)."""
    if isinstance(inputs, torch.Tensor):
        yield inputs
    elif _packed(inputs):
        yield inputs.data
    elif isinstance(inputs, dict):
        for v in inputs.values():
            yield from leaves(v)
    elif isinstance(inputs, (tuple, list)):
        for v in inputs:
            yield from leaves(v)


def _sizes(inputs) -> set:
    """The sample count each part of ``inputs`` has (None for a 0-d tensor)."""
    if _packed(inputs):
        return {int(inputs.batch_sizes[0])}
    if isinstance(inputs, torch.Tensor):
        return {len(inputs) if inputs.dim() else None}
    parts = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ()
    return set().union(*(_sizes(p) for p in parts))


def num_samples(inputs, targets=None) -> int:
    """Samples in ``inputs``: the length of its tensors (of a PackedSequence: its
    sequences). Inputs whose parts disagree (EmbeddingBag's ``(ids, offsets)``) count
    the targets."""
    sizes = _sizes(inputs)
    if len(sizes) == 1 and None not in sizes:
        return sizes.pop()
    if isinstance(targets, torch.Tensor) and targets.dim() >= 1:
        return len(targets)
    raise ValueError(f"fastprune takes the samples from dim 0 of every input tensor, but these inputs have "
                     f"{sorted(str(s) for s in sizes) or type(inputs).__name__} there, and no targets tensor says "
                     "how many samples there are")


def has_packed(inputs) -> bool:
    """Whether ``inputs`` holds a PackedSequence."""
    if _packed(inputs):
        return True
    parts = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ()
    return any(has_packed(p) for p in parts)


def splittable(inputs) -> bool:
    """Whether ``inputs`` can be cut into samples (every part has the same sample count)."""
    sizes = _sizes(inputs)
    return len(sizes) == 1 and None not in sizes


def take(inputs, s0: int, s1: int):
    """Samples [s0, s1) of ``inputs`` (every tensor sliced along dim 0)."""
    if not splittable(inputs):
        raise ValueError("these inputs cannot be cut into samples: their tensors do not share their first dim "
                         "(EmbeddingBag's (ids, offsets)); this path needs one row per sample in every input, so "
                         "pass the bags as a 2-D (N, L) tensor, padded with padding_idx")
    return _take(inputs, s0, s1)


def _take(inputs, s0, s1):
    if _packed(inputs):
        return pack_sequence(unpack_sequence(inputs)[s0:s1], enforce_sorted=False)
    if isinstance(inputs, torch.Tensor):
        return inputs[s0:s1]
    if isinstance(inputs, dict):
        return {k: _take(v, s0, s1) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_take(v, s0, s1) for v in inputs)
    return inputs


def _map(fn, inputs):
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if _packed(inputs):
        return inputs
    if isinstance(inputs, dict):
        return {k: _map(fn, v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_map(fn, v) for v in inputs)
    return inputs


def join(parts: list):
    """The samples of several ``inputs`` (of one structure) in one."""
    first = parts[0]
    if _packed(first):
        return pack_sequence([s for p in parts for s in unpack_sequence(p)], enforce_sorted=False)
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: join([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(join([p[i] for p in parts]) for i in range(len(first)))
    return first


def move(inputs, device: torch.device):
    """``inputs`` with every tensor on ``device``."""
    if _packed(inputs):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: move(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(move(v, device) for v in inputs)
    return inputs.to(device) if isinstance(inputs, torch.Tensor) else inputs


def call_args(inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with which the model takes ``inputs`` (see :func:`split_batch`)."""
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, (tuple, list)) and not _packed(inputs):
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
        n = num_samples(x, y)
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
        self._samples_this_pass += num_samples(*batch)
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
            size = num_samples(x, y)
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
