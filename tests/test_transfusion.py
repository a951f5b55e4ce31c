"""TransFusion: the paper's equations (Eqs. 2-4, 10-11), schedules, and every config switch."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from methods.base import TrainBatch, field_docs
from methods.transfusion import (
    AnomalyTarget,
    ConsistencyMask,
    FinalMask,
    Heads,
    PreviousMask,
    ReverseProcess,
    TransFusion,
    TransFusionConfig,
    TransparencySchedule,
    anomaly_score,
    compose,
    final_anomaly_map,
    mask_loss,
    mean_filter,
    reconstruction_error,
    reverse_step,
    simulate_previous_mask,
    sinusoidal_position_encoding,
    transparency_schedule,
)

TINY = dict(
    image_size=32,
    crop_size=None,
    epochs=1,
    batch_size=4,
    steps=4,
    base_channels=8,
    channel_mult=(1, 2),
    layers_per_block=1,
    attention_resolutions=(),
    head_channels=8,
    norm_groups=4,
)


def tiny(**overrides) -> TransFusionConfig:
    return TransFusionConfig(**{**TINY, **overrides})


def make_batch(b: int = 4, size: int = 32, seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    return TrainBatch(
        images=torch.rand(b, 3, size, size, generator=g) * 2 - 1,
        foreground=torch.ones(b, 1, size, size),
        textures=torch.rand(b, 3, size, size, generator=g) * 2 - 1,
        category=torch.zeros(b, dtype=torch.long),
    )


def ground_truth(b: int = 3, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    normal = torch.rand(b, 3, size, size, generator=g, dtype=torch.float64) * 2 - 1
    anomaly = torch.rand(b, 3, size, size, generator=g, dtype=torch.float64) * 2 - 1
    mask = (torch.rand(b, 1, size, size, generator=g, dtype=torch.float64) > 0.6).double()
    return normal, anomaly, mask


# ---- transparency schedules -----------------------------------------------------------


@pytest.mark.parametrize("kind", list(TransparencySchedule))
@pytest.mark.parametrize("steps", [1, 5, 20, 50])
def test_schedule_endpoints_and_strictly_increasing(kind, steps):
    betas = transparency_schedule(kind, steps)
    assert betas.shape == (steps + 1,)
    assert betas[0].item() == 0.0 and betas[-1].item() == 1.0
    assert bool((betas[1:] > betas[:-1]).all())


def test_schedule_shapes_match_section_4_6():
    t = torch.arange(11, dtype=torch.float64) / 10
    torch.testing.assert_close(transparency_schedule("linear", 10), t)
    torch.testing.assert_close(transparency_schedule("quadratic", 10), t**2)
    torch.testing.assert_close(transparency_schedule("root", 10), t.sqrt())
    # Quadratic stays below linear (anomalies stay faint longer), root above.
    mid = slice(1, 10)
    assert bool((transparency_schedule("quadratic", 10)[mid] < t[mid]).all())
    assert bool((transparency_schedule("root", 10)[mid] > t[mid]).all())


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError):
        transparency_schedule("cosine", 10)
    with pytest.raises(ValueError):
        transparency_schedule("linear", 0)


# ---- forward and reverse process (Eqs. 2-4) ------------------------------------------


@pytest.mark.parametrize("kind", list(TransparencySchedule))
def test_reverse_step_with_ground_truth_gives_eq3(kind):
    normal, anomaly, mask = ground_truth()
    betas = transparency_schedule(kind, 20)
    for t in range(1, 21):
        x_t = compose(normal, anomaly, mask, betas[t])  # Eq. 2
        expected = compose(normal, anomaly, mask, betas[t - 1])  # Eq. 3
        got = reverse_step(x_t, anomaly, normal, mask, betas[t], betas[t - 1])  # Eq. 4
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_per_sample_betas_broadcast():
    normal, anomaly, mask = ground_truth(b=3)
    betas = transparency_schedule("linear", 10)
    t = torch.tensor([1, 5, 10])
    x_t = compose(normal, anomaly, mask, betas[t])
    for i in range(3):
        torch.testing.assert_close(x_t[i : i + 1], compose(normal[i : i + 1], anomaly[i : i + 1], mask[i : i + 1], betas[t[i]]))
    back = reverse_step(x_t, anomaly, normal, mask, betas[t], betas[t - 1])
    torch.testing.assert_close(back, compose(normal, anomaly, mask, betas[t - 1]))


def test_beta_one_is_the_pure_anomaly_and_beta_zero_the_normal_image():
    normal, anomaly, mask = ground_truth()
    x_T = compose(normal, anomaly, mask, 1.0)
    inside = mask.expand_as(normal).bool()
    assert torch.equal(x_T[inside], anomaly[inside])
    assert torch.equal(x_T[~inside], normal[~inside])
    assert torch.equal(compose(normal, anomaly, mask, 0.0), normal)


def test_full_reverse_chain_with_ground_truth_restores_the_normal_image():
    normal, anomaly, mask = ground_truth()
    betas = transparency_schedule("root", 7)
    x = compose(normal, anomaly, mask, betas[-1])
    for t in range(7, 0, -1):
        x = reverse_step(x, anomaly, normal, mask, betas[t], betas[t - 1])
    torch.testing.assert_close(x, normal, rtol=0, atol=1e-12)


# ---- maps and score (Eqs. 10-11) ------------------------------------------------------


def test_mean_filter_is_a_zero_padded_box_filter():
    maps = torch.zeros(1, 9, 9)
    maps[0, 4, 4] = 49.0
    out = mean_filter(maps, 7)
    assert out.shape == maps.shape
    assert torch.allclose(out[0, 1:8, 1:8], torch.ones(7, 7))
    assert out.sum().item() == pytest.approx(49.0)
    # Zero padding: a constant map is attenuated at the corner (4x4 of 7x7 inside).
    assert mean_filter(torch.ones(1, 9, 9), 7)[0, 0, 0].item() == pytest.approx(16 / 49)
    assert torch.equal(mean_filter(maps, 1), maps)


def test_final_map_and_score():
    g = torch.Generator().manual_seed(1)
    disc, recon = torch.rand(2, 12, 12, generator=g), torch.rand(2, 12, 12, generator=g)
    final = final_anomaly_map(disc, recon, 0.95, 7)
    torch.testing.assert_close(final, 0.95 * mean_filter(disc, 7) + 0.05 * mean_filter(recon, 7))
    torch.testing.assert_close(anomaly_score(final), final.flatten(1).max(dim=1).values)


def test_reconstruction_error_in_unit_range():
    images = torch.full((1, 3, 4, 4), 1.0)
    recon = torch.full((1, 3, 4, 4), -3.0)  # clipped to 0 after mapping to [0, 1]
    recon[..., 0, 0] = 1.0
    err = reconstruction_error(images, recon)
    assert err.shape == (1, 4, 4)
    assert err[0, 0, 0].item() == 0.0 and err[0, 1, 1].item() == pytest.approx(1.0)


# ---- inputs ------------------------------------------------------------------------------


def test_positional_encoding_one_channel_is_sine_of_row():
    pe = sinusoidal_position_encoding(6, 5, 1)
    assert pe.shape == (1, 6, 5)
    torch.testing.assert_close(pe[0], torch.sin(torch.arange(6.0))[:, None].expand(6, 5))


def test_positional_encoding_four_channels_encode_rows_and_columns():
    pe = sinusoidal_position_encoding(6, 5, 4)
    rows, cols = torch.arange(6.0)[:, None].expand(6, 5), torch.arange(5.0)[None, :].expand(6, 5)
    for channel, expected in enumerate((rows.sin(), rows.cos(), cols.sin(), cols.cos())):
        torch.testing.assert_close(pe[channel], expected)


def test_positional_encoding_frequencies_follow_the_2d_sinusoidal_encoding():
    """8 channels: d = 4 slots per axis at frequencies 10000^(-2i/d) = 1 and 0.01."""
    pe = sinusoidal_position_encoding(6, 5, 8)
    rows, cols = torch.arange(6.0)[:, None].expand(6, 5), torch.arange(5.0)[None, :].expand(6, 5)
    expected = [f(axis * w) for axis in (rows, cols) for w in (1.0, 0.01) for f in (torch.sin, torch.cos)]
    for channel, value in enumerate(expected):
        torch.testing.assert_close(pe[channel], value)


def test_simulated_previous_mask_shrinks_keeps_grows_or_drops():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(400, 1, 8, 8, generator=g) * 2.4 - 1.2
    foreground = torch.ones_like(noise)
    foreground[:, :, :, :2] = 0
    exact = (noise.abs() > 0.5).float() * foreground
    simulated = simulate_previous_mask(noise, foreground, 0.25)
    assert bool((simulated[foreground.expand_as(simulated) == 0] == 0).all())
    per_sample = simulated.flatten(1)
    dropped = per_sample.sum(1) == 0
    subset = ((per_sample <= exact.flatten(1)).all(1))
    superset = ((per_sample >= exact.flatten(1)).all(1))
    assert bool((subset | superset).all())  # every simulated mask is a shrunk or grown M
    assert 0.15 < dropped.float().mean().item() < 0.40  # ~25% dropped (+ rare empty shrinks)
    assert (subset & superset & ~dropped).float().mean().item() > 0.1  # the exact M, ~25%
    shrunk, grown = (subset & ~superset & ~dropped).float().mean().item(), (~subset).float().mean().item()
    assert 0.1 < shrunk < 0.4 and 0.1 < grown < 0.4  # τ ~ U(0.5, 1) and τ ~ U(0, 0.5), ~25% each
    torch.manual_seed(0)
    assert simulate_previous_mask(noise, foreground, 1.0).sum().item() == 0


# ---- the model: config switches ---------------------------------------------------------


def test_input_channels_follow_the_switches():
    assert tiny().input_channels == 5  # x_t, previous mask, 1-channel PE (official)
    assert tiny(positional_encoding=False).input_channels == 4
    assert tiny(previous_mask="none").input_channels == 4
    assert tiny(positional_encoding_channels=4).input_channels == 8
    for config in (tiny(), tiny(positional_encoding=False), tiny(previous_mask="none")):
        model = TransFusion(config)
        assert model.net.trunk.net.conv_in.in_channels == config.input_channels
        x = torch.zeros(2, 3, 32, 32)
        previous = None if config.previous_mask is PreviousMask.NONE else torch.ones(2, 1, 32, 32)
        assert model.network_input(x, previous).shape == (2, config.input_channels, 32, 32)


def test_network_input_layout():
    model = TransFusion(tiny())
    x = torch.full((2, 3, 32, 32), 0.3)
    previous = torch.ones(2, 1, 32, 32)
    inp = model.network_input(x, previous)
    assert torch.equal(inp[:, :3], x) and torch.equal(inp[:, 3:4], previous)
    torch.testing.assert_close(inp[0, 4], sinusoidal_position_encoding(32, 32, 1)[0])
    with pytest.raises(ValueError, match="previous_mask"):
        model.network_input(x, None)


def test_heads_have_the_paper_shapes():
    model = TransFusion(tiny())
    heads = model.net(torch.zeros(2, 5, 32, 32), torch.tensor([1, 4]))
    assert heads.anomaly.shape == (2, 3, 32, 32)
    assert heads.normal.shape == (2, 3, 32, 32)
    assert heads.mask_logits.shape == (2, 1, 32, 32)
    assert isinstance(model.net.mask_head[0], torch.nn.BatchNorm2d)
    assert isinstance(model.net.anomaly_head[0], torch.nn.GroupNorm)
    assert isinstance(model.net.normal_head, torch.nn.Conv2d)


@pytest.mark.parametrize("previous_mask", list(PreviousMask))
def test_training_sample_half_anomalous_and_follows_eq2(previous_mask):
    torch.manual_seed(3)
    model = TransFusion(tiny(previous_mask=previous_mask, rotation_probability=0.0, steps=3))
    batch = make_batch(b=8)
    sample = model.training_sample(batch)
    assert torch.equal(sample.images, batch.images)  # no rotation
    assert sample.mask[4:].sum() == 0 and sample.anomaly[4:].abs().sum() == 0
    assert sample.mask[:4].sum() > 0
    assert torch.equal(sample.x_t[4:], batch.images[4:])  # normal samples are untouched
    assert bool(((sample.t >= 1) & (sample.t <= 3)).all())
    assert torch.equal(sample.anomaly, sample.mask * sample.anomaly)  # ε = M ⊙ A
    torch.testing.assert_close(sample.x_t, compose(sample.images, sample.anomaly, sample.mask, model.betas[sample.t]))
    if previous_mask is PreviousMask.NONE:
        assert sample.previous_mask is None
        return
    at_start = sample.t == 3
    assert sample.previous_mask[at_start].sum() == 0  # inference starts from an all-zero mask
    assert sample.previous_mask[4:].sum() == 0
    if previous_mask is PreviousMask.EXACT:
        assert torch.equal(sample.previous_mask[~at_start], sample.mask[~at_start])


def test_previous_mask_is_simulated_not_exact():
    torch.manual_seed(0)
    model = TransFusion(tiny(rotation_probability=0.0, anomaly_fraction=1.0, steps=1000))
    sample = model.training_sample(make_batch(b=16))
    differs = (sample.previous_mask != sample.mask).flatten(1).any(1)
    assert differs.float().mean().item() > 0.3  # dropped, shrunk or grown for most samples


def test_rotation_augmentation_turns_image_and_foreground_together():
    torch.manual_seed(0)
    model = TransFusion(tiny(rotation_probability=1.0, anomaly_fraction=1.0))
    batch = make_batch(b=4)
    batch.foreground[:, :, :, 16:] = 0
    sample = model.training_sample(batch)
    assert not torch.allclose(sample.images, batch.images)
    # Anomalies land only where the (rotated) foreground is; masks stay binary.
    assert set(sample.mask.unique().tolist()) <= {0.0, 1.0}
    assert sample.mask[:, :, :, 24:].sum() < sample.mask[:, :, :, :8].sum() + 1


LOSS_SWITCHES = {"normal_loss": "L_n", "mask_loss": "L_m", "anomaly_loss": "L_a", "consistency_loss": "L_c"}


@pytest.mark.parametrize("switch", [None, *LOSS_SWITCHES])
def test_each_loss_switch_removes_its_term(switch):
    # Without L_m the mask head is trained through L_c's soft mask (Table 4 "w/o L_m").
    extra = {"consistency_mask": ConsistencyMask.SOFT} if switch == "mask_loss" else {}
    config = tiny() if switch is None else tiny(**{switch: False}, **extra)
    model = TransFusion(config)
    torch.manual_seed(0)
    losses = model(make_batch())
    expected = set(LOSS_SWITCHES.values()) - ({LOSS_SWITCHES[switch]} if switch else set())
    assert set(losses.terms) == expected
    assert losses.total.item() == pytest.approx(sum(v.item() for v in losses.terms.values()), rel=1e-6)
    losses.total.backward()
    # DDP without find_unused_parameters needs a gradient for every parameter.
    assert all(p.grad is not None for p in model.parameters())


def test_all_losses_off_is_rejected():
    with pytest.raises(ValueError, match="normal_loss"):
        tiny(normal_loss=False, mask_loss=False, anomaly_loss=False, consistency_loss=False)


def _fixed_sample(model: TransFusion):
    torch.manual_seed(1)
    return model.training_sample(make_batch())


def test_anomaly_target_scaled_vs_appearance():
    model = TransFusion(tiny(rotation_probability=0.0))
    sample = _fixed_sample(model)
    beta = model.betas[sample.t].reshape(-1, 1, 1, 1)
    zeros = torch.zeros_like(sample.images)
    scaled = Heads(beta * sample.anomaly, sample.images, torch.zeros_like(sample.mask))
    assert model.training_losses(sample, scaled).terms["L_a"].item() == pytest.approx(0.0, abs=1e-12)
    plain = TransFusion(tiny(rotation_probability=0.0, anomaly_target=AnomalyTarget.APPEARANCE))
    assert plain.training_losses(sample, scaled).terms["L_a"].item() > 1e-4
    exact = Heads(sample.anomaly, sample.images, zeros[:, :1])
    assert plain.training_losses(sample, exact).terms["L_a"].item() == pytest.approx(0.0, abs=1e-12)
    # Eq. 4 undoes the scaling, so the consistency target is met by the scaled prediction.
    perfect_mask = Heads(beta * sample.anomaly, sample.images, (sample.mask * 2 - 1) * 20)
    assert model.training_losses(sample, perfect_mask).terms["L_c"].item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("mode,reaches_mask_head", [(ConsistencyMask.BINARY, False), (ConsistencyMask.SOFT, True)])
def test_consistency_mask_mode_decides_whether_l_c_trains_the_mask(mode, reaches_mask_head):
    # L_m and L_c only: the mask logits' gradient differs from L_m's alone iff L_c reaches them.
    model = TransFusion(tiny(consistency_mask=mode, normal_loss=False, anomaly_loss=False))
    sample = _fixed_sample(model)
    logits = torch.zeros_like(sample.mask, requires_grad=True)
    heads = Heads(torch.randn_like(sample.images), torch.randn_like(sample.images), logits + 0.1)
    model.training_losses(sample, heads).total.backward()
    only_l_m = torch.zeros_like(sample.mask, requires_grad=True)
    mask_loss(only_l_m + 0.1, sample.mask, model.config.mask_focal_weight).backward()
    assert (not torch.allclose(logits.grad, only_l_m.grad)) == reaches_mask_head


def test_without_l_m_a_binary_consistency_mask_is_rejected():
    with pytest.raises(ValueError, match="consistency_mask=soft"):
        tiny(mask_loss=False)
    with pytest.raises(ValueError, match="consistency_mask=soft"):
        tiny(mask_loss=False, consistency_loss=False, consistency_mask=ConsistencyMask.SOFT)
    tiny(mask_loss=False, consistency_mask=ConsistencyMask.SOFT)


def test_without_l_m_the_mask_head_is_trained():
    """Table 4 "w/o L_m" as the search space runs it: every mask-head parameter gets a
    non-zero gradient from the remaining terms, and one step moves its output."""
    from orchestrator import search_space
    from orchestrator.config import resolve_method_config

    space = search_space.load("transfusion_losses")
    row = next(c for c in space.conditions if c.name == "w/o L_m")
    config = resolve_method_config("transfusion", "smoke", space.fixed, row.overrides)
    assert not config.mask_loss and config.consistency_mask is ConsistencyMask.SOFT
    model = TransFusion(dataclasses.replace(config, **{k: v for k, v in TINY.items() if k not in ("epochs",)}))
    torch.manual_seed(0)
    losses = model(make_batch())
    assert "L_m" not in losses.terms
    losses.total.backward()
    for name, p in model.net.mask_head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum().item() > 0, name


def test_perfect_heads_give_zero_mask_and_normal_losses():
    model = TransFusion(tiny(rotation_probability=0.0))
    sample = _fixed_sample(model)
    beta = model.betas[sample.t].reshape(-1, 1, 1, 1)
    perfect = Heads(beta * sample.anomaly, sample.images, (sample.mask * 2 - 1) * 30)
    terms = model.training_losses(sample, perfect).terms
    assert terms["L_n"].item() == pytest.approx(0.0, abs=1e-5)
    assert terms["L_m"].item() == pytest.approx(0.0, abs=1e-6)
    wrong = Heads(beta * sample.anomaly, -sample.images, -(sample.mask * 2 - 1) * 30)
    terms_wrong = model.training_losses(sample, wrong).terms
    assert terms_wrong["L_n"].item() > 0.5 and terms_wrong["L_m"].item() > 0.1


def test_final_mask_modes_pick_their_maps():
    images = torch.zeros(2, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    result = ReverseProcess(torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 16, 16, generator=g), torch.rand(2, 16, 16, generator=g))
    recon = reconstruction_error(images, result.reconstruction)

    def anomaly_map(**overrides):
        return TransFusion(tiny(**overrides)).anomaly_map(images, result)

    torch.testing.assert_close(anomaly_map(final_mask="last"), mean_filter(result.last_mask, 7))
    torch.testing.assert_close(anomaly_map(final_mask="disc"), mean_filter(result.mean_mask, 7))
    torch.testing.assert_close(anomaly_map(final_mask="recon"), mean_filter(recon, 7))
    torch.testing.assert_close(anomaly_map(), final_anomaly_map(result.mean_mask, recon, 0.95, 7))
    torch.testing.assert_close(anomaly_map(disc_weight=1.0), anomaly_map(final_mask="disc"))
    torch.testing.assert_close(anomaly_map(disc_weight=0.0, filter_size=3), mean_filter(recon, 3))
    assert not torch.allclose(anomaly_map(disc_weight=0.5), anomaly_map())


def test_predict_ignores_the_generator_and_scores_by_eq11():
    """The reverse process is deterministic: any seed gives the same map; AS = max M_final."""
    torch.manual_seed(0)
    model = TransFusion(tiny()).eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    first = model.predict(images, generator=torch.Generator().manual_seed(0))
    second = model.predict(images, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.anomaly_map, second.anomaly_map)
    assert torch.equal(first.image_score, first.anomaly_map.flatten(1).amax(1))


def test_reverse_process_runs_t_steps_and_feeds_back_the_binarised_mask():
    model = TransFusion(tiny(steps=3)).eval()
    seen: list[tuple[int, torch.Tensor]] = []
    forward = model.net.forward

    def spy(x, t):
        seen.append((int(t[0]), x[:, 3].clone()))
        return forward(x, t)

    model.net.forward = spy
    model.reverse_process(torch.zeros(2, 3, 32, 32))
    assert [t for t, _ in seen] == [3, 2, 1]
    assert seen[0][1].abs().sum() == 0  # starts from an all-zero mask
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for _, m in seen)


def test_reverse_process_with_oracle_heads_restores_the_normal_image():
    """With heads that return the true (ε, n, M), T steps of Eq. 4 remove the anomaly and
    M_disc equals M."""
    model = TransFusion(tiny(steps=5, schedule="quadratic")).eval()
    normal, anomaly, mask = (v.float() for v in ground_truth(b=2, size=32))
    logits = (mask * 2 - 1) * 50

    def oracle(x, t):
        beta = model.betas[t].reshape(-1, 1, 1, 1)
        return Heads(beta * anomaly, normal, logits)

    model.net.forward = oracle
    result = model.reverse_process(compose(normal, anomaly, mask, 1.0))
    torch.testing.assert_close(result.reconstruction, normal, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.mean_mask, mask[:, 0])


def test_steps_and_schedule_change_the_betas_buffer():
    assert TransFusion(tiny(steps=5)).betas.shape == (6,)
    quad = TransFusion(tiny(steps=4, schedule="quadratic")).betas
    torch.testing.assert_close(quad, torch.tensor([0.0, 1 / 16, 1 / 4, 9 / 16, 1.0]))


# ---- config ---------------------------------------------------------------------------------


def test_defaults_are_the_papers():
    c = TransFusionConfig()
    assert (c.steps, c.schedule, c.disc_weight, c.filter_size, c.mask_focal_weight) == (20, TransparencySchedule.LINEAR, 0.95, 7, 5.0)
    assert (c.learning_rate, c.epochs, c.lr_decay_epoch, c.batch_size, c.image_size, c.crop_size) == (1e-5, 1500, 800, 8, 256, 224)
    assert (c.mask_drop_probability, c.anomaly_fraction, c.final_mask) == (0.25, 0.5, FinalMask.COMBINED)
    assert c.normal_loss and c.mask_loss and c.anomaly_loss and c.consistency_loss and c.positional_encoding
    assert c.previous_mask is PreviousMask.SIMULATED


def test_inference_only_fields_are_declared_as_such():
    docs = field_docs(TransFusionConfig)
    infer = {name for name, (trains, _) in docs.items() if not trains}
    assert infer == {"final_mask", "disc_weight", "filter_size", "mask_threshold"}
    assert all(doc for _, doc in docs.values())
    for name in ("steps", "schedule", "positional_encoding", "previous_mask", "normal_loss", "image_size", "epochs", "batch_size"):
        assert docs[name][0]


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"schedule": "cosine"}, "schedule"),
        ({"final_mask": "max"}, "final_mask"),
        ({"previous_mask": "maybe"}, "previous_mask"),
        ({"disc_weight": 1.5}, "disc_weight"),
        ({"filter_size": 4}, "filter_size"),
        ({"steps": 0}, "steps"),
        ({"mask_threshold": 1.0}, "mask_threshold"),
        ({"crop_size": 64}, "crop_size"),
        ({"image_size": 31}, "divisible"),
        ({"norm_groups": 3}, "norm_groups"),
        ({"mask_drop_probability": -0.1}, "mask_drop_probability"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny(**overrides)


def test_presets_resolve_through_the_orchestrator():
    from orchestrator.config import resolve_method_config

    smoke = resolve_method_config("transfusion", "smoke", {"steps": 10})
    assert smoke.image_size == 64 and smoke.crop_size is None and smoke.steps == 10
    paper = resolve_method_config("transfusion", "paper")
    assert paper == TransFusionConfig()
    assert dataclasses.replace(paper, disc_weight=0.5).disc_weight == 0.5


def test_configure_optimizers_is_adamw_with_step_decay():
    model = TransFusion(tiny(learning_rate=1e-3, lr_decay_epoch=2, lr_decay_factor=0.1))
    opt = model.configure_optimizers()
    assert isinstance(opt.optimizer, torch.optim.AdamW)
    lrs = []
    for _ in range(4):
        lrs.append(opt.optimizer.param_groups[0]["lr"])
        opt.optimizer.step()
        opt.scheduler.step()
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    assert math.isclose(TransFusionConfig().learning_rate, 1e-5)
