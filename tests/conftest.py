import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Build each tiny checkpoint once per session (bf16 safetensors)."""
    from models import build

    root = tmp_path_factory.mktemp("ckpt")
    cache = {}

    def get(kind, **kwargs):
        key = (kind, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = build(kind, str(root / f"{kind}{len(cache)}"), **kwargs)
        return cache[key]

    return get
