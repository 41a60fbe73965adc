"""Small real data sets that need no download (the demo's and tests' default)."""
from __future__ import annotations

import torch

__all__ = ["load_digits"]


def load_digits(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's handwritten digits (1797 images, 8x8, 10 classes), shipped with
    scikit-learn. Returns ``(x_train, y_train, x_test, y_test)``: float32 features
    standardised with training statistics, int64 labels, a stratified split."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    x_tr, x_te = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(x_te, dtype=torch.float32)
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-3)
    return (x_tr - mean) / std, torch.tensor(y_tr), (x_te - mean) / std, torch.tensor(y_te)
