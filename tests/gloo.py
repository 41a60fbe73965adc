"""Runs a job on every rank of a Gloo process group for the distributed tests
(127.0.0.1 only) and collects what each rank returned."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank, port, out_dir, world, job):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.save(job(rank), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(job, out_dir, world: int) -> list:
    """``[job(rank) for each rank]``, each run in its own process of one thread, in a
    process group of ``world`` ranks on a free local port (``job``: a module-level
    function, so the spawned processes can import it)."""
    for attempt in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.spawn(_rank, args=(port, str(out_dir), world, job), nprocs=world, join=True)
            break
        except mp.ProcessRaisedException as e:
            # Another process can take the free port between its release here and the
            # store's bind: one retry on a new port; a failing job fails twice.
            if attempt or "Connection" not in str(e) and "address" not in str(e).lower():
                raise
    return [torch.load(os.path.join(str(out_dir), f"{r}.pt"), weights_only=False) for r in range(world)]
