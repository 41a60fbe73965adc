"""Constructs of users' models that the exact paths used to get silently wrong: tied
and shared Parameters, layers fed (T, N, ...), attention that bypasses its
submodule's forward, recurrent layers. Every statistic is checked against torch.func
(or a per-sample backward loop) in float64; every mask against its every use."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fastprune
from fastprune.criteria import OBD, QM, Magnitude, WoodFisher


def per_sample_loop(model, x, y, loss):
    """{name: (N, *shape)} per-sample gradients by one backward per sample, keyed like
    named_parameters() (a tied Parameter once, under its first name)."""
    names, params = zip(*[(k, p) for k, p in model.named_parameters() if p.requires_grad])
    rows = [torch.autograd.grad(loss(model(x[n:n + 1]), y[n:n + 1]).sum(), params, allow_unused=True,
                                materialize_grads=True) for n in range(len(x))]
    return {k: torch.stack([r[i] for r in rows]) for i, k in enumerate(names)}


def ce(o, t):
    return nn.functional.cross_entropy(o, t, reduction="none")


def assert_diag(model, x, y, loss=ce, collector=None, **kwargs):
    """fisher_diag (or ``collector``) on two batches against one backward per sample."""
    ref = per_sample_loop(model, x, y, loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = [(x[:5], y[:5]), (x[5:], y[5:])]
        diag, grad = collector(batches, return_grad=True, progress=False) if collector is not None else \
            fastprune.fisher_diag(model, batches, loss, return_grad=True, progress=False, **kwargs)
    for name, p in model.named_parameters():
        key = name[:-5] if name.endswith("_orig") else name
        mask = 1.0 if key == name else getattr(model.get_submodule(key.rpartition(".")[0]),
                                              key.rpartition(".")[2] + "_mask")
        torch.testing.assert_close(diag[key], ref[name].square().mean(0) * mask, rtol=1e-9, atol=1e-12, msg=key)
        torch.testing.assert_close(grad[key], ref[name].mean(0) * mask, rtol=1e-9, atol=1e-12, msg=key)
    return diag


class TiedLM(nn.Module):
    """An embedding tied to the output layer, as in GPT-2, Llama with tie_word_embeddings."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids)))).mean(1)


class SharedLinear(nn.Module):
    """One Parameter assigned to two Linears."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


def test_tied_embedding_statistics_sum_the_uses():
    model = TiedLM().double()
    ids, y = torch.randint(0, 11, (9, 4)), torch.randint(0, 11, (9,))
    diag = assert_diag(model, ids, y)
    assert "head.weight" not in diag  # one Parameter, one entry, under its first name


def test_shared_linear_statistics_and_one_mask_in_every_use():
    model = SharedLinear().double()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    assert_diag(model, x, y)
    masks = fastprune.prune(model, Magnitude(), 0.5, progress=False)
    assert set(masks) == {"a.weight", "out.weight"}
    assert model.a.weight_mask is model.b.weight_mask and model.a.weight_orig is model.b.weight_orig
    assert torch.equal(model.a.weight, model.b.weight) and int((model.b.weight == 0).sum()) >= 12
    assert_diag(model, x, y)  # statistics of the pruned, still tied model


def test_tied_embedding_pruned_through_the_head_is_pruned_in_the_embedding():
    model = TiedLM()
    fastprune.prune(model, Magnitude(), 0.5, modules=["head"], progress=False)
    assert model.emb.weight_mask is model.head.weight_mask
    ids = torch.arange(11).unsqueeze(1)
    rows = model.emb(ids).squeeze(1)  # the embedding's forward sees the mask too
    assert torch.equal(rows == 0, ~model.head.weight_mask)
    before = model.emb.weight_orig.detach().clone()
    fastprune.prune(model, OBD(fisher="empirical"), 0.7, modules=["head"], data=[(torch.randint(0, 11, (8, 3)),
                                                                                   torch.randint(0, 11, (8,)))],
                    progress=False)
    assert model.emb.weight_orig is model.head.weight_orig and not torch.equal(model.emb.weight_mask, before != 0)
    state = model.state_dict()
    fresh = TiedLM()
    fastprune.load_pruned_state_dict(fresh, state)
    assert fresh.emb.weight_mask is fresh.head.weight_mask or torch.equal(fresh.emb.weight_mask, fresh.head.weight_mask)
    fastprune.remove_masks(model)
    assert model.emb.weight is model.head.weight  # still tied after making it permanent


def test_woodfisher_on_a_shared_parameter_compensates_once():
    model = SharedLinear().double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    fastprune.prune(model, WoodFisher(block_size=5, num_grads=40, damp=1e-3), 0.4, data=[(x, y)], progress=False)
    assert model.a.weight_orig is model.b.weight_orig and torch.equal(model.a.weight, model.b.weight)


class BatchSecond(nn.Module):
    """Token model whose Linear and Embedding see (T, N, ...), as batch_first=False code does."""

    def __init__(self, dim=6):
        super().__init__()
        self.emb = nn.Embedding(13, dim)
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):  # ids (N, T)
        h = self.norm(torch.relu(self.fc(self.emb(ids.t()))))  # (T, N, dim)
        return self.head(h.mean(0))


def test_layers_fed_time_first_keep_their_exact_formulas():
    from fastprune.stats import plan as plan_module
    model = BatchSecond().double()
    ids, y = torch.randint(0, 13, (9, 5)), torch.randint(0, 3, (9,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the (T, N, ...) layers are found and transposed
        fastprune.fisher_diag(model, [(ids, y)], strict=True, progress=False)
    plan = plan_module.plan_stats(model)
    from fastprune.stats.verify import verify_plan
    verify_plan(model, plan, ids, y, ce)
    assert plan.sample_dims == {"emb": 1, "fc": 1, "norm": 1} and not plan.fallback
    assert_diag(model, ids, y)


class Merged(nn.Module):
    """A Linear over (N * T, D): its samples share dim 0 with the positions."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):  # x (N, T, 4)
        n, t, d = x.shape
        return self.head(torch.tanh(self.fc(x.reshape(n * t, d))).reshape(n, t, d).mean(1))


def test_layers_whose_samples_merge_with_positions_fall_back():
    model = Merged().double()
    x, y = torch.randn(9, 3, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    with pytest.warns(UserWarning, match="Linear 'fc'.*cannot apply"):
        fastprune.fisher_diag(model, [(x, y)], progress=False)
    with pytest.raises(ValueError, match="cannot apply"):
        fastprune.fisher_diag(Merged().double(), [(x, y)], strict=True, progress=False)
    assert_diag(model, x, y)


class Encoder(nn.Module):
    def __init__(self, batch_first, dim=8):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(17, dim)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        h = self.emb(ids if self.batch_first else ids.t())
        h = self.layer(h)
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_encoder_layer_statistics(batch_first):
    model = Encoder(batch_first).double()
    ids, y = torch.randint(0, 17, (9, 5)), torch.randint(0, 3, (9,))
    assert_diag(model, ids, y)


def test_attention_out_proj_mask_in_force_and_trained():
    model = Encoder(batch_first=True)
    fastprune.prune(model, Magnitude(), 0.6, progress=False)
    attn = model.layer.self_attn
    ids = torch.randint(0, 17, (4, 5))
    # The masked model must equal a dense copy whose pruned weights are zero.
    dense = copy.deepcopy(model)
    fastprune.remove_masks(dense)
    torch.testing.assert_close(model(ids), dense(ids))
    model(ids).sum().backward()
    grad = attn.out_proj.weight_orig.grad
    assert grad is not None and bool((grad[attn.out_proj.weight_mask.bool()] != 0).any())
    assert bool((grad[~attn.out_proj.weight_mask.bool()] == 0).all())


def test_attention_statistics_after_pruning():
    model = Encoder(batch_first=False).double()
    fastprune.prune(model, Magnitude(), 0.5, progress=False)
    assert_diag(model, torch.randint(0, 17, (9, 5)), torch.randint(0, 3, (9,)))


@pytest.mark.parametrize("make", [lambda: TiedLM(), lambda: BatchSecond(), lambda: Encoder(batch_first=False)])
def test_a_reused_collector_on_tied_time_first_and_attention_models(make):
    # The plan, its (T, N) sample dims and its fallbacks are kept between calls; pruning
    # in between re-plans. Every call must still equal one backward per sample.
    model = make().double()
    ids, y = torch.randint(0, 11, (9, 5)), torch.randint(0, 3, (9,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        collector = fastprune.FisherCollector(model, ce)
    for _ in range(2):
        assert_diag(model, ids, y, collector=collector)
    fastprune.prune(model, Magnitude(), 0.5, progress=False)
    assert_diag(model, ids, y, collector=collector)


class SmallConvNet(nn.Module):
    """Convolutions with 32 channels and more: the CPU's conv_grad_bias_sq route."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 48, 3, stride=2, padding=1)
        self.head = nn.Linear(48, 3)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


# Layers with 32 outputs and more reach the CPU kernels that sum over positions in
# registers (Linear over tokens, convolutions); the small models above do not.
WIDE = {"tied LM": lambda: TiedLM(vocab=40, dim=32), "batch second": lambda: BatchSecond(dim=32),
        "encoder, batch_first=False": lambda: Encoder(False, dim=32),
        "encoder, batch_first=True": lambda: Encoder(True, dim=32)}


@pytest.mark.parametrize("make", list(WIDE.values()), ids=list(WIDE))
def test_wide_token_models_against_one_backward_per_sample(make):
    torch.manual_seed(0)
    model = make().double()
    ids, y = torch.randint(0, 13, (9, 5)), torch.randint(0, 3, (9,))
    assert_diag(model, ids, y)
    fastprune.prune(model, Magnitude(), 0.5, progress=False)
    assert_diag(model, ids, y)


def test_wide_convolutions_channels_last_against_one_backward_per_sample():
    torch.manual_seed(0)
    model = SmallConvNet().double().to(memory_format=torch.channels_last)
    x = torch.randn(9, 3, 8, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    assert_diag(model, x, torch.randint(0, 3, (9,)))


@pytest.mark.parametrize("cell", [nn.RNN, nn.GRU, nn.LSTM])
def test_recurrent_layers_get_statistics(cell):
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cell(4, 5, batch_first=True)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = Recurrent().double()
    assert_diag(model, torch.randn(9, 6, 4, dtype=torch.float64), torch.randint(0, 3, (9,)))


def test_probe_runs_once_per_model_and_shape(monkeypatch):
    from fastprune.stats import verify
    calls = []
    real = verify._probe
    monkeypatch.setattr(verify, "_probe", lambda *a: calls.append(1) or real(*a))
    model = nn.Sequential(nn.Linear(4, 3))
    data = [(torch.randn(6, 4), torch.randint(0, 3, (6,)))]
    for _ in range(3):
        fastprune.fisher_diag(model, data, progress=False)
    assert len(calls) == 1
    fastprune.fisher_diag(model, [(torch.randn(6, 2, 4), torch.randint(0, 3, (6, 2)))], lambda o, t:
                          ce(o.flatten(0, 1), t.flatten()).view(-1, 2).mean(1), progress=False)
    assert len(calls) == 2


def test_qm_on_a_tied_model_prunes_one_target():
    model = TiedLM()
    data = [(torch.randint(0, 11, (8, 3)), torch.randint(0, 11, (8,)))]
    masks = fastprune.prune(model, QM(fisher="empirical"), 0.5, data=data, modules=["head", "mix"], progress=False)
    assert set(masks) == {"mix.weight", "head.weight"}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    now = model.state_dict()
    return set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("wrap", [
    lambda m: nn.utils.parametrizations.spectral_norm(m),
    lambda m: nn.utils.parametrizations.weight_norm(m),
    lambda m: nn.utils.parametrizations.orthogonal(m),
])
def test_parametrized_weights_are_refused_clearly(wrap):
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), wrap(nn.Linear(6, 6)))
    state = _state(model)
    with pytest.raises(ValueError, match=r"Linear '2' compute their weight from other parameters.*modules="):
        fastprune.prune(model, Magnitude(), 0.5, progress=False)
    assert _same(model, state)
    fastprune.prune(model, Magnitude(), 0.5, modules=["0"], progress=False)  # the others still prune


def test_soft_masks_are_refused():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    torch.nn.utils.prune.custom_from_mask(model[0], "weight", torch.full((6, 6), 0.5))
    state = _state(model)
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        fastprune.prune(model, Magnitude(), 0.5, progress=False)
    assert _same(model, state)
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        fastprune.apply_masks(model, {"2.weight": torch.rand(3, 6)})
    assert _same(model, state)
    from fastprune.optim import MaskedSGD
    with pytest.raises(ValueError, match=r"masks\[0\].*values other than 0 and 1"):
        MaskedSGD([model[2].weight], lr=0.1, masks=[torch.rand(3, 6)])
    pruned = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    fastprune.prune(pruned, Magnitude(), 0.5, progress=False)
    sd = pruned.state_dict()
    sd["0.weight_mask"] = torch.rand(6, 6)
    fresh = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    before = _state(fresh)
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        fastprune.load_pruned_state_dict(fresh, sd)
    assert _same(fresh, before) and not hasattr(fresh[0], "weight_orig")


def test_old_hook_based_weight_norm_is_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = nn.utils.weight_norm(nn.Linear(6, 6))
    with pytest.raises(ValueError, match="compute their weight from other parameters"):
        fastprune.prune(nn.Sequential(layer), Magnitude(), 0.5, progress=False)


def _pruned_mlp():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    fastprune.prune(model, Magnitude(), 0.5, progress=False)
    return model


@pytest.mark.parametrize("spoil,error,match", [
    (lambda sd: sd.update({"0.weight_orig": torch.zeros(5, 6)}), ValueError, "shapes differ"),
    (lambda sd: sd.pop("2.bias"), KeyError, r"missing \['2.bias'\]"),
    (lambda sd: sd.update({"9.weight": torch.zeros(1)}), KeyError, "unexpected"),
])
def test_failed_load_pruned_state_dict_changes_nothing(spoil, error, match):
    sd = dict(_pruned_mlp().state_dict())
    spoil(sd)
    fresh = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    before = _state(fresh)
    with pytest.raises(error, match=match):
        fastprune.load_pruned_state_dict(fresh, sd)
    assert _same(fresh, before) and not hasattr(fresh[0], "weight_orig") and not fresh[0]._forward_pre_hooks


def test_failed_load_sparse_changes_nothing(tmp_path):
    from fastprune.sparse import load_sparse, save_sparse
    save_sparse(_pruned_mlp(), tmp_path / "m.safetensors")
    other = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    other[2].bias = nn.Parameter(torch.zeros(4))  # only the bias disagrees
    before = _state(other)
    with pytest.raises(ValueError, match="2.bias"):
        load_sparse(tmp_path / "m.safetensors", other)
    assert _same(other, before) and not hasattr(other[0], "weight_orig")


def test_deepcopy_after_a_forward_with_autograd():
    # The masked weight is part of the graph after such a forward: torch's own pruning
    # cannot be deep-copied then (an EMA or SWA copy in a training loop).
    model = _pruned_mlp()
    model(torch.randn(2, 6)).sum().backward()
    twin = copy.deepcopy(model)
    x = torch.randn(3, 6)
    torch.testing.assert_close(twin(x), model(x))
    assert twin[0].weight_orig is not model[0].weight_orig
    twin[0].weight_orig.data.add_(1.0)
    assert not torch.equal(twin[0].weight_orig, model[0].weight_orig)
    twin(x).sum().backward()  # the copy trains, its mask in force
    assert bool((twin[0].weight_orig.grad[~twin[0].weight_mask] == 0).all())


def test_gradient_criteria_refuse_frozen_targets_by_name(mlp):
    mlp[0].weight.requires_grad_(False)
    data = [(torch.randn(8, 20), torch.randint(0, 4, (8,)))]
    for crit in (QM(), WoodFisher(num_grads=8, block_size=4)):
        with pytest.raises(ValueError, match=r"\['0.weight'\] have requires_grad=False.*modules="):
            fastprune.prune(mlp, crit, 0.5, data=data, progress=False)
    fastprune.prune(mlp, Magnitude(), 0.5, progress=False)  # needs no gradient
    fastprune.prune(mlp, QM(), 0.6, data=data, modules=["2", "4"], progress=False)


def test_one_shot_generator_with_several_steps_is_refused_up_front(mlp):
    gen = ((torch.randn(8, 20), torch.randint(0, 4, (8,))) for _ in range(2))
    with pytest.raises(ValueError, match="one-shot iterator.*re-iterable"):
        fastprune.prune(mlp, QM(), 0.5, data=gen, steps=3, progress=False)


def test_empty_batches_are_skipped(mlp):
    empty = (torch.zeros(0, 20), torch.zeros(0, dtype=torch.long))
    full = (torch.randn(8, 20), torch.randint(0, 4, (8,)))
    a = fastprune.fisher_diag(mlp, [empty, full, empty], progress=False)
    b = fastprune.fisher_diag(mlp, [full], progress=False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    fb = fastprune.FisherBlocks(mlp, 8)
    fb.accumulate(*empty)
    assert fb.num_samples == 0
    from fastprune.criteria import SNIP
    with pytest.raises(ValueError, match="no samples"):
        fastprune.prune(mlp, SNIP(), 0.5, data=[empty], progress=False)
    with pytest.raises(ValueError, match="no samples"):
        fastprune.fisher_diag(mlp, [empty], progress=False)


@pytest.mark.parametrize("name", ["SNIP", "GraSP"])
def test_scoring_at_init_does_not_train_batchnorm(name):
    from fastprune import criteria
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    before = {k: v.clone() for k, v in model.named_buffers()}
    fastprune.prune(model, getattr(criteria, name)(), 0.5, data=[(torch.randn(8, 4), torch.randint(0, 3, (8,)))],
                    progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers() if not k.endswith("_mask"))


def test_a_nan_batch_does_not_poison_fisher_blocks():
    model = nn.Sequential(nn.Linear(4, 3)).double()
    fb, ref = fastprune.FisherBlocks(model, 4), fastprune.FisherBlocks(model, 4)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(fastprune.NonFiniteError, match="'0.weight'"):
        fb.accumulate(bad, y)
    fb.accumulate(x, y)
    ref.accumulate(x, y)
    assert fb.num_samples == 6 and torch.equal(fb.blocks("0.weight"), ref.blocks("0.weight"))


def test_granet_step_with_bad_labels_changes_nothing():
    from fastprune.schedules import GraNet
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    sched = GraNet(0.3, 0.8, start_step=0, end_step=4, frequency=2)
    before = _state(model)
    with pytest.raises(Exception):
        sched.step(model, data=[(torch.randn(4, 6), torch.full((4,), 7))])  # labels out of range
    assert _same(model, before) and not hasattr(model[0], "weight_orig") and sched.step_count == 0


@pytest.mark.parametrize("spoil,match", [
    (lambda st: st.update(completed=99), "completed=99"),
    (lambda st: st.update(completed=-1), "completed=-1"),
    (lambda st: st.update(rng={"cpu": torch.zeros(3, dtype=torch.uint8)}), "RNG state"),
    (lambda st: st.update(shapes=[[3, 5]]), "shapes"),
])
def test_pruner_refuses_a_state_that_is_not_its_own(spoil, match):
    pruner = fastprune.Pruner(nn.Sequential(nn.Linear(4, 3)), Magnitude(), 0.5, steps=4)
    pruner.step()
    state = pruner.state_dict()
    spoil(state)
    fresh = fastprune.Pruner(nn.Sequential(nn.Linear(4, 3)), Magnitude(), 0.5, steps=4)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(state)
    assert fresh.completed == 0 and torch.equal(torch.get_rng_state(), rng)


def test_losses_receive_the_model_output_as_returned():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.fc(x)}

    model = DictOut().double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    assert_diag(model, x, y, loss=lambda o, t: ce(o["logits"], t))
    with pytest.raises(ValueError, match="needs the model to return one tensor"):
        fastprune.fisher_diag(model, [(x, y)], "cross_entropy", progress=False)
    with pytest.raises(ValueError, match="must return a tensor of logits"):
        fastprune.fisher_diag(model, [(x, y)], lambda o, t: ce(o["logits"], t), fisher="true", progress=False)


def test_sparsity_report_counts_converted_and_tied_layers():
    from fastprune.sparse import to_sparse
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    fastprune.prune(model, Magnitude(), 0.9, progress=False)
    want = fastprune.sparsity_report(model, print_table=False)
    to_sparse(model, torch.randn(1, 64), calibrate=False)  # both become SparseLinear
    assert fastprune.sparsity_report(model, print_table=False) == want
    assert fastprune.sparsity_report(model, modules=["2"], print_table=False)["layers"] == \
        {"2.weight": want["layers"]["2.weight"]}
    tied = SharedLinear()
    fastprune.prune(tied, Magnitude(), 0.5, progress=False)
    assert list(fastprune.sparsity_report(tied, print_table=False)["layers"]) == ["a.weight", "out.weight"]


def test_meta_models_are_refused_clearly():
    model = nn.Linear(4, 3, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        fastprune.prune(model, Magnitude(), 0.5, progress=False)
    with pytest.raises(ValueError, match="meta device"):
        fastprune.fisher_diag(model, [(torch.randn(2, 4), torch.tensor([0, 1]))], progress=False)


class KeywordLM(nn.Module):
    """A Hugging Face style model: keyword inputs, a dict output."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 6)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.fc(self.emb(input_ids))) * attention_mask.unsqueeze(-1)
        return {"logits": self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))}


def _dict_batches(n=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 13, (n, 5), generator=gen)
    mask = torch.ones(n, 5)
    mask[::2, 3:] = 0
    labels = torch.randint(0, 3, (n,), generator=gen)
    return [{"input_ids": ids[i:i + 4], "attention_mask": mask[i:i + 4], "labels": labels[i:i + 4]}
            for i in range(0, n, 4)]


def logits_ce(out, t):
    return ce(out["logits"], t)


def test_dict_batches_of_keyword_arguments():
    model = KeywordLM().double()
    batches = _dict_batches()
    diag, grad = fastprune.fisher_diag(model, batches, logits_ce, return_grad=True, progress=False)
    rows = []
    for b in batches:
        for n in range(len(b["labels"])):
            out = model(b["input_ids"][n:n + 1], b["attention_mask"][n:n + 1].double())
            rows.append(torch.autograd.grad(logits_ce(out, b["labels"][n:n + 1]).sum(), list(model.parameters())))
    for i, (name, _) in enumerate(model.named_parameters()):
        ref = torch.stack([r[i] for r in rows])
        torch.testing.assert_close(diag[name], ref.square().mean(0), rtol=1e-9, atol=1e-12, msg=name)
        torch.testing.assert_close(grad[name], ref.mean(0), rtol=1e-9, atol=1e-12, msg=name)
    masks = fastprune.prune(model, WoodFisher(block_size=6, num_grads=6, damp=1e-3), 0.5, data=batches,
                            loss_fn=logits_ce, steps=2, progress=False)
    assert set(masks) == {"fc.weight", "head.weight"}


def test_tuple_inputs_and_unsplittable_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

        def forward(self, x, z):
            return self.a(x) + self.b(z)

    model = TwoInputs().double()
    x, z, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64), torch.randint(0, 4, (6,))
    diag = fastprune.fisher_diag(model, [((x, z), y)], progress=False)
    ref = torch.stack([torch.autograd.grad(ce(model(x[n:n + 1], z[n:n + 1]), y[n:n + 1]).sum(), model.a.weight)[0]
                       for n in range(6)])
    torch.testing.assert_close(diag["a.weight"], ref.square().mean(0))
    with pytest.raises(ValueError, match="cannot be cut into samples"):
        fastprune.batches.take((torch.arange(7), torch.tensor([0, 3])), 0, 1)


def test_attention_in_proj_is_left_dense_with_a_warning(monkeypatch):
    monkeypatch.setattr("fastprune.targets._warned", set())  # warned once per process otherwise
    model = Encoder(batch_first=True)
    with pytest.warns(UserWarning, match=r"\['layer.self_attn'\] keep their in_proj_weight"):
        masks = fastprune.prune(model, Magnitude(), 0.5, progress=False)
    assert "layer.self_attn.out_proj.weight" in masks and not hasattr(model.layer.self_attn, "in_proj_weight_orig")


@pytest.mark.parametrize("make", [BatchSecond, lambda: BatchSecond(dim=32), SmallConvNet],
                         ids=["narrow", "wide", "conv"])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_16_bit_statistics_match_float64(dtype, tol, make):
    torch.manual_seed(0)
    ref_model = make().double()
    conv = isinstance(ref_model, SmallConvNet)
    ids = torch.randn(12, 3, 8, 8) if conv else torch.randint(0, 13, (12, 5))
    y = torch.randint(0, 3, (12,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = fastprune.fisher_diag(ref_model, [(ids.double() if conv else ids, y)], progress=False)
        low = fastprune.fisher_diag(copy.deepcopy(ref_model).to(dtype), [(ids.to(dtype) if conv else ids, y)],
                                    progress=False)
    if conv and dtype == torch.bfloat16:
        # bfloat16's own forward and backward (8-bit mantissa, 27-input first conv): 0.098 on
        # c1.weight with either conv route, the im2col one and conv_grad_bias_sq alike.
        tol = 0.15
    for k in ref:
        assert low[k].dtype == torch.float32
        err = float((low[k].double() - ref[k]).abs().max() / ref[k].abs().max())
        assert err < tol, (k, err)


def test_building_a_pruner_does_not_draw_from_the_loaders_generator(mlp):
    # Starting a DataLoader's iterator draws a seed from its generator: a check that did so
    # would change which samples every later step sees.
    gen = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 20), torch.randint(0, 4, (16,))),
                                         batch_size=8, shuffle=True, generator=gen)
    before = gen.get_state()
    fastprune.Pruner(mlp, QM(), 0.5, data=loader, steps=3)
    assert torch.equal(gen.get_state(), before)


_DATA = [(torch.randn(8, 20), torch.randint(0, 4, (8,)))]


@pytest.mark.parametrize("call,error,match", [
    (lambda m: fastprune.fisher_diag(m, _DATA, max_samples=1.5, progress=False), ValueError, "max_samples"),
    (lambda m: fastprune.fisher_diag(m, _DATA, seed="a", progress=False), ValueError, "seed must be an integer"),
    (lambda m: fastprune.fisher_diag(m, None, progress=False), TypeError, "data must be an iterable"),
    (lambda m: fastprune.fisher_diag(None, _DATA, progress=False), TypeError, "model must be a torch.nn.Module"),
    (lambda m: fastprune.FisherBlocks(m, 4, max_memory="x"), ValueError, "max_memory"),
    (lambda m: fastprune.prune(None, Magnitude(), 0.5, progress=False), TypeError, "model must be"),
    (lambda m: fastprune.prune(m, QM(), 0.5, data=torch.randn(8, 20), progress=False), TypeError, "iterable"),
    (lambda m: QM(max_samples=0), ValueError, "max_samples must be an integer >= 1"),
    (lambda m: WoodFisher(max_memory=-1), ValueError, "max_memory"),
    (lambda m: fastprune.apply_masks(m, [torch.ones(30, 20)]), TypeError, "mapping"),
    (lambda m: fastprune.load_pruned_state_dict(m, None), TypeError, "mapping"),
])
def test_entry_points_name_the_bad_argument(mlp, call, error, match):
    before = _state(mlp)
    with pytest.raises(error, match=match):
        call(mlp)
    assert _same(mlp, before)



class Bags(nn.Module):
    def __init__(self, mode, padding_idx=None):
        super().__init__()
        self.bag = nn.EmbeddingBag(11, 4, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(4, 3)

    def forward(self, ids, offsets=None, weights=None):
        return self.head(torch.tanh(self.bag(ids, offsets, per_sample_weights=weights)))


def _bag_reference(model, samples, y):
    """Per-sample gradients from one (ids, offsets) bag at a time."""
    rows = [torch.autograd.grad(ce(model(*s), y[n:n + 1]).sum(), list(model.parameters()))
            for n, s in enumerate(samples)]
    return {k: torch.stack([r[i] for r in rows]) for i, (k, _) in enumerate(model.named_parameters())}


@pytest.mark.parametrize("mode,padding,weighted", [("sum", None, False), ("mean", None, False), ("mean", 0, False),
                                                   ("sum", 0, True)])
def test_embedding_bag_with_offsets(mode, padding, weighted):
    model = Bags(mode, padding).double()
    lengths = [3, 1, 4, 2, 5]
    ids = torch.randint(0, 11, (sum(lengths),))
    ids[2] = ids[0]  # a repeated token in one bag
    offsets = torch.tensor([0, 3, 4, 8, 10])
    weights = torch.rand(len(ids), dtype=torch.float64) if weighted else None
    y = torch.randint(0, 3, (5,))
    inputs = (ids, offsets) if weights is None else (ids, offsets, weights)
    diag, grad = fastprune.fisher_diag(model, [(inputs, y)], return_grad=True, strict=True, progress=False)
    bounds = offsets.tolist() + [len(ids)]
    samples = [(ids[a:b], torch.tensor([0])) + (() if weights is None else (weights[a:b],))
               for a, b in zip(bounds, bounds[1:])]
    ref = _bag_reference(model, samples, y)
    for k in ref:
        torch.testing.assert_close(diag[k], ref[k].square().mean(0), rtol=1e-9, atol=1e-12, msg=k)
        torch.testing.assert_close(grad[k], ref[k].mean(0), rtol=1e-9, atol=1e-12, msg=k)
    two_d = torch.randint(0, 11, (5, 3))
    diag2 = fastprune.fisher_diag(model, [(two_d, y)], strict=True, progress=False)
    ref2 = _bag_reference(model, [(two_d[n:n + 1],) for n in range(5)], y)
    torch.testing.assert_close(diag2["bag.weight"], ref2["bag.weight"].square().mean(0), rtol=1e-9, atol=1e-12)


def test_packed_sequences():
    from torch.nn.utils.rnn import pack_sequence

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(3, 4), nn.Linear(4, 2)

        def forward(self, packed):
            return self.head(self.rnn(packed)[1][0])

    model = Packed().double()
    seqs = [torch.randn(t, 3, dtype=torch.float64) for t in (4, 2, 5, 3)]
    y = torch.randint(0, 2, (4,))
    packed = pack_sequence(seqs, enforce_sorted=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diag = fastprune.fisher_diag(model, [(packed, y)], progress=False)
    rows = [torch.autograd.grad(ce(model(pack_sequence([s])), y[n:n + 1]).sum(), list(model.parameters()))
            for n, s in enumerate(seqs)]
    for i, (k, _) in enumerate(model.named_parameters()):
        torch.testing.assert_close(diag[k], torch.stack([r[i] for r in rows]).square().mean(0), rtol=1e-9,
                                   atol=1e-12, msg=k)
