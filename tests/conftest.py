"""Test-wide setup: 8 virtual CPU devices for the sharding tests, float64 on request."""
import os

# Must happen before jax is imported anywhere: the device count is fixed at backend start.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (gradient tests)."""
    with jax.enable_x64(True):
        yield
