"""The one method contract (methods/base.py), checked for every registered method at its
smoke preset, plus a training-free method defined here to show the contract admits one.

What each method does with its numbers is tested in its own file; here only what the
orchestrator relies on: config validation and coercion, the shape of ``forward``'s
losses, ``predict``'s outputs, its determinism and its side effects, and the optimiser.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from enum import Enum

import pytest
import torch

from methods import METHODS, get_method
from methods.backbones import FeatureExtractor
from methods.base import (
    AnomalyMethod,
    Losses,
    MethodConfig,
    MultiClassConfig,
    Optimizers,
    Prediction,
    TrainBatch,
    field_docs,
    train_field,
)

BATCH = 2
CATEGORIES = ["a", "b"]


def smoke_config(cls: type[AnomalyMethod]) -> MethodConfig:
    overrides = {**cls.PRESETS["smoke"], **cls.category_overrides(CATEGORIES)}
    return dataclasses.replace(cls.Config(), **overrides)


def backbone_factory(name: str) -> FeatureExtractor:
    return FeatureExtractor(name)  # random weights: the contract, not the features


def tiny_batch(size: int, seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    return TrainBatch(
        images=torch.rand(BATCH, 3, size, size, generator=g) * 2 - 1,
        foreground=torch.ones(BATCH, 1, size, size),
        textures=torch.rand(BATCH, 3, size, size, generator=g) * 2 - 1,
        category=torch.arange(BATCH) % len(CATEGORIES),
    )


@pytest.fixture(scope="module", params=sorted(METHODS))
def method(request) -> tuple[AnomalyMethod, TrainBatch]:
    """A model of every registered method at the smoke preset and a batch its size."""
    cls = get_method(request.param)
    config = smoke_config(cls)
    torch.manual_seed(0)
    model, batch = cls(config, backbone_factory), tiny_batch(config.input_size)
    if is_training_free(model):
        with torch.no_grad():  # what the training loop does: forward fills its state (a memory bank)
            model(batch)
    model.calibrate(tiny_batch(config.input_size, seed=1).images, batch.category)  # as evaluate_model does, before any predict
    return model, batch


def is_training_free(model: AnomalyMethod) -> bool:
    return model.configure_optimizers() is None


def predict(model: AnomalyMethod, batch: TrainBatch, generator: torch.Generator | None) -> Prediction:
    return model.predict(batch.images, batch.category, generator)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- config ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_config_derives_from_the_base_and_documents_every_field(name):
    cls = get_method(name)
    assert issubclass(cls.Config, MethodConfig)
    # both ways: a MultiClassConfig on a per-category method would train one model per
    # category with num_categories=1, silently
    assert issubclass(cls.Config, MultiClassConfig) == cls.multi_class
    docs = field_docs(cls.Config)
    assert all(doc for _, doc in docs.values())
    for preset in cls.PRESETS.values():
        assert set(preset) <= set(docs)
    assert cls.PRESETS["paper"] == {}
    config = smoke_config(cls)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 3  # type: ignore[misc]
    assert hash(config) == hash(dataclasses.replace(config))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_methods_facts_are_well_formed(name):
    """The per-method facts of methods/base.py that benches and reports read from the class."""
    cls = get_method(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    assert isinstance(cls.paper_speed, str) and cls.paper_speed
    assert isinstance(cls.paper_parameters, str) and cls.paper_parameters
    assert cls.paper_seconds_per_image is None or cls.paper_seconds_per_image > 0
    assert cls.paper_backbone is None or (isinstance(cls.paper_backbone, str) and "backbone" in fields)
    grid = cls.selection_grid
    assert isinstance(grid, tuple) and grid and grid[0] == {}, grid  # the preset first
    assert all(isinstance(c, dict) and set(c) <= fields for c in grid), grid
    for scale in cls.PRESETS:
        config = dataclasses.replace(cls.Config(), **{**cls.PRESETS[scale], **cls.category_overrides(CATEGORIES)})
        sampling = cls.minimal_sampling(config)
        assert set(sampling) <= fields and not any(field_docs(cls.Config)[k][0] for k in sampling), sampling  # inference fields
        dataclasses.replace(config, **sampling)  # valid values


@pytest.mark.parametrize("name", sorted(METHODS))
def test_out_of_range_value_raises_a_one_line_error_naming_the_field(name):
    config = smoke_config(get_method(name))
    with pytest.raises(ValueError, match="batch_size") as info:
        dataclasses.replace(config, batch_size=0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_enum_strings_and_lists_are_coerced(name):
    """OmegaConf hands enums as their string values and tuples as lists."""
    config = smoke_config(get_method(name))
    hints = typing.get_type_hints(type(config))
    enums = [f.name for f in dataclasses.fields(config) if isinstance(hints[f.name], type) and issubclass(hints[f.name], Enum)]
    tuples = [f.name for f in dataclasses.fields(config) if isinstance(getattr(config, f.name), tuple)]
    assert enums and tuples
    plain = {**{n: getattr(config, n).value for n in enums}, **{n: list(getattr(config, n)) for n in tuples}}
    assert all(isinstance(v, (str, list)) for v in plain.values())
    coerced = dataclasses.replace(config, **plain)
    assert coerced == config
    assert all(type(getattr(coerced, n)) is type(getattr(config, n)) for n in enums + tuples)
    with pytest.raises(ValueError, match=enums[0]):
        dataclasses.replace(config, **{enums[0]: "no such value"})


# ---- forward, predict, optimisers -----------------------------------------------------


def test_forward_gives_a_differentiable_scalar_and_detached_terms(method):
    model, batch = method
    model.train()
    torch.manual_seed(1)
    if is_training_free(model):  # forward runs without gradients (see methods/base.py)
        with torch.no_grad():
            losses = model(batch)
        assert isinstance(losses, Losses) and losses.total.ndim == 0 and torch.isfinite(losses.total)
        assert losses.terms and all(t.ndim == 0 and torch.isfinite(t) for t in losses.terms.values())
        assert not any(p.requires_grad for p in model.parameters())
        return
    losses = model(batch)
    assert isinstance(losses, Losses)
    assert losses.total.ndim == 0 and torch.isfinite(losses.total)
    assert losses.total.requires_grad
    assert losses.terms and all(t.ndim == 0 and torch.isfinite(t) and not t.requires_grad for t in losses.terms.values())
    model.zero_grad(set_to_none=True)
    losses.total.backward()
    assert any(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_predict_outputs(method):
    model, batch = method
    prediction = predict(model, batch, seeded(0))
    assert isinstance(prediction, Prediction)
    assert prediction.anomaly_map.shape == (BATCH, *batch.images.shape[-2:])
    assert prediction.image_score.shape == (BATCH,)
    assert torch.isfinite(prediction.anomaly_map).all() and torch.isfinite(prediction.image_score).all()
    assert not prediction.anomaly_map.requires_grad and not prediction.image_score.requires_grad


def test_predict_is_deterministic(method):
    model, batch = method
    model.eval()
    a, b = predict(model, batch, seeded(3)), predict(model, batch, seeded(3))
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.image_score, b.image_score)
    # Without a generator: one seeded with 0, so two calls agree (and equal seed 0).
    c, d = predict(model, batch, None), predict(model, batch, None)
    assert torch.equal(c.anomaly_map, d.anomaly_map) and torch.equal(c.image_score, d.image_score)
    assert torch.equal(c.anomaly_map, predict(model, batch, seeded(0)).anomaly_map)


def test_calibrate_keeps_the_mode_the_rng_and_the_stored_weights(method):
    model, batch = method
    model.train()
    state, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    model.calibrate(batch.images, batch.category)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize("training", [True, False])
def test_predict_restores_the_mode_and_leaves_the_global_rng_alone(method, training):
    model, batch = method
    model.train(training)
    state = torch.get_rng_state()
    predict(model, batch, seeded(0))
    assert model.training is training
    assert torch.equal(torch.get_rng_state(), state)


def test_configure_optimizers_covers_every_trainable_parameter(method):
    model, _ = method
    optimizers = model.configure_optimizers()
    if optimizers is None:  # a training-free method: nothing the training loop could miss
        assert not any(p.requires_grad for p in model.parameters())
        return
    assert isinstance(optimizers, Optimizers) and isinstance(optimizers.optimizer, torch.optim.Optimizer)
    assert optimizers.scheduler is None or isinstance(optimizers.scheduler, torch.optim.lr_scheduler.LRScheduler)
    grouped = {id(p) for group in optimizers.optimizer.param_groups for p in group["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}  # DDP: no unused parameters


# ---- a training-free method -----------------------------------------------------------


@dataclass(frozen=True)
class MeanImageConfig(MethodConfig):
    image_size: int = train_field(16, "resize side in pixels")


class MeanImage(AnomalyMethod):
    """Anomaly map = squared distance to the mean training image; nothing to optimise."""

    Config = MeanImageConfig

    def __init__(self, config: MeanImageConfig, backbone_factory=None):
        super().__init__(config, backbone_factory)
        size = config.input_size
        self.register_buffer("total", torch.zeros(3, size, size))
        self.register_buffer("count", torch.zeros(()))

    def forward(self, batch: TrainBatch) -> Losses:
        with torch.no_grad():
            self.total += batch.images.sum(0)
            self.count += batch.images.shape[0]
        return Losses(torch.zeros(()), {"images_seen": self.count.clone()})

    def configure_optimizers(self) -> None:
        return None

    def infer(self, images, category, generator) -> Prediction:
        mean = self.total / self.count.clamp(min=1)
        anomaly_map = (images - mean).pow(2).sum(1)
        return Prediction(anomaly_map, anomaly_map.flatten(1).amax(1))


def test_the_contract_admits_a_training_free_method():
    model = MeanImage(MeanImageConfig())
    assert model.configure_optimizers() is None
    batch = tiny_batch(16)
    losses = model(batch)
    assert losses.terms["images_seen"].item() == BATCH
    torch.testing.assert_close(model.total / model.count, batch.images.mean(0))
    prediction = model.predict(batch.images)
    assert prediction.anomaly_map.shape == (BATCH, 16, 16) and prediction.image_score.shape == (BATCH,)
    assert model.training  # predict restored the mode it found
