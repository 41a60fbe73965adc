"""`fastprune bench`: smoke runs on tiny settings, output schema, plots, determinism,
errors, and the woodfisher-mlpnet preset against the published figure."""
import csv
import json

import pytest

from fastprune.bench import cli
from fastprune.bench.reference import shared_dir

TINY = ["bench", "--criteria", "magnitude,qm,taylor", "--sparsities", "0.5,0.9", "--steps", "1,2", "--epochs", "2",
        "--seeds", "0,1", "--quiet"]


def run(tmp_path, extra=(), name="out"):
    out = tmp_path / name
    assert cli.main(TINY + ["--out", str(out), *extra]) == 0
    return out


def test_bench_writes_table_csv_json_and_plots(tmp_path, capsys):
    out = run(tmp_path, ["--finetune-epochs", "1"])
    text = capsys.readouterr().out
    assert "criterion" in text and "s=90%" in text and "locality:" in text and "LM vs QM" in text
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 3 * 2 * 2  # seeds x criteria x steps x sparsities
    for key in ["seed", "criterion", "steps", "target_sparsity", "sparsity", "compression", "speedup", "loss", "top1",
                "finetuned_top1", "time_total_s", "time_stats_s", "time_inverse_s", "time_update_s", "time_select_s"]:
        assert key in rows[0], key
    for r in rows:
        assert abs(float(r["sparsity"]) - float(r["target_sparsity"])) < 1e-3
        assert float(r["compression"]) == pytest.approx(1 / (1 - float(r["sparsity"])), rel=1e-6)
        assert float(r["speedup"]) > 1
    meta = json.load(open(out / "results.json"))
    assert {"fastprune", "torch", "machine", "command", "config", "runs", "summary"} <= set(meta)
    assert meta["config"]["sparsities"] == [0.5, 0.9] and len(meta["summary"]) == 3 * 2 * 2
    assert all(s["seeds"] == 2 and "top1_std" in s for s in meta["summary"])
    for png in ["accuracy_vs_sparsity.png", "accuracy_finetuned.png", "time_per_criterion.png"]:
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, png


def test_bench_is_deterministic(tmp_path):
    a, b = run(tmp_path, name="a"), run(tmp_path, name="b")
    strip = (lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows])
    assert strip(csv.DictReader(open(a / "results.csv"))) == strip(csv.DictReader(open(b / "results.csv")))


def test_bench_errors(tmp_path, capsys):
    assert cli.main(["bench", "--criteria", "magnitude,nope", "--out", str(tmp_path), "--quiet"]) == 2
    assert "unknown criteria ['nope']" in capsys.readouterr().err
    assert cli.main(["bench", "--model", "mlpnet", "--quiet", "--out", str(tmp_path)]) == 2
    assert "784 inputs" in capsys.readouterr().err
    assert cli.main(["bench", "--checkpoint", str(tmp_path / "none.pt"), "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--dataset", "cifar"])
    assert "invalid choice" in capsys.readouterr().err


def test_missing_idx_files_message(tmp_path, capsys):
    assert cli.main(["bench", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "nothing is downloaded" in err


MLPNET = shared_dir() / "reference" / "woodfisher" / "mnist_25_epoch_93.97.ckpt"


@pytest.mark.skipif(not MLPNET.exists() or not (shared_dir() / "data" / "mnist").exists(),
                    reason="needs ../shared (MLPNet checkpoint and MNIST)")
def test_woodfisher_mlpnet_preset_reproduces_published_one_shot(tmp_path, capsys):
    out = tmp_path / "wf"
    assert cli.main(["bench", "--preset", "woodfisher-mlpnet", "--criteria", "woodfisher", "--sparsities", "0.95",
                     "--steps", "1", "--seeds", "0,1,2", "--quiet", "--out", str(out)]) == 0
    summary = json.load(open(out / "results.json"))["summary"]
    assert summary[0]["seeds"] == 3
    assert 100 * summary[0]["top1"] >= 83.8  # published: 84.18 %
    text = capsys.readouterr().out
    assert "woodfisherblock  at 95%: published 84.18 %, here" in text
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert all(float(r["time_inverse_s"]) > 0 for r in rows)


def test_fisher_criteria_use_the_sample_budget(monkeypatch, tmp_path):
    from fastprune.bench import harness
    seen = []
    real = harness.C.QM.score_step

    def spy(self, step):
        seen.append(self.max_samples)
        return real(self, step)
    monkeypatch.setattr(harness.C.QM, "score_step", spy)
    assert cli.main(["bench", "--criteria", "qm", "--sparsities", "0.5", "--steps", "1", "--epochs", "1",
                     "--fisher-samples", "100", "--quiet", "--out", str(tmp_path)]) == 0
    assert seen == [100]
    with pytest.raises(ValueError, match="fisher_samples"):
        harness.BenchConfig(fisher_samples=-1)
