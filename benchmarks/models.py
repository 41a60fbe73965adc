"""The benchmark models of the statistics issue, with their inputs."""
import torch
from torch import nn

from fastprune.bench.reference import resnet20


def lenet300(batch):
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    return model, torch.randn(batch, 784), torch.randint(0, 10, (batch,))


def cnn(batch):
    layers = []
    for c_in, c_out in [(3, 32), (32, 64), (64, 128)]:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 4 * 4, 10))
    return model, torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))


class TokenFFN(nn.Module):
    """Token-wise FFN block 256->512->256 on (N, 64, 256) inputs, mean-pooled to 10 classes."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(256, 512), nn.Linear(512, 256), nn.Linear(256, 10)

    def forward(self, x):
        return self.head((x + self.down(torch.relu(self.up(x)))).mean(1))


def ffn(batch):
    return TokenFFN(), torch.randn(batch, 64, 256), torch.randint(0, 10, (batch,))


def resnet(batch):
    """CIFAR ResNet-20, the pruning literature's standard small model (BatchNorm in eval mode)."""
    return resnet20(), torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))


MODELS = {"mlp-256": (lenet300, 256), "mlp-1024": (lenet300, 1024), "cnn-128": (cnn, 128), "ffn-64": (ffn, 64),
          "resnet20-128": (resnet, 128)}


def make(key):
    fn, batch = MODELS[key]
    torch.manual_seed(0)
    model, x, y = fn(batch)
    return model.eval(), x, y
