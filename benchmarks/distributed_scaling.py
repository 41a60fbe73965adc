"""Fisher-diagonal collection across processes (torch.distributed, Gloo, 127.0.0.1):
LeNet-300-100, 8192 samples in batches of 256, split across 1 or 2 processes of one
thread each, next to one process with 2 threads. Prints a markdown section."""
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fastprune  # noqa: E402

SAMPLES, BATCH, REPEATS = 8192, 256, 5


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    return model, torch.randn(SAMPLES, 784), torch.randint(0, 10, (SAMPLES,))


def collect(model, x, y, rank, world):
    xs, ys = x[rank::world], y[rank::world]
    batches = [(xs[i:i + BATCH], ys[i:i + BATCH]) for i in range(0, len(xs), BATCH)]
    return fastprune.fisher_diag(model, batches, progress=False)


def timed(fn, barrier=lambda: None):
    fn()
    times = []
    for _ in range(REPEATS):
        barrier()
        t0 = time.perf_counter()
        fn()
        barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, x, y = problem()
    t = timed(lambda: collect(model, x, y, rank, world), dist.barrier)
    if rank == 0:
        with open(out, "w") as f:
            f.write(str(t))
    dist.destroy_process_group()


def distributed_time(world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "t")
        mp.spawn(_worker, args=(world, port, out), nprocs=world, join=True)
        return float(open(out).read())


def main():
    model, x, y = problem()
    threads = torch.get_num_threads()
    single = timed(lambda: collect(model, x, y, 0, 1))
    one, two = distributed_time(1), distributed_time(2)
    print("## Fisher diagonal across processes (torch.distributed, Gloo)\n")
    print(f"LeNet-300-100, {SAMPLES} samples in batches of {BATCH}, median of {REPEATS}. Each process runs one "
          "thread; the 2-process run all-reduces the sums once.\n")
    print("| setting | time (s) | samples/s |\n| --- | ---: | ---: |")
    for name, t in [(f"1 process, {threads} threads (no torch.distributed)", single), ("1 process, 1 thread", one),
                    ("2 processes, 1 thread each", two)]:
        print(f"| {name} | {t:.3f} | {SAMPLES / t:.0f} |")
    print(f"\nScaling from 1 to 2 processes: {one / two:.2f}x.\n")


if __name__ == "__main__":
    main()
