"""Masked optimizer step on 10 M parameters at 90 % sparsity: fastprune's fused step
vs torch.optim (foreach and single-tensor) followed by re-applying the mask, which
is what users do today."""
import pytest
import torch

from fastprune.optim import MaskedAdamW, MaskedSGD

NUMEL, SPARSITY = 10_000_000, 0.9
ROUNDS = dict(rounds=10, iterations=1, warmup_rounds=2)
CONFIGS = {"sgd": (torch.optim.SGD, MaskedSGD, dict(lr=0.01, momentum=0.9, weight_decay=1e-4)),
           "adamw": (torch.optim.AdamW, MaskedAdamW, dict(lr=1e-3, weight_decay=1e-2))}


def _problem():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(NUMEL, generator=gen) >= SPARSITY
    p = torch.nn.Parameter(torch.randn(NUMEL, generator=gen) * mask)
    p.grad = torch.randn(NUMEL, generator=gen) * mask
    return p, mask


def torch_then_mask(cls, config, foreach):
    p, mask = _problem()
    opt = cls([p], foreach=foreach, **config)

    def step():
        opt.step()
        with torch.no_grad():
            p.mul_(mask)
    return step


def fastprune_step(cls, config):
    p, mask = _problem()
    return cls([p], masks=[mask], **config).step


# The method varies fastest: each group's methods run back to back, so a slow
# phase of this shared machine hits all of them, not one method's every group.
@pytest.mark.parametrize("method", ["fastprune", "torch-foreach+mask", "torch-single+mask"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_masked_step(benchmark, kind, method):
    torch_cls, ours, config = CONFIGS[kind]
    step = fastprune_step(ours, config) if method == "fastprune" else \
        torch_then_mask(torch_cls, config, foreach=method == "torch-foreach+mask")
    benchmark.group = f"masked-step {kind}"
    benchmark.extra_info["method"] = method
    benchmark.pedantic(step, **ROUNDS)
