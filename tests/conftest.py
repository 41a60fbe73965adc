import pytest
import torch
from torch import nn

import fastprune


def _supported_isas():
    order = ["generic", "avx2", "avx512"]
    return order[:order.index(fastprune.cpu_isa("auto")) + 1]


@pytest.fixture(params=_supported_isas())
def every_cpu_isa(request):
    """Runs the test once per vector extension this CPU supports (the kernels that pick
    theirs at run time: see fastprune.cpu_isa), then restores the default."""
    fastprune.cpu_isa(request.param)
    yield request.param
    fastprune.cpu_isa("auto")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class SmallCNN(nn.Module):
    """Conv1d/Conv2d/Linear mix with biases and a BatchNorm, for target selection tests."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, groups=2)
        self.seq = nn.Conv1d(6, 5, 2)
        self.fc = nn.Linear(5 * 15, 7)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn(self.conv1(x))))
        x = self.seq(x.mean(2))
        return self.fc(x.flatten(1))


@pytest.fixture
def cnn():
    return SmallCNN().eval()


@pytest.fixture
def mlp():
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 4))
