import os

import numpy as np
import pytest
from flexcim.golden.prune import nm_prune
from hypothesis import HealthCheck, settings

# Deterministic in CI (the same examples every run); widen locally with HYPOTHESIS_PROFILE=dev.
settings.register_profile(
    "ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def operands(tmp_path):
    """``(folder, x, w)``: int8 x [5,32] and a 2:8 weight [7,32], saved as x.npy and w.npy."""
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, size=(5, 32), dtype=np.int8)
    w = nm_prune(rng.integers(-128, 128, size=(7, 32), dtype=np.int8), "2:8")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", w)
    return tmp_path, x, w
