"""What the pruning loop hands a criterion (PruningStep), the context between scoring
and compensation, the plan built once per step, phase timing and error types."""
import copy

import pytest
import torch
from torch import nn

import fastprune
from fastprune.criteria import QM, Criterion, Magnitude, PruningStep, WoodFisher
from fastprune.criteria import loss_model
from fastprune.errors import NonFiniteError
from fastprune.profiling import phase_times
from fastprune.stats import plan as plan_module


def data(n=64, d=20, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


class Spy(Magnitude):
    def __init__(self):
        self.steps = []

    def score_step(self, step):
        self.steps.append(step)
        return super().score_step(step)


def test_step_carries_targets_masks_and_group(mlp):
    fastprune.prune(mlp, Magnitude(), 0.5, modules=["0"], progress=False)
    spy = Spy()
    group = object()  # handed through untouched (resolved only by code that reduces)
    pruner = fastprune.Pruner(mlp, spy, 0.7, modules=["0", "2"])
    pruner.process_group = group
    before = mlp[0].weight_orig.detach() * mlp[0].weight_mask
    pruner.step()
    step = spy.steps[0]
    assert [t.name for t in step.targets] == ["0.weight", "2.weight"] and step.process_group is group
    assert step.masks["0.weight"] is mlp[0].weight_mask and step.masks["2.weight"] is None
    assert torch.equal(step.params["0.weight"], before)


def test_loss_model_sums_over_the_callers_group(mlp, monkeypatch):
    seen = {}
    real = loss_model.FisherCollector.__call__

    def spy(self, *args, process_group=None, **kwargs):
        seen["group"] = process_group
        return real(self, *args, **kwargs)
    monkeypatch.setattr(loss_model.FisherCollector, "__call__", spy)
    sentinel = object()
    pruner = fastprune.Pruner(mlp, QM(fisher="empirical"), 0.5, data=data())
    pruner.process_group = sentinel
    pruner.step()
    assert seen["group"] is sentinel


def test_compensation_uses_its_steps_context_not_the_last_scored(mlp):
    # Two steps scored before either is compensated: each compensation must use its own
    # inverse, as with sequential use (no state hidden in the criterion).
    other = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 4))
    crit = WoodFisher(block_size=16, num_grads=40, damp=1e-3)
    steps = []
    for model in (mlp, other):
        targets = fastprune.find_targets(model)
        params = {t.name: t.weight.detach() for t in targets}
        steps.append(PruningStep(model, targets, params, {t.name: None for t in targets}, data(), None))
    scored = [crit.score_step(s) for s in steps]
    masks = [{k: v > v.flatten().median() for k, v in sc.items()} for sc, _ in scored]
    interleaved = [crit.compensate(s, m, ctx) for s, m, (_, ctx) in zip(steps, masks, scored)]
    for s, m, got in zip(steps, masks, interleaved):
        sc, ctx = WoodFisher(block_size=16, num_grads=40, damp=1e-3).score_step(s)
        want = crit.compensate(s, m, ctx)
        for k in want:
            torch.testing.assert_close(got[k], want[k])


def test_standalone_scores_read_masks_from_the_model(mlp):
    fastprune.prune(mlp, Magnitude(), 0.5, progress=False)
    params = {t.name: t.weight.detach() for t in fastprune.find_targets(mlp)}
    crit = WoodFisher(block_size=16, num_grads=40, damp=1e-3)
    via_scores = crit.scores(mlp, params, data(), None)
    crit = WoodFisher(block_size=16, num_grads=40, damp=1e-3)
    via_step, _ = crit.score_step(PruningStep.of(mlp, params, data(), None))
    for k in via_scores:
        assert torch.equal(via_scores[k], via_step[k])


def test_a_criterion_must_implement_one_of_the_two():
    with pytest.raises(NotImplementedError, match="scores\\(\\) or score_step\\(\\)"):
        Criterion().scores(nn.Linear(2, 2), {})


def test_woodfisher_plans_the_statistics_once_per_step(mlp, monkeypatch):
    # 64 samples formed 8 at a time: eight chunks, one plan.
    import fastprune.criteria.woodfisher as wf
    monkeypatch.setattr(wf, "_CHUNK_BYTES", 8 * 4 * sum(t.numel for t in fastprune.find_targets(mlp)))
    plans = []
    real = plan_module.plan_stats
    monkeypatch.setattr("fastprune.stats.blocks.plan_stats", lambda *a, **k: plans.append(1) or real(*a, **k))
    mlp = mlp.double()
    batches = [(x.double(), y) for x, y in data()]
    ref = copy.deepcopy(mlp)
    fastprune.prune(mlp, WoodFisher(block_size=16, num_grads=64), 0.5, data=batches, progress=False)
    assert len(plans) == 1
    monkeypatch.undo()  # the same step with one chunk
    fastprune.prune(ref, WoodFisher(block_size=16, num_grads=64), 0.5, data=batches, progress=False)
    for a, b in zip(mlp.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_phase_times_split_a_woodfisher_run(mlp):
    with phase_times() as times:
        fastprune.prune(mlp, WoodFisher(block_size=16, num_grads=40), 0.5, data=data(), progress=False)
    assert set(times) == {"stats", "inverse", "update"} and all(v > 0 for v in times.values())
    with phase_times() as times:
        fastprune.prune(mlp, QM(), 0.6, data=data(), progress=False)
    assert set(times) == {"stats"}
    with phase_times() as outer, phase_times() as inner:
        fastprune.fisher_diag(mlp, data(), progress=False)
    assert outer["stats"] == inner["stats"] > 0


def test_non_finite_error_is_caught_as_either_builtin():
    assert issubclass(NonFiniteError, FloatingPointError) and issubclass(NonFiniteError, ValueError)
    assert fastprune.NonFiniteError is NonFiniteError


def test_one_modules_parser(mlp):
    with pytest.raises(ValueError, match=r"module\(s\) \['1'\] \(ReLU\) have no parameters"):
        fastprune.fisher_diag(mlp, data(), modules=["1"], progress=False)
    with pytest.raises(TypeError, match="module names or nn.Module types"):
        fastprune.fisher_diag(mlp, data(), modules=[3], progress=False)
    by_type = fastprune.fisher_diag(mlp, data(), modules=[nn.Linear], progress=False)
    by_name = fastprune.fisher_diag(mlp, data(), modules=["0", "2", "4"], progress=False)
    assert list(by_type) == list(by_name) and len(by_type) == 6
