"""Resumable pruning runs: a Pruner stopped after some steps and restored from its
state_dict (plus the model's) into fresh objects ends exactly where an uninterrupted
run does, including shuffled data, WoodFisher's sample position and MC sampling."""
import io

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastprune
from fastprune.criteria import QM, Magnitude, WoodFisher
from fastprune.batches import SampleStream


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4)).double()


def loader():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 10, generator=gen, dtype=torch.float64), torch.randint(0, 4, (50,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)  # shuffles from torch's global RNG


CRITERIA = {
    # 7 gradients a step: steps end inside batches and passes over the 50 samples
    "woodfisher": lambda: WoodFisher(block_size=8, num_grads=7, damp=1e-3),
    "qm-mc": lambda: QM(fisher="mc", max_samples=20),
}


def _pruner(m, kind):
    return fastprune.Pruner(m, CRITERIA[kind](), 0.8, data=loader(), loss_fn="cross_entropy", steps=5)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("kind", list(CRITERIA))
@pytest.mark.parametrize("stop_after", [1, 3])
def test_resumed_run_equals_uninterrupted(kind, stop_after):
    torch.manual_seed(123)
    whole = model()
    masks = _pruner(whole, kind).run(progress=False)

    torch.manual_seed(123)
    first = model()
    pruner = _pruner(first, kind)
    for _ in range(stop_after):
        pruner.step()
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "pruner": pruner.state_dict()}, buf)
    del first, pruner
    torch.rand(1000)  # the new process's RNG is elsewhere: the state must restore it

    buf.seek(0)
    ckpt = torch.load(buf)  # the default weights_only=True loads it, as in the README example
    resumed = model()
    fastprune.load_pruned_state_dict(resumed, ckpt["model"])
    pruner = _pruner(resumed, kind)
    pruner.load_state_dict(ckpt["pruner"])
    assert pruner.completed == stop_after
    got = pruner.run(progress=False)
    assert pruner.done
    for k in masks:
        assert torch.equal(got[k], masks[k]), k
    for k, v in _state(whole).items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_without_the_rng_state_a_shuffled_run_diverges():
    """The resume test can fail: dropping the RNG state changes WoodFisher's samples."""
    torch.manual_seed(123)
    whole = model()
    _pruner(whole, "woodfisher").run(progress=False)
    torch.manual_seed(123)
    first = model()
    pruner = _pruner(first, "woodfisher")
    pruner.step()
    state = pruner.state_dict()
    state["rng"] = {"cpu": torch.manual_seed(7).get_state()}
    state["criterion_state"]["stream"]["pass_rng"] = state["rng"]
    resumed = _pruner(first, "woodfisher")
    resumed.load_state_dict(state)
    resumed.run(progress=False)
    assert any(not torch.equal(first.state_dict()[k], v) for k, v in _state(whole).items())


def test_sample_stream_resumes_inside_a_batch():
    torch.manual_seed(5)
    stream = SampleStream(loader())
    stream.take(13)
    state = stream.state_dict()
    rng = torch.get_rng_state()
    expected = [stream.take(11) for _ in range(6)]  # crosses into the next shuffled pass
    torch.set_rng_state(rng)
    resumed = SampleStream(loader())
    resumed.load_state_dict(state)
    assert resumed.state_dict() is state
    for x, y in expected:
        gx, gy = resumed.take(11)
        assert torch.equal(gx, x) and torch.equal(gy, y)


def test_load_state_dict_errors():
    m = model()
    pruner = fastprune.Pruner(m, Magnitude(), 0.8, steps=4)
    pruner.step()
    state = pruner.state_dict()
    with pytest.raises(ValueError, match="steps=4, but this Pruner has steps=3"):
        fastprune.Pruner(model(), Magnitude(), 0.8, steps=3).load_state_dict(state)
    with pytest.raises(ValueError, match="criterion='Magnitude'"):
        fastprune.Pruner(model(), QM(), 0.8, data=[], steps=4).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with [0-9]+ pruned weights .* load the model state_dict saved with it first"):
        fastprune.Pruner(model(), Magnitude(), 0.8, steps=4).load_state_dict(state)  # masks not loaded
    pruner.run(progress=False)
    with pytest.raises(RuntimeError, match="all 4 steps are done"):
        pruner.step()


def test_failed_run_restores_model_and_step_count():
    m = model()
    crit = Magnitude()
    pruner = fastprune.Pruner(m, crit, 0.8, steps=4)
    pruner.step()
    before = _state(m)
    calls = []

    def scores(model, params, data=None, loss_fn=None):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return Magnitude.scores(crit, model, params)
    crit.scores = scores
    with pytest.raises(RuntimeError, match="boom"):
        pruner.run(progress=False)
    assert pruner.completed == 1
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k


def test_resume_of_a_model_pruned_before_the_run():
    """Weights pruned before the run count towards the target, so the model can be
    sparser than the schedule's step: the state records the actual count."""
    torch.manual_seed(0)
    m = model()
    fastprune.prune(m, Magnitude(), 0.5, progress=False)
    pruner = fastprune.Pruner(m, Magnitude(), 0.8, steps=4)  # step 1 of the schedule is 33 %
    pruner.step()
    state, weights = pruner.state_dict(), _state(m)
    resumed = model()
    fastprune.load_pruned_state_dict(resumed, weights)
    again = fastprune.Pruner(resumed, Magnitude(), 0.8, steps=4)
    again.load_state_dict(state)
    again.run(progress=False)
    pruner.run(progress=False)
    for k, v in _state(m).items():
        assert torch.equal(resumed.state_dict()[k], v), k
