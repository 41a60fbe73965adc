"""Independent references: per-sample gradients from torch.func (vmap over grad)."""
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap


def per_sample_grads(model, x, y, loss=None, weight=None):
    """{name: (N, *shape)} per-sample gradients of sum_n w_n * loss_n, keyed like named_parameters()."""
    loss = loss or (lambda o, t: F.cross_entropy(o, t, reduction="none"))
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    weight = torch.ones(len(x), dtype=x.dtype if x.is_floating_point() else torch.float64) if weight is None \
        else weight

    def f(p, xn, yn, wn):
        return (loss(functional_call(model, p | buffers, (xn.unsqueeze(0),)), yn.unsqueeze(0)) * wn).sum()

    return vmap(grad(f), in_dims=(None, 0, 0, 0))(params, x, y, weight)


def diag_and_grad(model, x, y, loss=None):
    ps = per_sample_grads(model, x, y, loss)
    return {k: v.square().mean(0) for k, v in ps.items()}, {k: v.mean(0) for k, v in ps.items()}
