"""Batch iteration: the ``(inputs, targets)`` batches every data-driven path reads, and
drawing a fixed number of samples from a DataLoader, step after step."""
from __future__ import annotations

import torch

from .rng import get_rng_state, set_rng_state

__all__ = ["model_device", "iterate_batches", "SampleStream"]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def iterate_batches(data, device: torch.device, max_samples: int | None):
    """Yields (inputs, targets) moved to ``device``, truncated to ``max_samples`` in total."""
    seen = 0
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("data must yield (inputs, targets) batches, e.g. a DataLoader over a TensorDataset")
        x, y = batch
        if max_samples is not None:
            if seen >= max_samples:
                return
            x, y = x[: max_samples - seen], y[: max_samples - seen]
        seen += len(x)
        yield x.to(device), y.to(device) if isinstance(y, torch.Tensor) else y


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
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("data must yield (inputs, targets) batches, e.g. a DataLoader over a TensorDataset")
        self._samples_this_pass += len(batch[0])
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

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``n`` samples as one ``(inputs, targets)`` pair."""
        xs, ys, got = [], [], 0
        while got < n:
            x, y = self._next_batch()
            if len(x) == 0:
                continue
            k = min(n - got, len(x))
            xs.append(x[:k])
            ys.append(y[:k])
            if k < len(x):
                self._rest = (x[k:], y[k:])
            got += k
            self._taken += k
        return torch.cat(xs), torch.cat(ys)

    def state_dict(self) -> dict | None:
        """The current pass's starting RNG state and samples taken (None before any)."""
        if self._resume is not None:
            return self._resume
        return None if self._pass_rng is None else {"pass_rng": self._pass_rng, "taken": self._taken}

    def load_state_dict(self, state: dict | None) -> None:
        """Continues the stream recorded by :meth:`state_dict` at the next :meth:`take`."""
        self._it, self._rest, self._resume = None, None, state
