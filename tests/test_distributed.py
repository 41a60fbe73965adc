"""torch.distributed: statistics over 2 Gloo processes (spawned here, 127.0.0.1 only)
equal the single-process statistics of the union of their data; pruning a DDP model
leaves identical masks and weights on every rank; collections resume; budgets hold."""

import pytest
import torch
from torch import nn

import fastprune
from gloo import run_ranks
from fastprune.criteria import QM, Magnitude, WoodFisher, WoodTaylor

WORLD = 2


def data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(24, 10, generator=gen, dtype=torch.float64), torch.randint(0, 4, (24,), generator=gen)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 4)).double()


def shard(t, rank):
    return t[rank::WORLD]


def statistics(rank):
    x, y = data()
    xs, ys = shard(x, rank), shard(y, rank)
    m = model()
    diag, grad = fastprune.fisher_diag(m, [(xs[:5], ys[:5]), (xs[5:], ys[5:])], return_grad=True, progress=False)
    true = fastprune.fisher_diag(m, [(xs, ys)], fisher="true", progress=False)
    # First batches of different sizes on the ranks (the sums are scaled by the first
    # batch's size inside the ops), and a rank that has no samples at all.
    cut = 3 + 4 * rank
    ragged = fastprune.FisherCollector(m)([(xs[:cut], ys[:cut]), (xs[cut:], ys[cut:])], return_grad=True,
                                          progress=False)
    one_sided = fastprune.fisher_diag(m, [(xs, ys)] if rank == 0 else [(xs[:0], ys[:0])], progress=False)
    fb = fastprune.FisherBlocks(m, block_size=16)
    fb.accumulate(xs[:4], ys[:4], "cross_entropy")
    first = fb.blocks("0.weight").clone()
    fb.accumulate(xs[4:], ys[4:], "cross_entropy")  # after a reduction: only new samples are added
    try:
        fastprune.per_sample_gradients(m, xs[: 3 + rank], ys[: 3 + rank])
        uneven = "no error"
    except ValueError as e:
        uneven = str(e)
    return {"diag": diag, "grad": grad, "true": true, "ragged": ragged, "one_sided": one_sided,
            "blocks_first": first, "blocks": fb.blocks("0.weight"),
            "count": fb.num_samples, "per_sample": fastprune.per_sample_gradients(m, xs[:5], ys[:5]),
            "uneven": uneven}


def ddp_prune(rank):
    x, y = data()
    ddp = nn.parallel.DistributedDataParallel(model())
    masks = fastprune.prune(ddp.module, QM(fisher="true"), 0.7, data=[(shard(x, rank), shard(y, rank))],
                            steps=2, progress=False)
    magnitude = fastprune.prune(ddp.module, Magnitude(), 0.8, progress=False)
    state = {k: v.clone() for k, v in ddp.module.state_dict().items()}
    # Different data per rank and a criterion with its own statistics: still identical everywhere.
    wf_model = model()
    wf = fastprune.prune(wf_model, WoodFisher(block_size=8, num_grads=6, damp=1e-4), 0.6,
                         data=[(shard(x, rank) + rank, shard(y, rank))], progress=False)
    return {"masks": masks, "magnitude": magnitude, "state": state, "woodfisher": wf,
            "woodfisher_state": {k: v.clone() for k, v in wf_model.state_dict().items()}}


# (block_size, num_grads per rank): N = 12 >= 8 gives dense blocks (15 and 6 of them: an uneven
# split over 2 ranks), N = 6 < 64 the low-rank form (2 blocks and 1: one rank owns none of "2.weight").
WOODFISHER = {"dense": (8, 6), "lowrank": (64, 3)}
# Sharded runs: each configuration over two steps (the second on alive weights only), also WoodTaylor
# with the exact group update.
SHARDED = {f"{label}-{kind}": (block, grads, kind) for label, (block, grads) in WOODFISHER.items()
           for kind in ("woodfisher", "woodtaylor-group")}


def _criterion(kind, block, grads, **kw):
    if kind == "woodfisher":
        return WoodFisher(block_size=block, num_grads=grads, damp=1e-3, **kw)
    return WoodTaylor(block_size=block, num_grads=grads, damp=1e-3, update="group", **kw)


def woodfisher_union(rank):
    x, y = data()
    out, sharded = {}, {}
    for label, (block, grads) in WOODFISHER.items():
        m = model()
        masks = fastprune.prune(m, WoodFisher(block_size=block, num_grads=grads, damp=1e-3), 0.6,
                                data=[(shard(x, rank)[:grads], shard(y, rank)[:grads])], progress=False)
        out[label] = (masks, {k: v.clone() for k, v in m.state_dict().items()})
    for label, (block, grads, kind) in SHARDED.items():
        for shard_blocks in (False, True):
            m = model()
            masks = fastprune.prune(m, _criterion(kind, block, grads, shard_blocks=shard_blocks), 0.6, steps=2,
                                    data=[(shard(x, rank)[:grads], shard(y, rank)[:grads])], progress=False)
            sharded[label, shard_blocks] = (masks, {k: v.clone() for k, v in m.state_dict().items()})
    # A budget the full blocks exceed (21.5 KB + 12 KB of per-sample gradients) but one rank's share
    # (11.3 KB + 12 KB) fits.
    budget = {}
    for shard_blocks in (False, True):
        try:
            fastprune.prune(model(), WoodFisher(block_size=8, num_grads=6, max_memory=28000, shard_blocks=shard_blocks),
                            0.5, data=[(shard(x, rank)[:6], shard(y, rank)[:6])], progress=False)
            budget[shard_blocks] = "ok"
        except MemoryError as e:
            budget[shard_blocks] = str(e)
    return {"union": out, "sharded": sharded, "budget": budget}


def _job(rank):
    return {"statistics": statistics(rank), "ddp": ddp_prune(rank), "woodfisher": woodfisher_union(rank)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_job, tmp_path_factory.mktemp("ranks"), WORLD)


def test_statistics_equal_single_process_on_the_union(ranks):
    x, y = data()
    m = model()
    diag, grad = fastprune.fisher_diag(m, [(x, y)], return_grad=True, progress=False)
    true = fastprune.fisher_diag(m, [(x, y)], fisher="true", progress=False)
    for r in ranks:
        got = r["statistics"]
        for k in diag:
            torch.testing.assert_close(got["diag"][k], diag[k], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got["grad"][k], grad[k], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got["true"][k], true[k], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got["ragged"][0][k], diag[k], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got["ragged"][1][k], grad[k], rtol=1e-10, atol=1e-12)
    only_rank0 = fastprune.fisher_diag(m, [(shard(x, 0), shard(y, 0))], progress=False)
    for r in ranks:
        for k in diag:
            torch.testing.assert_close(r["statistics"]["one_sided"][k], only_rank0[k], rtol=1e-10, atol=1e-12)
    fb = fastprune.FisherBlocks(m, block_size=16)
    first = torch.cat([shard(x, r)[:4] for r in range(WORLD)]), torch.cat([shard(y, r)[:4] for r in range(WORLD)])
    fb.accumulate(*first, "cross_entropy")
    expected_first = fb.blocks("0.weight").clone()
    rest = torch.cat([shard(x, r)[4:] for r in range(WORLD)]), torch.cat([shard(y, r)[4:] for r in range(WORLD)])
    fb.accumulate(*rest, "cross_entropy")
    for r in ranks:
        got = r["statistics"]
        assert got["count"] == len(x)
        torch.testing.assert_close(got["blocks_first"], expected_first, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["blocks"], fb.blocks("0.weight"), rtol=1e-10, atol=1e-12)
    # The low-rank gradient sets: every rank gets the rows of all ranks, in rank order.
    union = torch.cat([shard(x, r)[:5] for r in range(WORLD)]), torch.cat([shard(y, r)[:5] for r in range(WORLD)])
    expected = fastprune.per_sample_gradients(m, *union)
    for r in ranks:
        assert r["statistics"]["per_sample"].keys() == expected.keys()
        for k, v in expected.items():
            torch.testing.assert_close(r["statistics"]["per_sample"][k], v, rtol=1e-10, atol=1e-12)
        assert "same number of samples on every rank" in r["statistics"]["uneven"]


def test_ddp_prune_identical_on_every_rank_and_as_one_process(ranks):
    a, b = (r["ddp"] for r in ranks)
    for key in ("masks", "magnitude", "state", "woodfisher", "woodfisher_state"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    x, y = data()
    m = model()
    masks = fastprune.prune(m, QM(fisher="true"), 0.7, data=[(x, y)], steps=2, progress=False)
    for k in masks:
        assert torch.equal(masks[k], a["masks"][k]), k


@pytest.mark.parametrize("label", list(WOODFISHER))
def test_woodfisher_uses_the_union_of_the_ranks_gradients(ranks, label):
    block, grads = WOODFISHER[label]
    x, y = data()
    union = (torch.cat([shard(x, r)[:grads] for r in range(WORLD)]), torch.cat([shard(y, r)[:grads] for r in range(WORLD)]))
    m = model()
    masks = fastprune.prune(m, WoodFisher(block_size=block, num_grads=WORLD * grads, damp=1e-3), 0.6, data=[union],
                            progress=False)
    for r in ranks:
        got_masks, got_state = r["woodfisher"]["union"][label]
        for k in masks:
            assert torch.equal(got_masks[k], masks[k]), k
        for k, v in m.state_dict().items():
            torch.testing.assert_close(got_state[k], v, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("label", list(SHARDED))
def test_block_sharding_gives_the_same_masks_and_weights(ranks, label):
    """Each rank inverting only its share of the blocks changes nothing but the
    summation order: same masks as the unsharded run, on both ranks, over two steps."""
    block, grads, kind = SHARDED[label]
    plain_masks, plain_state = ranks[0]["woodfisher"]["sharded"][label, False]
    for r in ranks:
        masks, state = r["woodfisher"]["sharded"][label, True]
        for k in plain_masks:
            assert torch.equal(masks[k], plain_masks[k]), k
        for k, v in plain_state.items():
            torch.testing.assert_close(state[k], v, rtol=1e-9, atol=1e-11)
    x, y = data()
    union = (torch.cat([shard(x, r)[:grads] for r in range(WORLD)]), torch.cat([shard(y, r)[:grads] for r in range(WORLD)]))
    m = model()
    fastprune.prune(m, _criterion(kind, block, WORLD * grads), 0.6, steps=2, data=[union], progress=False)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(plain_state[k], v, rtol=1e-9, atol=1e-11)


def test_sharding_divides_the_memory_budget(ranks):
    for r in ranks:
        budget = r["woodfisher"]["budget"]
        assert "N=12 gradients" in budget[False] and "shard_blocks=True" in budget[False]
        assert budget[True] == "ok"


def test_block_spans_cover_every_block_once():
    from fastprune.distributed import block_spans
    assert block_spans(120, 8, 2) == [(0, 64), (64, 120)]
    assert block_spans(48, 64, 2) == [(0, 48), (48, 48)]
    assert block_spans(100, 7, 3) == [(0, 35), (35, 70), (70, 100)]


def test_fisher_blocks_resume_equals_uninterrupted():
    x, y = data()
    m = model()
    whole = fastprune.FisherBlocks(m, block_size=7)
    for i in range(0, 24, 8):
        whole.accumulate(x[i:i + 8], y[i:i + 8], "cross_entropy")
    first = fastprune.FisherBlocks(m, block_size=7)
    first.accumulate(x[:8], y[:8], "cross_entropy")
    state = first.state_dict()
    resumed = fastprune.FisherBlocks(model(), block_size=7)
    resumed.load_state_dict(state)
    for i in range(8, 24, 8):
        resumed.accumulate(x[i:i + 8], y[i:i + 8], "cross_entropy")
    assert resumed.num_samples == whole.num_samples == 24
    for name in whole.names:
        torch.testing.assert_close(resumed.blocks(name), whole.blocks(name))
    with pytest.raises(ValueError, match="block_size=7"):
        fastprune.FisherBlocks(m, block_size=8).load_state_dict(state)


def test_fisher_blocks_budget_raises_before_allocating():
    with pytest.raises(MemoryError, match=r"needs about \d+ MiB but max_memory allows 1 MiB; use a smaller block_size"):
        fastprune.FisherBlocks(nn.Sequential(nn.Linear(1000, 1000)), block_size=1000, max_memory=1 << 20)


def test_process_group_without_init_is_an_error():
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastprune.fisher_diag(model(), [data()], progress=False, process_group=object())
