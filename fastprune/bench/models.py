"""Reference models and a minimal training loop used by the demo, tests and benchmarks."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["mlp", "train", "accuracy"]


def mlp(sizes=(64, 128, 64, 10)) -> nn.Sequential:
    """A ReLU MLP with Linear layers of the given widths."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 30, batch_size: int = 64,
          lr: float = 1e-3, seed: int = 0, progress: bool = False) -> nn.Module:
    """Adam on cross-entropy; pruned weights stay pruned (torch's mask hook)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(epochs), desc="train", disable=not progress, leave=False):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc
