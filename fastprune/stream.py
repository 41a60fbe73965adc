"""Drawing a fixed number of samples from a DataLoader, step after step."""
from __future__ import annotations

import torch

__all__ = ["SampleStream"]


class SampleStream:
    """Takes samples from an iterable of ``(inputs, targets)`` batches, continuing where
    the previous :meth:`take` stopped and restarting the iterable when it runs out, so
    successive pruning steps see fresh samples (as WoodFisher's ``num_grads`` does)."""

    def __init__(self, data):
        self.data = data
        self._it = None
        self._rest = None
        self._samples_this_pass = 0

    def _next_batch(self):
        if self._rest is not None:
            batch, self._rest = self._rest, None
            return batch
        while True:
            if self._it is None:
                self._it = iter(self.data)
                self._samples_this_pass = 0
            try:
                batch = next(self._it)
                break
            except StopIteration:
                self._it = None
                if self._samples_this_pass == 0:  # a whole pass without a sample: restarting cannot help
                    raise ValueError("data yielded no samples") from None
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("data must yield (inputs, targets) batches, e.g. a DataLoader over a TensorDataset")
        self._samples_this_pass += len(batch[0])
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
        return torch.cat(xs), torch.cat(ys)
