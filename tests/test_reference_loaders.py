"""Errors of the shared-data loaders (no shared data needed)."""
import pytest

from fastprune.bench.reference import load_mlpnet, load_mnist


def test_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="split must be"):
        load_mnist("validation")
    with pytest.raises(FileNotFoundError, match="FASTPRUNE_SHARED"):
        load_mnist("test", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="FASTPRUNE_SHARED"):
        load_mlpnet(tmp_path / "missing.ckpt")
