"""DDP evaluation: every rank predicts its share of the batches and the shares are
gathered, so the metrics equal a single process's (to 1e-6) and no rank waits while
another evaluates. Two real processes joined by torch.distributed (gloo), as Ray Train's
workers are; no Ray here (the sweep-level test is in tests/test_faults.py)."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.config import resolve_method_config
from orchestrator.data import DataSpec
from tests.services import free_ports
from orchestrator.training import (EvaluationSettings, Shard, build_model, calibrate_on_validation_normals, evaluate_model, load_datas,
                                   predict_split)

pytestmark = pytest.mark.slow  # two processes importing torch, and an MDPS evaluation

# MDPS samples with noise at inference (Algorithm 1): the maps depend on the generator, so
# equal results across shardings show that every batch draws from its own seeded stream.
METHOD, OVERRIDES = "mdps", {"steps": 2, "num_samples": 1, "mask_num_samples": 1}
SETTINGS = EvaluationSettings(batch_size=8, seed=3, latency_images=3, sample_maps=0)


def setup(cache_dir):
    config = resolve_method_config(METHOD, "smoke", OVERRIDES)
    torch.manual_seed(0)
    model = build_model(METHOD, config)
    datas = load_datas(DataSpec("synthetic", None, str(cache_dir), 0.2, 0), ["washer"], config)
    return model, datas


def rank_main(rank: int, world: int, init: str, cache_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model, datas = setup(cache_dir)
    evaluation = evaluate_model(model, datas, SETTINGS, torch.device("cpu"), None, 0.0, Shard(rank, world))
    test = datas[0]
    maps = predict_split(model, test.test_images, 0, SETTINGS.batch_size, SETTINGS.seed, torch.device("cpu"), shard=Shard(rank, world))
    if rank == 0:
        torch.save({"evaluation": dataclasses.asdict(evaluation), "maps": maps.maps, "scores": maps.scores}, out)
    # Both ranks leave together: a rank that tears gloo down while its peer is still in a
    # collective aborts the peer ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_give_the_single_rank_metrics(cache_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same float reduction order
    try:
        model, datas = setup(cache_dir)
        single = evaluate_model(model, datas, SETTINGS, torch.device("cpu"), None, 0.0)
        alone = predict_split(model, datas[0].test_images, 0, SETTINGS.batch_size, SETTINGS.seed, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "rank0.pt"
    mp.spawn(rank_main, args=(2, f"tcp://127.0.0.1:{free_ports(1)[0]}", str(cache_dir), str(out)), nprocs=2, join=True)
    sharded = torch.load(out, weights_only=False)
    np.testing.assert_allclose(sharded["maps"], alone.maps, atol=1e-6)
    np.testing.assert_allclose(sharded["scores"], alone.scores, atol=1e-6)
    ours, theirs = dataclasses.asdict(single)["categories"][0], sharded["evaluation"]["categories"][0]
    for split in ("val", "test"):
        for metric, value in ours[split].items():
            assert theirs[split][metric] == pytest.approx(value, abs=1e-6), (split, metric)
    assert len(alone.scores) == len(datas[0].test_images) and len(datas[0].test_images) > SETTINGS.batch_size  # several batches


def test_a_batch_draws_the_same_noise_whichever_rank_predicts_it(cache_dir):
    """Without per-batch streams the second batch's noise would depend on the first's draws."""
    model, datas = setup(cache_dir)
    calibrate_on_validation_normals(model, datas[0], 0, torch.device("cpu"))
    images = datas[0].test_images[:16]
    whole = predict_split(model, images, 0, 8, 5, torch.device("cpu"))
    second = predict_split(model, images[8:], 0, 8, 5 + 1_000_003, torch.device("cpu"))  # batch 1's seed, as batch 0
    np.testing.assert_allclose(whole.maps[8:], second.maps, atol=1e-6)
