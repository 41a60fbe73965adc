"""Peak extra host memory of a Fisher diagonal on LeNet-300-100, batch 1024.

Each method runs in a fresh process; the figure is the rise of the peak RSS over the
peak after model, data and one plain training step (so allocator warm-up is shared).
Usage: python benchmarks/memory_peak.py  (prints a Markdown table)."""
import subprocess
import sys

METHODS = ["fastprune", "torch.func", "opacus", "backpack"]

CHILD = """
import resource, sys, torch, torch.nn.functional as F
sys.path.insert(0, "benchmarks")
from models import make
import test_bench_fisher as b
model, x, y = make("mlp-1024")
model.zero_grad(); F.cross_entropy(model(x), y).backward()
run = b.METHODS[sys.argv[1]](model)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run(x, y)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def main():
    params = 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    print("| method | peak extra memory (MiB) |\n| --- | ---: |")
    for m in METHODS:
        out = subprocess.run([sys.executable, "-c", CHILD, m], capture_output=True, text=True)
        value = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else "failed"
        print(f"| {m} | {float(value):.1f} |" if value != "failed" else f"| {m} | failed |")
    print(f"\n(parameters: {params} = {params * 4 / 2**20:.1f} MiB in float32; "
          f"batch x params = {1024 * params * 4 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
