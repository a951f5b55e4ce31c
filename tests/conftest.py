"""Shared fixtures: one preprocessed-data cache per test session, Ray shut down after use."""

import os

import pytest

# Keep the CPU tests predictable on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """The synthetic dataset and preprocessed arrays, built once per session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def ray_shutdown():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
