"""The reference pipelines of SparseGPT and Wanda, transcribed for side-by-side runs
(written for this repository from the papers' published algorithms and the structure
of their reference code): calibration samples go through the blocks one at a time,
every Linear gets its own input Hessian (or row norms) from forward hooks, the block
is pruned, and the pruned block's outputs are recomputed for the next one. The
SparseGPT column sweep is the paper's Algorithm 1 in torch ops, its unstructured mask
the reference's threshold (``<=`` the value at index ``int(n * sparsity)`` of the
sorted saliencies of each column block)."""
from __future__ import annotations

import math

import torch
from torch import nn


class _Caught(Exception):
    pass


def _first_block_inputs(model, blocks, windows):
    """Each sample's hidden states at the first block and the keyword arguments the
    block receives (the reference code's "Catcher")."""
    inputs, kwargs = [], {}

    def catch(module, args, kw):
        inputs.append(args[0] if args else kw["hidden_states"])
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Caught

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for j in range(len(windows)):
            try:
                model(input_ids=windows[j:j + 1], use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    kwargs = {k: (None if hasattr(v, "get_seq_length") else v) for k, v in kwargs.items()}
    return inputs, kwargs


class _SparseGPTLayer:
    def __init__(self, layer: nn.Linear):
        self.layer, self.cols = layer, layer.weight.shape[1]
        self.H = torch.zeros(self.cols, self.cols)
        self.nsamples = 0

    def add_batch(self, inp):
        inp = inp.reshape(-1, self.cols).t()
        self.H *= self.nsamples / (self.nsamples + 1)
        self.nsamples += 1
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def prune(self, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
        W = self.layer.weight.data.clone().float()
        H = self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        damp = percdamp * torch.mean(torch.diag(H))
        idx = torch.arange(self.cols)
        H[idx, idx] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        Hinv = torch.linalg.cholesky(H, upper=True)
        for i1 in range(0, self.cols, blocksize):
            i2 = min(i1 + blocksize, self.cols)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prunen == 0:
                tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1) == 1
            for i in range(count):
                w, d = W1[:, i], Hinv1[i, i]
                if prunen != 0 and i % prunem == 0:
                    tmp = W1[:, i:i + prunem] ** 2 / (torch.diag(Hinv1)[i:i + prunem].reshape((1, -1))) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        self.layer.weight.data = W.to(self.layer.weight.dtype)


class _WandaLayer:
    def __init__(self, layer: nn.Linear):
        self.layer, self.cols = layer, layer.weight.shape[1]
        self.scaler_row = torch.zeros(self.cols)
        self.nsamples = 0

    def add_batch(self, inp):
        inp = inp.reshape(-1, self.cols).t().float()
        self.scaler_row *= self.nsamples / (self.nsamples + 1)
        self.nsamples += 1
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples

    def prune(self, sparsity, prunen=0, prunem=0):
        W = self.layer.weight.data
        metric = torch.abs(W) * torch.sqrt(self.scaler_row.reshape((1, -1)))
        mask = torch.zeros_like(metric) == 1
        if prunen != 0:
            for ii in range(0, metric.shape[1], prunem):
                tmp = metric[:, ii:ii + prunem].float()
                mask.scatter_(1, ii + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
        else:
            order = torch.sort(metric, dim=-1, stable=True)[1]
            mask.scatter_(1, order[:, :int(metric.shape[1] * sparsity)], True)
        W[mask] = 0


@torch.no_grad()
def reference_prune(model, blocks: nn.ModuleList, windows: torch.Tensor, method: str, sparsity: float,
                    prunen: int = 0, prunem: int = 0) -> None:
    """Prunes every Linear in ``blocks`` in place, the reference way (``method``:
    ``"sparsegpt"`` or ``"wanda"``); ``prunen``/``prunem`` > 0 for N:M (prunen pruned
    of every prunem)."""
    inps, kwargs = _first_block_inputs(model, blocks, windows)
    wrap = {"sparsegpt": _SparseGPTLayer, "wanda": _WandaLayer}[method]
    for block in blocks:
        subset = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        wrapped = {n: wrap(m) for n, m in subset.items()}
        handles = [m.register_forward_hook(lambda mod, a, o, n=n: wrapped[n].add_batch(a[0].data))
                   for n, m in subset.items()]
        for x in inps:
            block(x, **kwargs)
        for h in handles:
            h.remove()
        for w in wrapped.values():
            w.prune(sparsity, prunen, prunem)
        outs = []
        for x in inps:
            out = block(x, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
        inps = outs
