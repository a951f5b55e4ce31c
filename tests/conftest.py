"""Shared fixtures: one preprocessed-data cache per test session, Ray shut down after use."""

import os

import pytest

# Keep the CPU tests predictable on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# One Ray authentication mode for the whole session. Ray reads the mode once per process, and
# since 2.59 a local cluster turns token auth on by itself once ~/.ray/auth_token exists (an
# earlier `ray start` may have written it). A test that connects to a test head (started with
# auth disabled) and a later test that starts an in-process cluster would otherwise disagree:
# the second one's GCS refuses this process ("InvalidAuthToken ... RAY_AUTH_MODE is 'disabled'").
os.environ["RAY_AUTH_MODE"] = "disabled"


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


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, cache_dir):
    """ONE tiny real sweep, run in-process once per session and shared by every test that
    needs a real MLflow store (report site, browser tests): TransFusion's final-mask grid
    (inference-only: 4 trials, one training) on the synthetic washer category, 1 epoch,
    5 steps. Its working directory holds what the sweep wrote at its end (reports/)."""
    from types import SimpleNamespace

    from orchestrator import sweep

    root = tmp_path_factory.mktemp("tiny_sweep")
    db = root / "mlflow.db"
    previous = os.getcwd()
    os.chdir(root)
    try:
        summary = sweep.run(["ablation=transfusion_final_mask", "categories=[washer]", f"tracking_uri=sqlite:///{db}",
                             f"storage_path={root / 'ray'}", f"data.cache_dir={cache_dir}", "method.epochs=1", "method.steps=5",
                             "max_concurrent=2", "latency_images=1", "sample_maps=2"])
    finally:
        os.chdir(previous)
        import ray

        if ray.is_initialized():
            ray.shutdown()
    assert summary["failed"] == 0 and summary["trials"] == 4, summary
    return SimpleNamespace(root=root, db=db, uri=f"sqlite:///{db}", summary=summary, ablation="transfusion_final_mask")


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """An initialised empty SQLite MLflow store: creating one runs MLflow's migrations
    (seconds), copying it does not."""
    from orchestrator import tracking

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    tracking.client(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def services():
    """Real services on loopback, started once per session for the long tests (see
    tests/services.py): a SeaweedFS S3 store with one bucket, PostgreSQL, and an
    ``mlflow server`` keeping runs in PostgreSQL and artifacts in the bucket. Yields a
    ``services.Services``: ``tracking_uri``, ``store.endpoint``/``store.bucket``/
    ``store.client()``, ``postgres.uri``, ``mlflow`` (``stop()``/``start()``: same URL), and
    ``env`` (MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL, MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) for a sweep's process."""
    from services import Services

    started = Services()
    try:
        yield started
    finally:
        started.close()
