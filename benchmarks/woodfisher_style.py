"""The WoodFisher-style pipeline fastprune is compared with: one backward per
gradient, then N sequential Sherman-Morrison rank-1 updates of every block's
inverse (vectorised over blocks, as the reference implementation does)."""
import math

import torch
import torch.nn.functional as F


def per_sample_backward(model, targets, x, y, loss="cross_entropy"):
    """(N, numel) gradients of each target, one backward per sample."""
    fn = F.nll_loss if loss == "nll" else F.cross_entropy
    out = {t.name: [] for t in targets}
    for i in range(len(x)):
        model.zero_grad()
        fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        for t in targets:
            out[t.name].append(t.param.grad.flatten().clone())
    return {k: torch.stack(v) for k, v in out.items()}


def sherman_morrison(grads, block_size, damp, total=None):
    """Inverse of damp I + (1/total) sum_n g_n g_n^T per block by len(grads) rank-1
    updates (``total`` defaults to len(grads); pass the full N when timing a prefix)."""
    n, p = grads.shape
    total = total or n
    nb = math.ceil(p / block_size)
    g = F.pad(grads, (0, nb * block_size - p)).view(n, nb, block_size)
    inv = torch.eye(block_size).repeat(nb, 1, 1) / damp
    for i in range(n):
        u = torch.bmm(inv, g[i].unsqueeze(2))  # (nb, B, 1)
        denom = total + torch.bmm(g[i].unsqueeze(1), u)
        inv -= torch.bmm(u, u.transpose(1, 2)) / denom
    return inv
