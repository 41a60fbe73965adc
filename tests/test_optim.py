"""Masked optimizers: bit-for-bit torch.optim on surviving weights, zeros elsewhere."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import fastprune
from fastprune import _ops
from fastprune.optim import MaskedAdam, MaskedAdamW, MaskedSGD, masked

SIZES = [(7,), (33, 65), (100_003,)]  # odd sizes exercise the vector loops' tails


def _problem(shape, dtype, sparsity=0.9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=dtype)
    mask = torch.rand(shape, generator=gen) >= sparsity
    return w * mask, mask, gen


@pytest.fixture
def fused_only(monkeypatch):
    """Fails the test if the optimizers leave the fused op for the unfused fallback."""
    def fail(*args, **kwargs):
        raise AssertionError("the unfused fallback ran")
    monkeypatch.setattr(fastprune.optim, "_sgd_unfused", fail)
    monkeypatch.setattr(fastprune.optim, "_adam_unfused", fail)


def _run_pair(make_ref, make_ours, shape, dtype, steps=12):
    """Runs torch's optimizer + re-masking and the masked optimizer on the same gradients."""
    w, mask, gen = _problem(shape, dtype)
    ref, ours = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    opt_ref, opt_ours = make_ref([ref]), make_ours([ours], masks=[mask])
    for _ in range(steps):
        g = torch.randn(shape, generator=gen, dtype=dtype) * mask  # pruned weights get zero gradients
        ref.grad, ours.grad = g.clone(), g.clone()
        opt_ref.step()
        with torch.no_grad():
            ref.mul_(mask)
        opt_ours.step()
    return ref, ours, mask, opt_ref, opt_ours


SGD_CONFIGS = [dict(lr=0.1), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
               dict(lr=0.02, momentum=0.5, dampening=0.3, weight_decay=5e-4, maximize=True)]


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", SGD_CONFIGS)
def test_sgd_bitwise_equal_to_torch(shape, dtype, config, fused_only):
    ref, ours, mask, opt_ref, opt_ours = _run_pair(
        lambda p: torch.optim.SGD(p, foreach=False, **config), lambda p, masks: MaskedSGD(p, masks=masks, **config),
        shape, dtype)
    assert torch.equal(ours.detach(), ref.detach())
    assert not ours.detach()[~mask].any()
    if config.get("momentum"):
        buf, buf_ref = opt_ours.state[ours]["momentum_buffer"], opt_ref.state[ref]["momentum_buffer"]
        assert torch.equal(buf[mask], buf_ref[mask]) and not buf[~mask].any()


ADAM_CONFIGS = [(torch.optim.Adam, MaskedAdam, dict(lr=1e-3)),
                (torch.optim.Adam, MaskedAdam, dict(lr=1e-2, weight_decay=1e-2, betas=(0.8, 0.99), maximize=True)),
                (torch.optim.AdamW, MaskedAdamW, dict(lr=1e-3)),
                (torch.optim.AdamW, MaskedAdamW, dict(lr=3e-3, weight_decay=0.1, eps=1e-6)),
                (torch.optim.Adam, MaskedAdam, dict(lr=1e-3, betas=(0.3, 0.9)))]  # lerp weight >= 0.5


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("torch_cls,cls,config", ADAM_CONFIGS)
def test_adam_bitwise_equal_to_torch(shape, dtype, torch_cls, cls, config, fused_only):
    ref, ours, mask, opt_ref, opt_ours = _run_pair(
        lambda p: torch_cls(p, foreach=False, **config), lambda p, masks: cls(p, masks=masks, **config), shape, dtype)
    assert torch.equal(ours.detach(), ref.detach())
    state, state_ref = opt_ours.state[ours], opt_ref.state[ref]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key][mask], state_ref[key][mask]) and not state[key][~mask].any()
    assert torch.equal(state["step"], state_ref["step"])


def test_unmasked_parameters_follow_torch_exactly(fused_only):
    w = torch.randn(1001)
    ref, ours = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    opt_ref, opt_ours = torch.optim.AdamW([ref], foreach=False), MaskedAdamW([ours])
    for _ in range(5):
        g = torch.randn(1001)
        ref.grad, ours.grad = g.clone(), g.clone()
        opt_ref.step()
        opt_ours.step()
    assert torch.equal(ref, ours)


def _pruned_mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    fastprune.prune(model, fastprune.criteria.Magnitude(), 0.8, progress=False)
    return model


def _train(model, opt, steps=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("make", [lambda m: MaskedSGD(m, lr=0.1, momentum=0.9), lambda m: MaskedAdamW(m, lr=1e-2)])
def test_model_masks_found_automatically_and_pruned_weights_stay_zero(make, fused_only):
    model = _pruned_mlp()
    opt = make(model)
    _train(model, opt)
    for module in (model[0], model[2]):
        assert not module.weight_orig.detach()[~module.weight_mask].any()
        for value in opt.state[module.weight_orig].values():
            if value.shape == module.weight_orig.shape:
                assert not value[~module.weight_mask].any()
        assert module.weight_orig.detach()[module.weight_mask].abs().sum() > 0


def test_masks_from_torch_prune_and_masks_created_after_the_optimizer(fused_only):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, masks=model)
    torch_prune.l1_unstructured(model[0], "weight", amount=0.5)  # float mask, made after the optimizer
    _train(model, opt)
    mask = model[0].weight_mask.bool()
    assert not model[0].weight_orig.detach()[~mask].any()
    assert not opt.state[model[0].weight_orig]["momentum_buffer"][~mask].any()


@pytest.mark.parametrize("make_ours,make_torch", [
    (lambda p: MaskedSGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=False)),
    (lambda p: MaskedAdamW(p, lr=1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False))])
def test_state_dict_loads_into_torch_optimizer_and_back(make_ours, make_torch):
    model = _pruned_mlp()
    opt = make_ours(model)
    _train(model, opt)
    twin = _pruned_mlp()
    twin.load_state_dict(model.state_dict())
    torch_opt = make_torch(twin.parameters())
    # deepcopy: load_state_dict keeps the given tensors where dtype and device match
    torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert torch_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    back = make_ours(twin)
    back.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    _train(model, opt, steps=2, seed=5)
    _train(twin, back, steps=2, seed=5)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make_ref,make_ours", [
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=False),
     lambda p, masks: MaskedSGD(p, lr=0.1, momentum=0.9, masks=masks)),
    (lambda p: torch.optim.Adam(p, weight_decay=0.1, foreach=False),
     lambda p, masks: MaskedAdam(p, weight_decay=0.1, masks=masks))])
def test_non_contiguous_parameters_use_the_unfused_path(make_ref, make_ours):
    w, mask = torch.randn(9, 6), torch.rand(6, 9) > 0.5
    ref, ours = nn.Parameter(w.clone().t()), nn.Parameter(w.clone().t())  # transposed: not contiguous
    opt_ref, opt_ours = make_ref([ref]), make_ours([ours], [mask])
    for _ in range(3):
        g = torch.randn(6, 9) * mask
        ref.grad, ours.grad = g.clone(), g.clone()
        opt_ref.step()
        with torch.no_grad():
            ref.mul_(mask)
        opt_ours.step()
    assert torch.equal(ref, ours)


def test_half_parameters_use_the_unfused_path():
    half = nn.Parameter(torch.randn(10).half())
    half.grad = torch.randn(10).half()
    MaskedAdam([half], masks=[torch.arange(10) % 2 == 0]).step()
    assert not half.detach()[1::2].any()


def test_masked_wrapper_zeroes_weights_and_state_of_any_optimizer():
    model = _pruned_mlp()
    opt = masked(torch.optim.RMSprop(model.parameters(), lr=1e-2, momentum=0.9), model)
    _train(model, opt)
    w, mask = model[0].weight_orig, model[0].weight_mask
    assert not w.detach()[~mask].any()
    assert not opt.state[w]["square_avg"][~mask].any() and not opt.state[w]["momentum_buffer"][~mask].any()
    assert opt.param_groups[0]["lr"] == 1e-2  # everything else is the wrapped optimizer's


def test_errors_name_the_problem():
    p = nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="amsgrad"):
        MaskedAdam([p], amsgrad=True)
    with pytest.raises(ValueError, match="one entry"):
        MaskedSGD([p], lr=0.1, masks=[None, None])
    with pytest.raises(ValueError, match=r"masks\[0\] has shape \(3,\)"):
        MaskedSGD([p], lr=0.1, masks=[torch.ones(3, dtype=torch.bool)])
    model = _pruned_mlp()
    with pytest.raises(ValueError, match="not both"):
        MaskedSGD(model, lr=0.1, masks=model)
    with pytest.raises(TypeError, match="Optimizer"):
        masked(object(), None)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        _ops.masked_sgd_(torch.zeros(3), torch.zeros(3), None, torch.ones(3), lr=0.1)
    with pytest.raises(RuntimeError, match="needs a momentum_buffer"):
        _ops.masked_sgd_(torch.zeros(3), torch.zeros(3), None, None, lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="grad must be contiguous"):
        _ops.masked_sgd_(torch.zeros(3, 4), torch.zeros(4, 3).t(), None, None, lr=0.1)
    with pytest.raises(RuntimeError, match="mask must be a contiguous bool tensor of the parameter's shape"):
        _ops.masked_sgd_(torch.zeros(3), torch.zeros(3), None, torch.ones(4, dtype=torch.bool), lr=0.1)
    with pytest.raises(RuntimeError, match="step counts from 1"):
        _ops.masked_adam_(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), None, lr=1e-3, beta1=0.9,
                          beta2=0.999, eps=1e-8, weight_decay=0.0, step=0, decoupled=True)
    with pytest.raises(ValueError, match="differentiable"):
        MaskedSGD([p], lr=0.1, differentiable=True)
    with pytest.raises(RuntimeError, match="grad must match"):
        _ops.masked_adam_(torch.zeros(3), torch.zeros(4), torch.zeros(3), torch.zeros(3), None, lr=1e-3, beta1=0.9,
                          beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, decoupled=True)


def test_opcheck():
    p, g, b = torch.randn(40), torch.randn(40), torch.randn(40)
    mask = torch.rand(40) > 0.5
    torch.library.opcheck(torch.ops.fastprune.masked_sgd_.default,
                          (p, g, b, mask, 0.1, 0.9, 0.0, 1e-4, True, False, False))
    torch.library.opcheck(torch.ops.fastprune.masked_adam_.default,
                          (p, g, b.abs(), torch.rand(40), mask, 1e-3, 0.9, 0.999, 1e-8, 0.01, 3, True, False))


@pytest.mark.skipif(not (torch.cuda.is_available() and _ops.has_cuda_kernels()), reason="needs CUDA kernels")
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_cuda_matches_cpu(kind):
    w, mask, gen = _problem((10_001,), torch.float64)
    params = [nn.Parameter(w.clone()), nn.Parameter(w.clone().cuda())]
    opts = [MaskedSGD([p], lr=0.1, momentum=0.9, masks=[mask.to(p.device)]) if kind == "sgd"
            else MaskedAdamW([p], lr=1e-2, masks=[mask.to(p.device)]) for p in params]
    for _ in range(5):
        g = torch.randn(10_001, generator=gen, dtype=torch.float64)
        for p, opt in zip(params, opts):
            p.grad = g.to(p.device)
            opt.step()
    torch.testing.assert_close(params[1].detach().cpu(), params[0].detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make", [lambda m: MaskedAdam(m, lr=1e-2), lambda m: MaskedAdamW(m, lr=1e-2),
                                  lambda m: MaskedSGD(m, lr=1e-2, momentum=0.9),
                                  lambda m: masked(torch.optim.Adam(m.parameters(), lr=1e-2), m)])
def test_pruned_entries_stay_exactly_zero_in_16_bit(dtype, make):
    # float16's eps of 1e-8 underflows: a pruned entry's Adam update is 0/0 there.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)
    fastprune.prune(model, fastprune.criteria.Magnitude(), 0.5, progress=False)
    opt = make(model)
    x = torch.randn(4, 8, dtype=dtype)
    for _ in range(3):
        model(x).float().sum().backward()
        opt.step()
        opt.zero_grad()
    for layer in (model[0], model[2]):
        pruned = ~layer.weight_mask.bool()
        assert bool((layer.weight_orig[pruned] == 0).all()) and bool(layer.weight_orig.isfinite()[~pruned].all())
    assert bool(model(x).isfinite().all())
