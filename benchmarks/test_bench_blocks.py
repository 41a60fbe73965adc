"""Fisher blocks (B = 128) for every layer: fastprune's fused accumulation vs torch.bmm
on the same block shapes (throughput), and vs the WoodFisher-style pipeline (one
backward per sample, then one rank-1 update of every block per sample)."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastprune
from models import make

B = 128
CASES = {"mlp-256": "mlp-256", "cnn-128": "cnn-128"}
WF_SAMPLES = 16  # the per-sample pipeline is timed on this many samples and scaled


def block_shapes(model):
    return [math.ceil(t.numel / B) for t in fastprune.find_targets(model)]


def flops(model, n):
    return 2 * n * sum(block_shapes(model)) * B * B


def fastprune_blocks(model, x, y):
    fb = fastprune.FisherBlocks(model, B)
    fb.accumulate(x, y, "cross_entropy")
    return fb


def bmm_same_shapes(model, x, y):
    nb = sum(block_shapes(model))
    g = bmm_same_shapes.cache.setdefault((nb, len(x)), torch.randn(nb, B, len(x)))
    return torch.bmm(g, g.transpose(1, 2))


bmm_same_shapes.cache = {}


def woodfisher_style(model, x, y):
    targets = fastprune.find_targets(model)
    blocks = [torch.zeros(math.ceil(t.numel / B), B, B) for t in targets]
    for i in range(WF_SAMPLES):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for t, blk in zip(targets, blocks):
            g = F.pad(t.param.grad.flatten(), (0, blk.shape[0] * B - t.numel)).view(-1, B)
            blk.add_(g.unsqueeze(2) * g.unsqueeze(1))  # rank-1 update of every block
    return blocks


METHODS = {"fastprune": fastprune_blocks, "torch.bmm": bmm_same_shapes, "woodfisher-style": woodfisher_style}


# The method varies fastest: each group's methods run back to back, so a slow
# phase of this shared machine hits all of them, not one method's every group.
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model_key", list(CASES))
def test_fisher_blocks(benchmark, model_key, method):
    model, x, y = make(model_key)
    benchmark.group = f"fisher-blocks {model_key}"
    benchmark.extra_info.update(method=method, gflop=flops(model, len(x)) / 1e9)
    if method == "woodfisher-style":
        benchmark.extra_info["scale"] = len(x) / WF_SAMPLES
    benchmark.pedantic(METHODS[method], args=(model, x, y), rounds=3, iterations=1, warmup_rounds=1)
