"""Global threshold selection: fastprune.kth_smallest vs what users do today
(torch.cat of all scores then kthvalue / topk), on a ResNet-50-sized score list."""
import pytest
import torch

from fastprune import kth_smallest

# Layer sizes of a ResNet-50-like model: 25.5M scores in 54 tensors.
SIZES = [9408] + [4096, 36864, 16384, 16384] * 3 + [32768, 147456, 65536, 131072] * 4 + \
        [131072, 589824, 262144, 524288] * 6 + [524288, 2359296, 1048576, 2097152] * 3
K_FRACTION = 0.9


@pytest.fixture(scope="module")
def scores():
    return [torch.rand(n) for n in SIZES]


def k_of(scores):
    return int(K_FRACTION * sum(s.numel() for s in scores))


@pytest.mark.benchmark(group="global-threshold")
def test_fastprune_kth_smallest(benchmark, scores):
    benchmark.extra_info["method"] = "fastprune"
    benchmark(kth_smallest, scores, k_of(scores))


@pytest.mark.benchmark(group="global-threshold")
def test_torch_cat_kthvalue(benchmark, scores):
    benchmark.extra_info["method"] = "torch.cat + kthvalue"
    benchmark(lambda: torch.cat([s.flatten() for s in scores]).kthvalue(k_of(scores)))


@pytest.mark.benchmark(group="global-threshold")
def test_torch_cat_topk(benchmark, scores):
    # torch.nn.utils.prune.global_unstructured: concatenation + topk of the pruned count.
    benchmark.extra_info["method"] = "torch.cat + topk (prune.global_unstructured)"
    benchmark(lambda: torch.topk(torch.cat([s.flatten() for s in scores]), k_of(scores), largest=False))
