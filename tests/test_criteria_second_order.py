"""WoodFisher / WoodTaylor and the loss-model criteria inside fastprune.prune."""
import copy

import pytest
import torch
from torch import nn

import fastprune
from fastprune.second_order import obs
from fastprune.criteria import OBD, QM, LossModel, Magnitude, Taylor, WoodFisher, WoodTaylor
from fastprune.inverse import FisherInverse
from fastprune.batches import SampleStream
from torchfunc_reference import per_sample_grads


def batches(n=96, d=20, classes=4, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, n, size)]


def effective(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_woodfisher_one_step_matches_explicit_obs(mlp):
    data = batches()
    before = copy.deepcopy(mlp)
    crit = WoodFisher(block_size=16, num_grads=40, damp=1e-3)
    masks = fastprune.prune(mlp, crit, 0.5, data=data, loss_fn="cross_entropy", progress=False)
    # The first 40 samples, single-sample gradients, explicit blocks and inverses.
    x, y = torch.cat([b[0] for b in data])[:40], torch.cat([b[1] for b in data])[:40]
    ps = per_sample_grads(before, x, y)
    for name, w0 in effective(before).items():
        if not name.endswith("weight"):
            continue
        inv = FisherInverse.from_grads(ps[name].flatten(1).double(), 1e-3, 16)
        keep = masks[name].flatten()
        d = obs.obs_update(inv, w0.flatten(), ~keep)
        expect = ((w0.flatten().double() + d) * keep).view_as(w0)
        module = mlp.get_submodule(name.rsplit(".", 1)[0])
        torch.testing.assert_close(module.weight.double(), expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("crit", [WoodFisher(block_size=8, num_grads=20, damp=1e-3),
                                  WoodFisher(block_size=None, num_grads=20, damp=1e-3, update="group"),
                                  WoodTaylor(block_size=8, num_grads=50, damp=1e-2, fisher_mini_batch=2),
                                  QM(), OBD(fisher="empirical"), Taylor()])
def test_steps_never_revive_and_hit_sparsity(mlp, crit):
    fastprune.prune(mlp, Magnitude(), 0.3, progress=False)
    first = {n: m.weight_mask.clone() for n, m in mlp.named_modules() if hasattr(m, "weight_mask")}
    masks = fastprune.prune(mlp, crit, 0.8, data=batches(), loss_fn="cross_entropy", steps=3, progress=False)
    for name, m in first.items():
        assert not (masks[f"{name}.weight"] & ~m.bool()).any()  # pruned stays pruned
        assert (mlp.get_submodule(name).weight[~masks[f"{name}.weight"]] == 0).all()
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert kept == total - round(0.8 * total)


def test_update_false_keeps_survivors(mlp):
    before = effective(mlp)
    masks = fastprune.prune(mlp, WoodFisher(block_size=8, num_grads=20, update=False), 0.5, data=batches(),
                            loss_fn="cross_entropy", progress=False)
    for name, keep in masks.items():
        w = mlp.get_submodule(name.rsplit(".", 1)[0]).weight
        assert torch.equal(w[keep], before[name][keep])


def test_woodfisher_beats_magnitude_on_loss(mlp):
    data = batches(n=256, size=64)
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    mlp.train()
    opt = torch.optim.Adam(mlp.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(mlp(x), y).backward()
        opt.step()
    mlp.eval()
    other = copy.deepcopy(mlp)
    fastprune.prune(mlp, WoodFisher(block_size=None, num_grads=256, damp=1e-4), 0.7, data=data,
                    loss_fn="cross_entropy", progress=False)
    fastprune.prune(other, Magnitude(), 0.7, progress=False)
    with torch.no_grad():
        assert nn.functional.cross_entropy(mlp(x), y) < nn.functional.cross_entropy(other(x), y)


def test_failure_in_compensation_leaves_model_unchanged(mlp, monkeypatch):
    fastprune.prune(mlp, Magnitude(), 0.2, progress=False)
    state = {k: v.clone() for k, v in mlp.state_dict().items()}

    def boom(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr("fastprune.criteria.woodfisher.obs_update", boom)
    for steps in (1, 2):
        with pytest.raises(RuntimeError, match="boom"):
            fastprune.prune(mlp, WoodFisher(block_size=8, num_grads=10), 0.6, data=batches(),
                            loss_fn="cross_entropy", steps=steps, progress=False)
        for k, v in mlp.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_num_grads_draws_fresh_samples_each_step(mlp, monkeypatch):
    seen = []
    real = SampleStream.take

    def spy(self, n):
        x, y = real(self, n)
        seen.append(x.clone())
        return x, y
    monkeypatch.setattr(SampleStream, "take", spy)
    fastprune.prune(mlp, WoodFisher(block_size=8, num_grads=40), 0.5, data=batches(n=96), loss_fn="cross_entropy",
                    steps=3, progress=False)
    data = torch.cat([b[0] for b in batches(n=96)])
    assert torch.equal(seen[0], data[:40]) and torch.equal(seen[1], data[40:80])
    assert torch.equal(seen[2], torch.cat([data[80:], data[:24]]))  # cycles


def test_sample_stream_errors():
    with pytest.raises(ValueError, match="no samples"):
        SampleStream([]).take(3)
    with pytest.raises(ValueError, match="\\(inputs, targets\\)"):
        SampleStream([torch.zeros(3)]).take(2)


@pytest.mark.parametrize("kwargs,match", [(dict(update="yes"), "update must be"), (dict(num_grads=0), "num_grads"),
                                          (dict(damp=0.0), "damp must be"), (dict(block_size=0), "block_size"),
                                          (dict(fisher_mini_batch=0), "fisher_mini_batch")])
def test_woodfisher_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WoodFisher(**kwargs)


def test_woodfisher_memory_budget_leaves_model_unchanged(mlp):
    state = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(MemoryError, match="block_size"):
        fastprune.prune(mlp, WoodFisher(block_size=64, num_grads=100, max_memory=1000), 0.5, data=batches(),
                        loss_fn="cross_entropy", progress=False)
    for k, v in mlp.state_dict().items():
        assert torch.equal(v, state[k])


def test_woodfisher_budget_counts_the_per_sample_gradients():
    """1 M weights in blocks of 1 need 16 MB of blocks, but 16 per-sample gradients of
    4 MB each (and their copies) are formed at once: about 192 MB."""
    big = nn.Sequential(nn.Linear(1000, 1000))
    data = [(torch.randn(32, 1000), torch.randint(0, 10, (32,)))]
    with pytest.raises(MemoryError, match=r"N=32 gradients and block_size=1 needs about 19\d MiB"):
        fastprune.prune(big, WoodFisher(block_size=1, num_grads=32, max_memory=100 << 20), 0.5, data=data,
                        loss_fn="cross_entropy", progress=False)


@pytest.mark.parametrize("crit,order,grad_term", [(Taylor(), 1, True), (QM(fisher="empirical"), 2, True),
                                                   (OBD(fisher="empirical"), 2, False),
                                                   (LossModel(order=2, fisher="empirical", lam=0.7), 2, True)])
def test_loss_model_scores_equal_formula(mlp, crit, order, grad_term):
    data = batches()
    params = {n: p.detach() for n, p in mlp.named_parameters() if n.endswith("weight")}
    scores = crit.scores(mlp, params, data, "cross_entropy")
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    ps = per_sample_grads(mlp, x, y)
    for name, w in params.items():
        g, h = ps[name].mean(0), ps[name].square().mean(0)
        change = (-g * w if grad_term else 0) + (0.5 * h * w.square() if order == 2 else 0)
        torch.testing.assert_close(scores[name], change.abs() + 0.5 * crit.lam * w.square(), rtol=1e-4, atol=1e-7)


def test_large_lam_reduces_to_magnitude(mlp):
    a, b = copy.deepcopy(mlp), copy.deepcopy(mlp)
    ma = fastprune.prune(a, QM(fisher="true", lam=1e9), 0.6, data=batches(), loss_fn="cross_entropy", progress=False)
    mb = fastprune.prune(b, Magnitude(), 0.6, progress=False)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("kwargs,match", [(dict(order=3), "order must be"), (dict(fisher="gauss"), "fisher must"),
                                          (dict(lam=-1.0), "lam must"), (dict(order=1, gradient=False), "OBD")])
def test_loss_model_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossModel(**kwargs)


def test_sample_stream_all_empty_batches_raises():
    empty = (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no samples"):
        SampleStream([empty, empty]).take(2)


class BadCompensation(Magnitude):
    def __init__(self, value):
        self.value = value

    def compensate(self, step, new_masks, context):
        return {k: self.value(w) for k, w in step.params.items()}


@pytest.mark.parametrize("value", [lambda w: w.flatten(), lambda w: torch.full_like(w, float("nan"))])
def test_bad_compensation_is_rejected_and_model_unchanged(mlp, value):
    state = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(ValueError, match="compensated"):
        fastprune.prune(mlp, BadCompensation(value), 0.5, progress=False)
    for k, v in mlp.state_dict().items():
        assert torch.equal(v, state[k])
