"""The `fastprune llm` harness on a tiny random Llama, and fastprune's layer-wise criteria
against the reference pipelines of benchmarks/llm_reference.py (samples one at a time,
one Hessian per matrix, the sweep in torch ops)."""
import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import fastprune
from fastprune.bench import llm
from fastprune.criteria import SparseGPT, Wanda
from fastprune.criteria.layerwise import block_layers, find_blocks

transformers = pytest.importorskip("transformers")

spec = importlib.util.spec_from_file_location("llm_reference", Path(__file__).parents[1] / "benchmarks" /
                                              "llm_reference.py")
llm_reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(llm_reference)


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_windows_follow_the_protocol():
    ids = torch.arange(1000)
    cal = llm.calibration_windows(ids, 8, 32, seed=0)
    assert cal.shape == (8, 32) and int(cal.max()) < 500  # the first half only
    assert torch.equal(cal, llm.calibration_windows(ids, 8, 32, seed=0))
    assert bool((cal[:, 1:] - cal[:, :-1] == 1).all())
    ev = llm.evaluation_windows(ids, 48, 32, start=500)
    assert ev.shape == (15, 32) and int(ev[0, 0]) == 500 and int(ev[-1, -1]) == 979
    with pytest.raises(ValueError, match="too few"):
        llm.calibration_windows(torch.arange(40), 8, 32)
    assert "Python" in llm.python_docs_text()[:100000]


def test_perplexity_is_exp_of_the_mean_token_nll():
    model = tiny_llama()
    windows = torch.randint(0, 96, (5, 12))
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), windows[:, 1:].reshape(-1))
    assert llm.perplexity(model, windows, batch_size=2) == pytest.approx(float(nll.exp()), rel=1e-5)


def test_run_llm_restores_the_dense_model_and_writes_its_files(tmp_path):
    model = tiny_llama()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    cal, ev = torch.randint(0, 96, (8, 24)), {"a": torch.randint(0, 96, (4, 24))}
    rows = llm.run_llm(model, cal, ev, ["magnitude", "wanda", "sparsegpt", "sparsegpt-ts"], ["0.5", "2:4"], tmp_path,
                       progress=False)
    assert [r["method"] for r in rows] == ["dense"] + [m for m in ("magnitude", "wanda", "sparsegpt", "sparsegpt-ts")
                                                       for _ in range(2)]
    assert all(r["measured_sparsity"] == pytest.approx(0.5, abs=0.01) for r in rows[1:])
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "weight_mask") for m in model.modules())
    assert json.loads((tmp_path / "llm.json").read_text())[1]["method"] == "magnitude"
    assert (tmp_path / "llm.csv").exists() and (tmp_path / "llm.md").exists()
    with pytest.raises(ValueError, match="unknown method"):
        llm.run_llm(model, cal, ev, ["obs"], ["0.5"])


@pytest.mark.parametrize("method,pattern", [("wanda", None), ("wanda", "2:4"), ("sparsegpt", "2:4"),
                                            ("sparsegpt", None)])
def test_criteria_match_the_reference_pipeline(method, pattern):
    model = tiny_llama()
    ref = copy.deepcopy(model)
    cal = torch.randint(0, 96, (12, 24), generator=torch.Generator().manual_seed(3))
    n, m = (2, 4) if pattern else (0, 0)
    llm_reference.reference_prune(ref, find_blocks(ref), cal, method, 0.5, n, m)
    crit = SparseGPT(progress=False) if method == "sparsegpt" else Wanda(progress=False)
    fastprune.prune(model, crit, 0.5, data=cal, pattern=pattern, progress=False)
    for name in block_layers(model)[0]:
        got, want = model.get_submodule(name).weight.detach(), ref.get_submodule(name).weight.detach()
        if method == "wanda" or pattern:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
        else:
            # The reference prunes every saliency <= its threshold (one more weight per column
            # block, and ties); the masks otherwise agree.
            assert float(((got == 0) != (want == 0)).float().mean()) < 0.02, name
