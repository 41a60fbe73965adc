"""Real reference data and checkpoints from the shared folder (``../shared`` next to
the repository, or ``$FASTPRUNE_SHARED``): MNIST and the public WoodFisher
checkpoints (MLPNet on MNIST, ResNet-20 on CIFAR-10)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import load_idx_dataset

__all__ = ["shared_dir", "load_mnist", "MLPNet", "load_mlpnet", "resnet20", "load_resnet20"]


def shared_dir() -> Path:
    """``$FASTPRUNE_SHARED``, else the ``shared`` folder beside the repository."""
    env = os.environ.get("FASTPRUNE_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared"


def _need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; set FASTPRUNE_SHARED to the folder holding data/ and reference/")
    return path


def load_mnist(split: str = "test", root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST ``split`` ("train" or "test") as (N, 784) float32 normalised with
    (x / 255 - 0.1307) / 0.3081, and int64 labels."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    x_tr, y_tr, x_te, y_te = load_idx_dataset("mnist", Path(root) if root is not None else
                                              shared_dir() / "data" / "mnist")
    return (x_tr, y_tr) if split == "train" else (x_te, y_te)


class MLPNet(nn.Module):
    """WoodFisher's MLPNet: 784-40-20-10, ReLU, no biases, log-softmax output."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 40, False), nn.Linear(40, 20, False), nn.Linear(20, 10, False)

    def forward(self, x):
        x = F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))
        return F.log_softmax(self.fc3(x), dim=1)


def load_mlpnet(path: str | Path | None = None) -> MLPNet:
    """MLPNet with the public checkpoint (dense MNIST test accuracy 93.97 %), in eval mode."""
    path = Path(path) if path else shared_dir() / "reference" / "woodfisher" / "mnist_25_epoch_93.97.ckpt"
    state = torch.load(_need(path), map_location="cpu", weights_only=False)["model_state_dict"]
    model = MLPNet()
    model.load_state_dict({f"fc{i}.weight": state[f"module.fc{i}._layer.weight"] for i in (1, 2, 3)})
    return model.eval()


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class _ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        stages, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            stages.append(nn.Sequential(*[_BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                          for i in range(3)]))
            c_in = c_out
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet20(num_classes: int = 10) -> nn.Module:
    """The standard CIFAR ResNet-20 (3 stages of 3 basic blocks, 16/32/64 channels)."""
    return _ResNet20(num_classes)


def load_resnet20(path: str | Path | None = None) -> nn.Module:
    """ResNet-20 with the public CIFAR-10 checkpoint (dense top-1 91.96 %), in eval mode."""
    path = Path(path) if path else shared_dir() / "reference" / "woodfisher" / "resnet20_cifar10.pth.tar"
    state = torch.load(_need(path), map_location="cpu", weights_only=False)["state_dict"]
    model = resnet20()
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model.eval()
