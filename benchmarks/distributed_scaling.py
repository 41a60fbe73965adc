"""Fisher-diagonal collection across processes (torch.distributed, Gloo, 127.0.0.1):
LeNet-300-100, 8192 samples in batches of 256, split across 1 or 2 processes of one
thread each, next to one process with 2 threads; then one WoodFisher scoring step on 2
processes with the blocks replicated or sharded (peak extra memory per rank). Prints
markdown sections."""
import os
import resource
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
from fastprune.criteria import WoodFisher  # noqa: E402

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


WF_GRADS, WF_BLOCKS = 128, (128, 256)  # per rank: N = 256 >= B, the dense-block path


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def woodfisher_step(rank, block_size, shard_blocks):
    """Seconds for one WoodFisher scoring step and this rank's peak extra memory (MiB)."""
    model, x, y = problem()
    params = {f"{i}.weight": model[i].weight.detach() for i in (0, 2, 4)}
    data = [(x[rank::2][:WF_GRADS], y[rank::2][:WF_GRADS])]
    crit = WoodFisher(block_size=block_size, num_grads=WF_GRADS, shard_blocks=shard_blocks)
    base = _rss_mib()
    t0 = time.perf_counter()
    crit.scores(model, params, data, "cross_entropy")
    seconds = time.perf_counter() - t0
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base


def _worker(rank, world, port, out, task):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    if task == "diag":
        model, x, y = problem()
        result = timed(lambda: collect(model, x, y, rank, world), dist.barrier)
    else:
        result = woodfisher_step(rank, *task)
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def distributed_run(world, task="diag"):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "t")
        mp.spawn(_worker, args=(world, port, out, task), nprocs=world, join=True)
        return torch.load(out)


def main():
    model, x, y = problem()
    threads = torch.get_num_threads()
    single = timed(lambda: collect(model, x, y, 0, 1))
    one, two = distributed_run(1), distributed_run(2)
    print("## Fisher diagonal across processes (torch.distributed, Gloo)\n")
    print(f"LeNet-300-100, {SAMPLES} samples in batches of {BATCH}, median of {REPEATS}. Each process runs one "
          "thread; the 2-process run all-reduces the sums once.\n")
    print("| setting | time (s) | samples/s |\n| --- | ---: | ---: |")
    for name, t in [(f"1 process, {threads} threads (no torch.distributed)", single), ("1 process, 1 thread", one),
                    ("2 processes, 1 thread each", two)]:
        print(f"| {name} | {t:.3f} | {SAMPLES / t:.0f} |")
    print(f"\nScaling from 1 to 2 processes: {one / two:.2f}x.\n")
    print("## WoodFisher blocks replicated or sharded across 2 processes\n")
    print(f"LeNet-300-100 (266,200 weights), num_grads={WF_GRADS} per rank (N = {2 * WF_GRADS}), one scoring "
          "step timed on rank 0 (1 thread each): statistics, inverse and scores. Peak extra memory is the rise of "
          "the process's peak RSS over its RSS before the step.\n")
    print("| block_size | blocks | time (s) | peak extra memory per rank (MiB) |\n| ---: | --- | ---: | ---: |")
    for block in WF_BLOCKS:
        for label, sharded in [("replicated (all-reduced)", False), ("sharded (`shard_blocks=True`)", True)]:
            t, mib = distributed_run(2, (block, sharded))
            print(f"| {block} | {label} | {t:.2f} | {mib:.0f} |")
    print()


if __name__ == "__main__":
    main()
