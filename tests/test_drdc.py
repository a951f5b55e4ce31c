"""DRDC unit tests: the grid partition (§4.2), the known-region replacement (Eqs. 13-15),
the set combination (Eq. 10), the heatmap fusion (Eqs. 2, 11, 16-19), the config and the
model contract. A tiny random conv stands in for the pretrained backbone."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from methods.base import TrainBatch, field_docs, training_fields
from methods.drdc import (
    DRDC,
    DRDCConfig,
    Fusion,
    base_heatmap,
    combine_sets,
    distance_map,
    fuse_heatmaps,
    grid_partition,
    image_score,
    inpaint,
    known_masks,
    mean_filter,
    noised_condition,
    random_training_masks,
    refinement_state,
    replace_known_region,
    spatiotemporal_heatmap,
)
from methods.feature_reconstruction import (
    FeatureReconstructionTransformer,
    feature_jitter,
    max_neighbor_size,
    neighbor_mask,
    resize_and_concatenate,
)
from methods.gaussian_diffusion import GaussianDiffusion


class TinyBackbone(nn.Module):
    """Stand-in for methods.backbones.FeatureExtractor (same contract, random weights):
    five stride-2 conv stages (strides 2 ... 32)."""

    def __init__(self):
        super().__init__()
        self.channels = (4, 6, 8, 10, 12)
        self.strides = (2, 4, 8, 16, 32)
        widths = (3, *self.channels)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1), nn.BatchNorm2d(widths[i + 1]), nn.ReLU()) for i in range(5)
        )
        self.calls = []

    def forward(self, images, num_stages=None):
        self.calls.append(num_stages)
        out = []
        for stage in self.stages[: num_stages or len(self.stages)]:
            images = stage(images)
            out.append(images)
        return out


def tiny_factory(name):
    assert name == "efficientnet_lite0"  # the config's name; the stand-in ignores the weights
    return TinyBackbone()


TINY = dict(
    image_size=32, epochs=1, batch_size=4, num_categories=3, backbone="efficientnet_lite0", feature_stride=8, hidden_dim=16, transformer_heads=2,
    encoder_layers=1, decoder_layers=1, ffn_dim=32, neighbor_size=1, train_grid_sizes=(1, 8), train_max_timestep=300, train_start_timestep=200,
    base_channels=8, channel_mult=(1, 2), layers_per_block=1, attention_resolutions=(), head_channels=8,
    norm_groups=4, timesteps=(200, 100, 0), grid_sizes=(1, 8), scales=(1, 2), mean_filter_size=5, score_pool_size=4,
)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return DRDC(DRDCConfig(**{**TINY, **overrides}), tiny_factory)


def batch(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TrainBatch(
        images=torch.rand(n, 3, size, size, generator=g) * 2 - 1,
        foreground=torch.ones(n, 1, size, size),
        textures=torch.zeros(n, 3, size, size),
        category=torch.arange(n) % 3,
    )


# --- §4.2 grid partition ---------------------------------------------------------------


@pytest.mark.parametrize("cell,num_sets", [(1, 2), (4, 2), (4, 3), (8, 5), (16, 4)])
def test_grid_partition_is_disjoint_covering_and_balanced(cell, num_sets):
    partition = grid_partition(6, 32, 32, cell, num_sets, torch.Generator().manual_seed(0))
    assert partition.shape == (6, 32, 32) and partition.dtype == torch.long
    assert partition.min() >= 0 and partition.max() < num_sets  # every pixel in exactly one set
    # constant on every c x c cell
    cells = partition.view(6, 32 // cell, cell, 32 // cell, cell)
    assert (cells == cells[:, :, :1, :, :1]).all()
    # each set holds G / n_s cells (floor or ceil when n_s does not divide G)
    grid = cells[:, :, 0, :, 0].reshape(6, -1)
    total = grid.shape[1]
    counts = torch.stack([(grid == s).sum(dim=1) for s in range(num_sets)], dim=1)
    assert (counts >= total // num_sets).all() and (counts <= math.ceil(total / num_sets)).all()
    assert (counts.sum(dim=1) == total).all()


def test_grid_partition_is_random_per_image_and_seeded():
    a = grid_partition(4, 32, 32, 4, 2, torch.Generator().manual_seed(1))
    b = grid_partition(4, 32, 32, 4, 2, torch.Generator().manual_seed(1))
    c = grid_partition(4, 32, 32, 4, 2, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # each image gets its own partition


def test_grid_partition_rejects_a_cell_that_does_not_divide_the_image():
    with pytest.raises(ValueError, match="divide"):
        grid_partition(1, 32, 32, 5, 2)
    with pytest.raises(ValueError, match="num_sets"):
        grid_partition(1, 32, 32, 16, 5)  # only 4 cells


def test_known_masks_are_complementary_to_the_sets():
    partition = grid_partition(3, 16, 16, 2, 3, torch.Generator().manual_seed(0))
    masks = known_masks(partition, 3)
    assert masks.shape == (3, 3, 1, 16, 16)
    assert torch.equal((1 - masks).sum(dim=0), torch.ones(3, 1, 16, 16))  # each pixel unknown in exactly one M_i
    for s in range(3):
        assert torch.equal(masks[s, :, 0] == 0, partition == s)


def test_noised_condition_keeps_known_pixels_and_fills_the_rest_with_noise():
    original, noise = torch.rand(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    condition = noised_condition(original, mask, noise)
    known = mask.expand_as(original).bool()
    assert torch.equal(condition[known], original[known]) and torch.equal(condition[~known], noise[~known])


def test_random_training_masks_come_from_one_set_of_a_grid_partition():
    torch.manual_seed(0)
    masks = random_training_masks(64, 32, 32, (1, 8), 2, torch.device("cpu"))
    assert masks.shape == (64, 1, 32, 32) and set(masks.unique().tolist()) == {0.0, 1.0}
    fraction = 1 - masks.mean(dim=(1, 2, 3))
    assert torch.allclose(fraction, torch.full_like(fraction, 0.5))  # n_s = 2: half of the cells noised
    blocky = [bool((m[0].view(4, 8, 4, 8) == m[0].view(4, 8, 4, 8)[:, :1, :, :1]).all()) for m in masks]
    assert any(blocky) and not all(blocky)  # both cell sizes are drawn


# --- §4.3 test-time condition (Eqs. 13-15) --------------------------------------------------


def test_replace_known_region_is_exactly_q_sample_on_known_pixels():
    diffusion = GaussianDiffusion(1000)
    original, unknown, noise = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8) * 5, torch.randn(2, 3, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    t = torch.tensor([150, 0])
    out = replace_known_region(unknown, original, mask, t, diffusion, noise)
    expected_known = diffusion.q_sample(original, t, noise)
    known = mask.expand_as(original).bool()
    assert torch.allclose(out[known], expected_known[known], atol=1e-6)
    assert torch.equal(out[~known], unknown[~known])
    clean = replace_known_region(unknown, original, mask, torch.tensor([-1, -1]), diffusion, noise)  # t = -1: x_0 itself
    assert torch.allclose(clean[known], original[known])


def _trajectory(test_time_condition, denoiser, clip=False, seed=0):
    diffusion = GaussianDiffusion(1000)
    g = torch.Generator().manual_seed(seed)
    original = torch.rand(64, 3, 16, 16, generator=g) * 2 - 1
    masks = known_masks(grid_partition(64, 16, 16, 2, 2, g), 2)[0]
    fill = torch.randn(original.shape, generator=g)
    trajectory = inpaint(
        denoiser, diffusion, original, masks, fill, (250, 150, 50, 0),
        model_condition=True, test_time_condition=test_time_condition, clip_denoised=clip, generator=g,
    )
    return diffusion, original, masks, fill, trajectory


def _standardised_known(diffusion, original, masks, state, t):
    alpha_bar = diffusion.alpha_bar(torch.tensor([t]), original.shape)
    z = (state - alpha_bar.sqrt() * original) / (1 - alpha_bar).sqrt()
    return z[masks.expand_as(z).bool()]


def test_known_pixels_follow_q_xt_given_x0_at_every_reverse_step():
    def wild(x, t):  # a denoiser far from any real one: the known region must not care
        return 3.0 + x[:, :3] * 2

    diffusion, original, masks, _, trajectory = _trajectory(True, wild)
    for t, state in zip(trajectory.timesteps, trajectory.states):
        z = _standardised_known(diffusion, original, masks, state, t)
        assert z.numel() > 20_000
        assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.03, t
    # without the test-time condition the known region drifts with the denoiser
    diffusion, original, masks, _, trajectory = _trajectory(False, wild)
    z = _standardised_known(diffusion, original, masks, trajectory.states[-1], trajectory.timesteps[-1])
    assert abs(z.mean().item()) > 0.5


def test_inpainting_starts_from_the_noised_condition_and_predicts_x0_by_eq9():
    seen = []

    def zero_eps(x, t):
        seen.append(x.shape[1])
        return torch.zeros_like(x[:, :3])

    diffusion, original, masks, fill, trajectory = _trajectory(True, zero_eps)
    assert seen == [6] * 4  # x_t and I_in as input channels (model condition)
    # the masked region of x_{t_1} is q(x_t | I_in) of pure noise: unit variance, no trace of I_ori
    first = trajectory.states[0]
    unknown = ~masks.expand_as(first).bool()
    assert abs(first[unknown].std().item() - 1) < 0.03
    assert abs(torch.corrcoef(torch.stack([first[unknown], original[unknown]]))[0, 1].item()) < 0.03
    # Eq. 9 with z_θ = 0: x̃_0 = x_t / √ᾱ_t
    for t, state, x0 in zip(trajectory.timesteps, trajectory.states, trajectory.x0_predictions):
        assert torch.allclose(x0, state / diffusion.alpha_bar(torch.tensor([t]), state.shape).sqrt(), atol=1e-5)


def test_clipping_keeps_x0_predictions_in_the_image_range():
    _, _, _, _, trajectory = _trajectory(True, lambda x, t: -3 * x[:, :3], clip=True)
    assert all(x0.abs().max() <= 1 for x0 in trajectory.x0_predictions)


# --- Eq. 10 and the fusion (Eqs. 2, 11, 16-19) ---------------------------------------------


def test_combine_sets_takes_each_pixel_from_the_set_that_inpainted_it():
    partition = grid_partition(2, 8, 8, 2, 2, torch.Generator().manual_seed(0))
    masks = known_masks(partition, 2)  # [2, 2, 1, 8, 8]
    x0 = torch.stack([torch.full((2, 3, 8, 8), 10.0), torch.full((2, 3, 8, 8), 20.0)])  # set 0 -> 10, set 1 -> 20
    out = combine_sets(x0.unsqueeze(0).repeat(4, 1, 1, 1, 1, 1), masks)  # with a leading timestep axis
    assert out.shape == (4, 2, 3, 8, 8)
    expected = torch.where(partition == 0, 10.0, 20.0).unsqueeze(1).expand(2, 3, 8, 8)
    assert torch.equal(out[0], expected) and torch.equal(out[3], expected)


def test_distance_map_is_the_channel_l2_norm_at_every_scale():
    a = torch.zeros(2, 3, 16, 16)
    b = torch.full((2, 3, 16, 16), 0.5)
    for scale in (1, 2, 4, 8, 16):
        d = distance_map(a, b, scale)
        assert d.shape == (2, 16, 16)
        assert torch.allclose(d, torch.full_like(d, 0.5 * math.sqrt(3)))
    # a one-pixel difference is diluted by down-sampling (Eq. 16: D averages before the norm)
    b = torch.zeros(1, 1, 16, 16)
    b[..., 5, 5] = 4.0
    assert distance_map(torch.zeros_like(b), b, 1).max() == 4.0
    diluted = distance_map(torch.zeros_like(b), b, 4)  # the 4x4 block mean is 4 / 16, then bilinear up-sampling
    assert 0.15 < diluted.max() <= 4.0 / 16 + 1e-6 and (diluted > 0).sum() > 16


def test_base_heatmap_eq2_and_its_multiscale_variant():
    features, reconstruction = torch.randn(2, 5, 7, 7), torch.randn(2, 5, 7, 7)
    expected = (features - reconstruction).pow(2).sum(1).sqrt()
    assert torch.allclose(base_heatmap(features, reconstruction), expected)
    multi = base_heatmap(features, reconstruction, (1, 2, 4))
    assert multi.shape == (2, 7, 7) and not torch.allclose(multi, expected)


def test_spatiotemporal_heatmap_averages_over_outputs_and_scales():
    original = torch.zeros(2, 3, 16, 16)
    outputs = [torch.full_like(original, v) for v in (0.1, 0.2, 0.6)]  # e.g. n_t x n_c = 3 inpaintings
    heat = spatiotemporal_heatmap(original, outputs, (1, 2, 4))
    assert heat.shape == (2, 16, 16)
    assert torch.allclose(heat, torch.full_like(heat, 0.3 * math.sqrt(3)), atol=1e-6)


def test_mean_filter_shape_constants_and_smoothing():
    flat = torch.full((2, 20, 20), 3.0)
    assert torch.allclose(mean_filter(flat, 9), flat)  # borders are not darkened
    spike = torch.zeros(1, 21, 21)
    spike[0, 10, 10] = 49.0
    out = mean_filter(spike, 7)
    assert out.shape == (1, 21, 21) and torch.isclose(out[0, 10, 10], torch.tensor(1.0)) and torch.isclose(out.sum(), torch.tensor(49.0))
    assert torch.equal(mean_filter(spike, 1), spike)


def test_fuse_heatmaps_eq19_channel_normalisation():
    base, diff = torch.full((1, 4, 4), 272.0), torch.full((1, 4, 4), 3.0)
    out = fuse_heatmaps(base, diff, 0.9, feature_channels=272, image_channels=3)
    assert torch.allclose(out, torch.full_like(out, 0.1 * 1 + 0.9 * 1))
    assert torch.allclose(fuse_heatmaps(base, diff, 0.0, 272), torch.ones(1, 4, 4))


def test_image_score_is_max_of_average_pooled_map():
    heat = torch.zeros(2, 8, 8)
    heat[0, 0, 0] = 16.0  # a single hot pixel: pooled by 4x4 -> 1
    heat[1, 2:6, 2:6] = 2.0  # a 4x4 hot block -> 2
    assert torch.allclose(image_score(heat, 4), torch.tensor([1.0, 2.0]))


# --- the base model's transformer -------------------------------------------------------------


def test_neighbor_mask_blocks_exactly_the_window_around_each_token():
    mask = neighbor_mask(5, 3)
    assert mask.shape == (25, 25) and mask.dtype == torch.bool
    assert mask[12].view(5, 5)[1:4, 1:4].all() and mask[12].sum() == 9  # centre token: its 3x3 window
    assert mask[0].view(5, 5)[:2, :2].all() and mask[0].sum() == 4  # corner: window clipped
    assert neighbor_mask(5, 0) is None
    assert max_neighbor_size(14) == 13 and max_neighbor_size(8) == 7
    with pytest.raises(ValueError, match="masks every token"):
        neighbor_mask(5, 7)


def test_transformer_shapes_and_category_query():
    torch.manual_seed(0)
    net = FeatureReconstructionTransformer(12, 6, hidden_dim=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=2, ffn_dim=32, neighbor_size=3)
    features = torch.randn(3, 12, 6, 6)
    assert net(features).shape == (3, 12, 6, 6)
    conditioned = FeatureReconstructionTransformer(12, 6, hidden_dim=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32, neighbor_size=3, num_categories=3).eval()
    with pytest.raises(ValueError, match="category"):
        conditioned(features)
    a, b = conditioned(features, torch.tensor([0, 0, 0])), conditioned(features, torch.tensor([1, 1, 1]))
    assert not torch.allclose(a, b)  # the category embedding changes the queries


def test_resize_and_concatenate_modes():
    stage1, stage2, stage3 = torch.randn(2, 3, 16, 16), torch.randn(2, 5, 4, 4), torch.randn(2, 2, 2, 2)
    area = resize_and_concatenate([stage1, stage2, stage3], 4, "area")
    assert area.shape == (2, 10, 4, 4)
    assert torch.allclose(area[:, :3], stage1.view(2, 3, 4, 4, 4, 4).mean(dim=(3, 5)), atol=1e-6)  # 4x4 block means
    assert torch.equal(area[:, 3:8], stage2)  # already at size
    bilinear = resize_and_concatenate([stage1, stage2, stage3], 4, "bilinear")
    assert torch.allclose(bilinear[:, :3, 0, 0], stage1[:, :, 0, 0]) and torch.allclose(bilinear[:, :3, -1, -1], stage1[:, :, -1, -1])  # aligned corners
    assert torch.allclose(area[:, 8:], bilinear[:, 8:])  # enlarging is bilinear in both modes


def test_feature_jitter_noise_scale():
    torch.manual_seed(0)
    features = torch.full((2, 100, 8, 8), 0.5)  # ‖f‖ = 5, so std = scale * 5 / 100
    noise = feature_jitter(features, 20.0, 1.0) - features
    assert abs(noise.std().item() - 1.0) < 0.05
    assert torch.equal(feature_jitter(features, 20.0, 0.0), features)


# --- the config ---------------------------------------------------------------------------


def test_paper_defaults_match_section_5():
    c = DRDCConfig()
    assert (c.image_size, c.backbone, c.backbone_stages, c.feature_size) == (224, "efficientnet_b4", (1, 2, 3, 4), 14)
    assert c.timesteps == (250, 200, 150, 100, 50, 0) and c.grid_sizes == (1, 16, 32) and c.scales == (1, 2, 4, 8)
    assert (c.gamma, c.num_sets, c.mean_filter_size, c.num_timesteps, c.weight_decay) == (0.9, 2, 41, 1000, 1e-4)
    assert c.model_condition and c.test_time_condition and c.fusion is Fusion.SPATIOTEMPORAL and not c.multiscale_base
    assert c.train_start_timestep == c.timesteps[0] == 250  # Eq. 12 states imitate the §5 pass (refinement_state)


def test_inference_only_fields_do_not_change_the_training_fingerprint():
    docs = field_docs(DRDCConfig)
    infer = {"gamma", "timesteps", "grid_sizes", "num_sets", "scales", "mean_filter_size", "test_time_condition", "fusion", "multiscale_base", "score_pool_size"}
    assert all(not docs[name][0] for name in infer)
    assert all(docs[name][0] for name in ("model_condition", "num_categories", "image_size", "crop_size", "epochs", "batch_size", "backbone"))
    base = DRDCConfig()
    changed = dataclasses.replace(base, gamma=0.5, timesteps=(100, 0), grid_sizes=(16,), test_time_condition=False, multiscale_base=True)
    assert training_fields(changed) == training_fields(base)
    assert training_fields(dataclasses.replace(base, model_condition=False)) != training_fields(base)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"gamma": 1.5}, "gamma"),
        ({"timesteps": (100, 200)}, "timesteps"),
        ({"timesteps": (1000, 0)}, "timesteps"),
        ({"grid_sizes": (5,)}, "grid_sizes"),
        ({"num_sets": 300}, "n_s"),
        ({"mean_filter_size": 40}, "mean_filter_size"),
        ({"scales": (0,)}, "scales"),
        ({"neighbor_size": 15}, "neighbor_size"),
        ({"feature_stride": 10}, "feature_stride"),
        ({"crop_size": 300}, "crop_size"),
        ({"train_max_timestep": 1000}, "train_max_timestep"),
        ({"train_start_timestep": 1000}, "train_start_timestep"),
        ({"hidden_dim": 20, "transformer_heads": 8}, "transformer_heads"),
        ({"backbone": "resnet18"}, "backbone"),
        ({"backbone_stages": (1, 6)}, "backbone_stages"),
        ({"backbone_stages": (3, 2)}, "backbone_stages"),
    ],
)
def test_invalid_configs_raise_one_line_errors(overrides, match):
    with pytest.raises(ValueError, match=match) as info:
        DRDCConfig(**overrides)
    assert "\n" not in str(info.value)


def test_presets_resolve_and_lists_become_tuples():
    from orchestrator.config import resolve_method_config

    smoke = resolve_method_config("drdc", "smoke", {"num_categories": 4, "grid_sizes": [1, 4]})
    assert smoke.image_size == 128 and smoke.num_categories == 4 and smoke.grid_sizes == (1, 4)
    assert resolve_method_config("drdc", "paper") == DRDCConfig()


# --- the model ------------------------------------------------------------------------------


def test_training_step_losses_and_gradients():
    model = tiny_model().train()
    losses = model(batch())
    assert set(losses.terms) == {"L_feat", "L_diff"} and torch.isfinite(losses.total)
    assert torch.isclose(losses.total, losses.terms["L_feat"] + losses.terms["L_diff"])
    losses.total.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable)  # DDP without find_unused_parameters
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not model.backbone.training  # frozen BatchNorm statistics
    assert model.unet.net.conv_in.in_channels == 6
    assert model.backbone.calls[-1] == 4  # stages 1-4 only: stride 32 is never computed


def test_feature_loss_is_eq1():
    f, r = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    expected = sum(((f[i] - r[i]) ** 2).sum() / 9 for i in range(2)) / 2
    assert torch.isclose(DRDC.feature_loss(f, r), expected)


def test_without_model_condition_the_unet_sees_only_x_t():
    model = tiny_model(model_condition=False)
    assert model.unet.net.conv_in.in_channels == 3
    assert torch.isfinite(model(batch()).total)
    prediction = model.eval().predict(batch().images, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(prediction.anomaly_map).all()


def test_predict_draws_from_the_generator_and_scores_the_pooled_map():
    model = tiny_model().eval()
    images = batch(3).images
    a = model.predict(images, torch.tensor([0, 1, 2]), torch.Generator().manual_seed(5))
    c = model.predict(images, torch.tensor([0, 1, 2]), torch.Generator().manual_seed(6))
    assert not torch.equal(a.anomaly_map, c.anomaly_map)  # grid partitions and noise come from the generator
    assert torch.all(a.anomaly_map >= 0)
    assert torch.allclose(a.image_score, image_score(a.anomaly_map, 4))


def test_gamma_zero_is_the_upsampled_base_heatmap_over_c_feat():
    model = tiny_model(gamma=0.0, score_pool_size=1).eval()
    images = batch(2).images
    out = model.predict(images, generator=torch.Generator().manual_seed(0))
    features = model.extract_features(images)
    base = base_heatmap(features, model.reconstructor(features))
    expected = torch.nn.functional.interpolate(base.unsqueeze(1), size=(32, 32), mode="bilinear", align_corners=False)[:, 0] / 28
    assert model.feature_channels == 28  # 4 + 6 + 8 + 10
    assert torch.allclose(out.anomaly_map, expected, atol=1e-6)
    assert torch.allclose(out.image_score, expected.flatten(1).amax(1), atol=1e-6)


def test_ablation_switches_change_the_prediction():
    images = batch(2).images
    reference = tiny_model().eval().predict(images, generator=torch.Generator().manual_seed(0)).anomaly_map
    for overrides in ({"test_time_condition": False}, {"fusion": "none"}, {"fusion": "temporal"}, {"fusion": "spatial"}, {"multiscale_base": True}, {"mean_filter_size": 1}):
        other = tiny_model(**overrides).eval().predict(images, generator=torch.Generator().manual_seed(0)).anomaly_map
        assert other.shape == reference.shape and not torch.allclose(other, reference), overrides


def test_category_query_needs_the_category():
    model = tiny_model(category_query=True).eval()
    with pytest.raises(ValueError, match="category"):
        model.predict(batch(2).images)
    assert model.predict(batch(2).images, torch.tensor([0, 2])).anomaly_map.shape == (2, 32, 32)


def test_configure_optimizers_covers_both_networks_only():
    model = tiny_model()
    optimizers = model.configure_optimizers()
    grouped = {id(p) for group in optimizers.optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert grouped == trainable
    assert isinstance(optimizers.optimizer, torch.optim.AdamW) and optimizers.optimizer.defaults["weight_decay"] == 1e-4


def test_fusion_modes_select_timesteps_and_scales():
    """With one scale, fusing scales changes nothing: temporal == spatio-temporal and
    spatial == none; over several timesteps temporal and none differ."""
    images = batch(2).images

    def heat(fusion, scales=(1,)):
        model = tiny_model(fusion=fusion, scales=scales, mean_filter_size=1).eval()
        return model.diffusion_heatmap(images, torch.Generator().manual_seed(0))

    assert torch.allclose(heat("temporal"), heat("spatiotemporal"))
    assert torch.allclose(heat("spatial"), heat("none"))
    assert not torch.allclose(heat("temporal"), heat("none"))
    assert not torch.allclose(heat("spatial", (1, 4)), heat("none", (1, 4)))


def test_inpainting_loss_targets_the_normal_image_through_eq9():
    """Eq. 12 as trained: a network whose ε makes x̃_0 (Eq. 9) equal the normal image
    has zero loss, and on known pixels the target is plain ε."""
    model = tiny_model()
    images = batch(2).images
    known = torch.ones(2, 1, 32, 32)
    known[:, :, :16] = 0
    fill, noise = torch.randn_like(images), torch.randn_like(images)
    condition = noised_condition(images, known, fill)
    t = torch.tensor([5, 250])
    state = refinement_state(model.diffusion, images, condition, t, model.config.train_start_timestep, noise)
    assert torch.allclose(known * state.eps, known * noise, atol=1e-4)
    assert torch.allclose(model.diffusion.predict_x0_from_eps(state.x_t, t, state.eps), images, atol=1e-3)
    model.unet.forward = lambda x, t_: state.eps  # the ideal inpainter
    assert model.inpainting_loss(images, condition, t, noise).item() < 1e-8


def _attention_heads(module: nn.Module) -> list[int]:
    from diffusers.models.attention_processor import Attention

    return [m.heads for m in module.modules() if isinstance(m, Attention)] + [m.num_heads for m in module.modules() if isinstance(m, nn.MultiheadAttention)]


def test_unet_and_transformer_heads_are_set_apart():
    """The UNet's heads come from head_channels (as MDPS and DiffusionAD read theirs); the
    transformer's from transformer_heads: changing one network's leaves the other as is."""
    images, t = torch.randn(1, 6, 32, 32), torch.tensor([100])
    reference = tiny_model(transformer_heads=1)
    for heads in (2, 4):
        other = tiny_model(transformer_heads=heads)
        assert _attention_heads(other.unet) == _attention_heads(reference.unet) == [2]  # 16-wide middle block / 8-wide heads
        assert torch.equal(other.unet(images, t), reference.unet(images, t))
        assert set(_attention_heads(other.reconstructor)) == {heads}
    narrow = tiny_model(transformer_heads=1, head_channels=4)
    assert _attention_heads(narrow.unet) == [4]
    assert _attention_heads(narrow.reconstructor) == _attention_heads(reference.reconstructor)
