"""Gradual and GraNet schedules, lottery tickets, and SNIP / GraSP / SynFlow scores."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp

import fastprune
from fastprune.criteria import OBD, SNIP, GraSP, Magnitude, SynFlow
from fastprune.loops import LotteryTicket
from fastprune.schedules import Gradual, GraNet, cubic_sparsity


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))


def _batch(seed=0, n=32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def _sparsity(model):
    masks = [m.weight_mask for m in model if hasattr(m, "weight_mask")]
    return sum(int((~m.bool()).sum()) for m in masks) / sum(m.numel() for m in masks)


TOTAL = 12 * 40 + 40 * 30 + 30 * 5


def test_cubic_sparsity_formula():
    assert cubic_sparsity(0, 0.1, 0.9, 10, 50) == 0.1
    assert cubic_sparsity(10, 0.1, 0.9, 10, 50) == 0.1
    assert cubic_sparsity(50, 0.1, 0.9, 10, 50) == 0.9
    assert cubic_sparsity(99, 0.1, 0.9, 10, 50) == 0.9
    assert cubic_sparsity(30, 0.1, 0.9, 10, 50) == pytest.approx(0.9 - 0.8 * 0.5 ** 3)
    assert cubic_sparsity(5, 0.0, 0.5, 5, 5) == 0.5  # start == end: one step to the final sparsity


@pytest.mark.parametrize("start,end,freq,events", [(2, 10, 4, [2, 6, 10]), (0, 9, 4, [0, 4, 8, 9]),
                                                   (3, 3, 1, [3]), (1, 4, 10, [1, 4])])
def test_gradual_prunes_exactly_on_schedule(start, end, freq, events):
    model = _mlp()
    sched = Gradual(Magnitude(), 0.2, 0.8, start_step=start, end_step=end, frequency=freq)
    seen = []
    for t in range(end + 3):
        s = sched.step(model)
        if s is not None:
            seen.append(t)
            assert s == pytest.approx(cubic_sparsity(t, 0.2, 0.8, start, end))
            assert _sparsity(model) == round(s * TOTAL) / TOTAL
    assert seen == events
    assert _sparsity(model) == round(0.8 * TOTAL) / TOTAL


def test_gradual_resumes_from_state_dicts():
    whole, first = _mlp(), _mlp()
    sched_whole = Gradual(Magnitude(), 0.0, 0.9, 0, 20, 5)
    sched_first = Gradual(Magnitude(), 0.0, 0.9, 0, 20, 5)
    for _ in range(8):
        sched_whole.step(whole)
        sched_first.step(first)
    resumed, sched_resumed = _mlp(seed=1), Gradual(Magnitude(), 0.0, 0.9, 0, 20, 5)
    fastprune.load_pruned_state_dict(resumed, first.state_dict())
    sched_resumed.load_state_dict(sched_first.state_dict())
    for _ in range(20):
        sched_whole.step(whole)
        sched_resumed.step(resumed)
    resumed_state = resumed.state_dict()
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed_state[key])


def test_schedule_errors():
    with pytest.raises(ValueError, match="below init_sparsity"):
        Gradual(Magnitude(), 0.5, 0.2, 0, 10, 1)
    with pytest.raises(ValueError, match="start_step <= end_step"):
        Gradual(Magnitude(), 0.0, 0.5, 10, 5, 1)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        Gradual(Magnitude(), 0.0, 1.0, 0, 5, 1)
    sched = Gradual(OBD(), 0.0, 0.5, 0, 5, 1)
    model = _mlp()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="needs data"):
        sched.step(model)
    assert sched.step_count == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="needs data"):
        GraNet(0.0, 0.5, 0, 5, 1).step(model)
    with pytest.raises(ValueError, match="regrow_fraction"):
        GraNet(0.0, 0.5, 0, 5, 1, regrow_fraction=1.5)
    with pytest.raises(ValueError, match="frequency must be an integer"):
        Gradual(Magnitude(), 0.0, 0.5, 0, 5, 0)
    with pytest.raises(TypeError, match="Criterion"):
        Gradual("magnitude", 0.0, 0.5, 0, 5, 1)
    with pytest.raises(ValueError, match="rounds must be an integer >= 1"):
        LotteryTicket(rounds=0)
    with pytest.raises(ValueError, match="num_batches"):
        SNIP(num_batches=0)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        GraSP(temperature=0)
    with pytest.raises(ValueError, match="no samples"):
        SNIP().scores(model, _params(model), data=[])


def test_granet_keeps_sparsity_exact_and_regrows_at_zero():
    model = _mlp()
    sched = GraNet(0.3, 0.8, start_step=0, end_step=6, frequency=2, regrow_fraction=0.5)
    for t in range(8):
        before = {m: m.weight_mask.clone() for m in model if hasattr(m, "weight_mask")}
        s = sched.step(model, data=[_batch(t)])
        if s is None:
            continue
        assert _sparsity(model) == round(s * TOTAL) / TOTAL
        for m in model:
            if hasattr(m, "weight_mask") and m in before:
                grown = m.weight_mask & ~before[m]
                if t < 6:  # r_t > 0 before the end: some weights regrow, and they start at 0
                    assert grown.any()
                assert not m.weight_orig.detach()[grown].any()
        with torch.no_grad():  # training moves the weights between events
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))


def test_lottery_ticket_rewinds_survivors_to_init():
    model = _mlp()
    params = list(model.parameters())  # the same objects after pruning renames them
    init = [p.detach().clone() for p in params]
    starts = []

    def train_fn(m, optimizer_factory):
        starts.append([p.detach().clone() for p in params])
        opt = optimizer_factory(m)
        for i in range(5):
            x, y = _batch(i)
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    history = LotteryTicket(rounds=2, prune_fraction=0.2, progress=False).run(
        model, train_fn, lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    assert history == pytest.approx([0.2, 0.36])
    assert len(starts) == 3
    for start in starts[1:]:  # every later round begins from the initial values
        assert all(torch.equal(a, b) for a, b in zip(start, init))
    assert _sparsity(model) == round(0.36 * TOTAL) / TOTAL
    with pytest.raises(ValueError, match="rewind_step=100"):
        LotteryTicket(rounds=1, rewind_step=100, progress=False).run(
            _mlp(), train_fn, lambda m: torch.optim.SGD(m.parameters(), lr=0.1))


def _params(model):
    return {f"{i}.weight": model[i].weight.detach() for i in (0, 2, 4)}


def _loss(model, p, x, y, temperature=1.0):
    return nn.functional.cross_entropy(functional_call(model, p, (x,)) / temperature, y)


def test_snip_scores_are_gradient_times_weight():
    model, (x, y) = _mlp(), _batch()
    params = dict(model.named_parameters())
    g = grad(lambda p: _loss(model, p, x, y))({k: v.detach() for k, v in params.items()})
    got = SNIP().scores(model, _params(model), data=[(x, y)])
    for k, w in _params(model).items():
        torch.testing.assert_close(got[k], (g[k] * w).abs())


def test_grasp_scores_are_weight_times_hessian_gradient():
    model, (x, y) = _mlp(), _batch()
    p0 = {k: v.detach() for k, v in model.named_parameters()}
    weights = {k: v for k, v in p0.items() if k.endswith("weight")}

    def loss_w(w):
        return _loss(model, p0 | w, x, y, temperature=200.0)
    g = grad(loss_w)(weights)
    _, hg = jvp(grad(loss_w), (weights,), (g,))  # H g by forward-over-reverse
    got = GraSP().scores(model, _params(model), data=[(x, y)])
    for k, w in _params(model).items():
        torch.testing.assert_close(got[k], w * hg[k], rtol=1e-4, atol=1e-10)


def test_synflow_scores_and_model_left_unchanged():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    abs_params = {k: v.detach().double().abs() for k, v in model.named_parameters()}
    ones = torch.ones(1, 12, dtype=torch.float64)
    g = grad(lambda p: functional_call(model, p, (ones,)).sum())(abs_params)
    got = SynFlow(input_shape=(12,)).scores(model, _params(model))
    for k in _params(model):
        torch.testing.assert_close(got[k].double(), (g[k] * abs_params[k]).abs(), rtol=1e-6, atol=0)
    assert all(torch.equal(before[k], v) and before[k].dtype == v.dtype for k, v in model.state_dict().items())
    pruned = _mlp()
    fastprune.prune(pruned, Magnitude(), 0.5, progress=False)
    SynFlow(input_shape=(12,)).scores(pruned, {"0.weight": pruned[0].weight.detach()})
    assert pruned[0].weight.dtype == torch.float32  # the masked weight torch's hook keeps is restored too
    torch.testing.assert_close(pruned[0].weight, pruned[0].weight_orig * pruned[0].weight_mask)
    with pytest.raises(ValueError, match="input_shape"):
        SynFlow().scores(model, _params(model))
    assert SynFlow.default_steps == 100 and math.isclose(
        fastprune.pruning.geometric_schedule(0.9, 100)[-1], 0.9)


def test_schedules_share_one_step_signature_and_take_the_loss_up_front():
    import inspect
    assert inspect.signature(Gradual.step) == inspect.signature(GraNet.step)
    for cls in (Gradual, GraNet):
        params = inspect.signature(cls).parameters
        assert params["progress"].default is False and params["loss_fn"].default is None
    model = _mlp()
    x, y = torch.randn(16, 12), torch.randn(16, 5)
    sched = Gradual(OBD(fisher="empirical"), 0.0, 0.5, 0, 0, 1, loss_fn="mse")
    assert sched.step(model, data=[(x, y)]) == 0.5
    assert fastprune.sparsity_report(model, print_table=False)["global"]["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("make,match", [
    (lambda: Gradual(Magnitude(), 0.0, 0.5, 0, 5, 1.5), "frequency must be an integer >= 1, got 1.5"),
    (lambda: Gradual(Magnitude(), 0.0, float("nan"), 0, 5, 1), "final_sparsity must be a finite number"),
    (lambda: LotteryTicket(rounds=1.5), "rounds must be an integer >= 1, got 1.5"),
    (lambda: LotteryTicket(rounds=2, prune_fraction=1.0), r"prune_fraction must be a number in \(0, 1\)"),
    (lambda: GraSP(temperature=float("nan")), "temperature must be a finite number > 0"),
    (lambda: SNIP(num_batches=True), "num_batches must be an integer"),
])
def test_bad_numbers_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    model = _mlp()
    masks = fastprune.prune(model, Magnitude(), np.float32(0.5), steps=np.int64(2), progress=False)
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * sum(m.numel() for m in masks.values()))
    sched = Gradual(Magnitude(), np.float64(0.0), np.float32(0.5), np.int32(0), np.int64(2), np.int8(1))
    assert sched.frequency == 1 and isinstance(sched.final_sparsity, float)
