"""DiffusionAD (methods/diffusionad.py): config, paper equations, training step, inference."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.anomaly_synthesis import synthesize_nonempty_anomalies
from methods.base import Losses, TrainBatch, field_docs
from methods.diffusionad import (
    DiffusionAD,
    DiffusionADConfig,
    Paradigm,
    mask_loss,
    network_evaluations,
    noise_loss,
    norm_guided_noise,
    norm_guided_x0,
    one_step_x0,
    opacity_from_beta,
    synthesize_batch,
)
from methods.gaussian_diffusion import GaussianDiffusion
from methods.scoring import scaled_top_k, top_k_mean
from methods.segmentation import SegmentationUNet

TINY = dict(DiffusionAD.PRESETS["smoke"], image_size=16, base_channels=8, seg_base_channels=4)


def tiny(**changes) -> DiffusionADConfig:
    return DiffusionADConfig(**{**TINY, **changes})


def make_batch(b: int = 4, size: int = 16, seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    return TrainBatch(
        images=torch.rand(b, 3, size, size, generator=g) * 2 - 1,
        foreground=torch.ones(b, 1, size, size),
        textures=torch.rand(b, 3, size, size, generator=g) * 2 - 1,
        category=torch.zeros(b, dtype=torch.long),
    )


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(1000, "linear")


def _t(value: int, batch: int) -> torch.Tensor:
    return torch.full((batch,), value, dtype=torch.long)


# ---- config --------------------------------------------------------------------------


def test_defaults_are_the_papers() -> None:
    c = DiffusionADConfig()
    assert (c.image_size, c.epochs, c.batch_size, c.num_timesteps, c.tau) == (256, 3000, 16, 1000, 300)
    assert (c.t_s, c.t_b, c.w, c.top_k, c.gamma) == (200, 400, 1.0, 50, 5.0)
    assert (c.learning_rate, c.segmentation_learning_rate, c.base_channels, c.attention_resolutions) == (1e-4, 1e-5, 128, (32, 16, 8))
    assert c.paradigm is Paradigm.NORM_GUIDED and c.train_paradigm is Paradigm.NORM_GUIDED
    assert c.beta_range == (0.2, 0.8) and c.anomaly_fraction == 0.5
    assert DiffusionAD.PRESETS["paper"] == {}


def test_inference_fields_are_exactly_the_inference_axes() -> None:
    docs = field_docs(DiffusionADConfig)
    inference = {name for name, (affects_training, _) in docs.items() if not affects_training}
    assert inference == {"paradigm", "t_s", "t_b", "w", "t_single", "paradigm_steps", "top_k", "top_k_reference_size"}
    assert all(doc for _, doc in docs.values())
    for required in ("image_size", "crop_size", "epochs", "batch_size", "tau", "train_paradigm", "train_w"):
        assert docs[required][0], required


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"t_s": 400, "t_b": 400}, "t_s"),
        ({"t_b": 1000}, "t_b"),
        ({"tau": 0}, "tau"),
        ({"paradigm": "ddim", "paradigm_steps": 402}, "paradigm_steps"),
        ({"train_paradigm": "iterative", "train_paradigm_steps": 0}, "train_paradigm_steps"),
        ({"paradigm": "two_step"}, "paradigm"),
        ({"beta_range": (0.8, 0.2)}, "beta_range"),
        ({"image_size": 20}, "divisible"),
        ({"w": -1.0}, "w"),
        ({"norm_groups": 7}, "norm_groups"),
        ({"crop_size": 32}, "crop_size"),
        ({"top_k": 0}, "top_k"),
    ],
)
def test_invalid_configs_raise_naming_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny(**changes)


def test_paradigm_steps_are_only_checked_for_the_paradigms_that_use_them() -> None:
    assert tiny(paradigm="one_step", paradigm_steps=10_000).paradigm is Paradigm.ONE_STEP
    assert tiny(paradigm="ddim", channel_mult=[1, 2, 2, 2], beta_range=[0.3, 0.4]).beta_range == (0.3, 0.4)


def test_orchestrator_resolves_presets_and_overrides() -> None:
    from orchestrator.config import resolve_method_config
    from orchestrator.errors import ConfigError

    c = resolve_method_config("diffusionad", "smoke", {"paradigm": "ddim", "paradigm_steps": 5, "t_s": 100})
    assert isinstance(c, DiffusionADConfig)
    assert c.image_size == 64 and c.paradigm is Paradigm.DDIM and c.t_s == 100
    assert resolve_method_config("diffusionad", "paper") == DiffusionADConfig()
    with pytest.raises(ConfigError, match="t_s"):
        resolve_method_config("diffusionad", "smoke", {"t_s": 500, "t_b": 300})


# ---- equations -----------------------------------------------------------------------


def test_one_step_x0_recovers_x0_and_clips(diffusion: GaussianDiffusion) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 1.6 - 0.8
    eps = torch.randn(x0.shape, generator=g)
    t = _t(200, 2)
    x_t = diffusion.q_sample(x0, t, eps)
    torch.testing.assert_close(one_step_x0(diffusion, x_t, t, eps), x0, atol=1e-5, rtol=0)
    wild = one_step_x0(diffusion, x_t, t, -10 * eps)
    assert wild.min() >= -1 and wild.max() <= 1


def test_norm_guidance_eq7_eq8_closed_form(diffusion: GaussianDiffusion) -> None:
    """Eqs. 6-8 reduce to x̂_0g = x̂_0s + w (1 - ᾱ_ts) (x̂_0b - x̂_0s) (no clipping active)."""
    g = torch.Generator().manual_seed(1)
    b = 3
    t_s, t_b = _t(200, b), _t(400, b)
    eps_s, eps_b = torch.randn(b, 3, 8, 8, generator=g), torch.randn(b, 3, 8, 8, generator=g)
    x_ts = diffusion.q_sample(torch.rand(b, 3, 8, 8, generator=g) - 0.5, t_s, eps_s)
    x_tb = diffusion.q_sample(torch.rand(b, 3, 8, 8, generator=g) - 0.5, t_b, eps_b)
    x0_s = diffusion.predict_x0_from_eps(x_ts, t_s, eps_s)
    x0_b = diffusion.predict_x0_from_eps(x_tb, t_b, eps_b)
    assert x0_s.abs().max() < 0.51 and x0_b.abs().max() < 0.51  # no clipping below
    one_minus = 1 - diffusion.alphas_cumprod[200]
    for w in (0.0, 1.0, 2.5):
        got = norm_guided_x0(diffusion, x_ts, t_s, eps_s, x_tb, t_b, eps_b, w)
        expected = (x0_s + w * one_minus * (x0_b - x0_s)).clamp(-1, 1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # w = 0 is one-step denoising from t_s (Eq. 6).
    torch.testing.assert_close(norm_guided_x0(diffusion, x_ts, t_s, eps_s, x_tb, t_b, eps_b, 0.0), x0_s.clamp(-1, 1))


def test_eq7_guide_equal_to_own_reconstruction_changes_nothing(diffusion: GaussianDiffusion) -> None:
    """n = x̂_0s makes n_ts = x_ts (re-noised with the predicted ε), so Eq. 7 is ε_θ(x_ts)."""
    g = torch.Generator().manual_seed(2)
    t_s = _t(150, 2)
    x_ts = torch.randn(2, 3, 4, 4, generator=g) * 0.1
    eps = torch.randn(2, 3, 4, 4, generator=g) * 0.05
    guide = diffusion.predict_x0_from_eps(x_ts, t_s, eps)
    torch.testing.assert_close(norm_guided_noise(diffusion, x_ts, t_s, eps, guide, 3.0), eps, atol=1e-5, rtol=0)
    # A guide brighter than the reconstruction lowers the predicted noise (pushes x̂_0 up).
    assert (norm_guided_noise(diffusion, x_ts, t_s, eps, guide + 0.5, 1.0) < eps).all()


def test_noise_loss_eq9_uses_normal_samples_only() -> None:
    g = torch.Generator().manual_seed(3)
    eps_s, hat_s, eps_b, hat_b = (torch.randn(4, 3, 4, 4, generator=g) for _ in range(4))
    normal = torch.tensor([1.0, 1.0, 0.0, 0.0])
    loss = noise_loss(eps_s, hat_s, eps_b, hat_b, normal)
    expected = sum(((hat_s[i] - eps_s[i]) ** 2).mean() + ((hat_b[i] - eps_b[i]) ** 2).mean() for i in (0, 1)) / 4
    torch.testing.assert_close(loss, expected)
    hat_s2 = hat_s.clone()
    hat_s2[2:] += 100  # anomalous samples do not count
    torch.testing.assert_close(noise_loss(eps_s, hat_s2, eps_b, hat_b, normal), loss)
    none = noise_loss(eps_s, hat_s.requires_grad_(), eps_b, hat_b, torch.zeros(4))
    assert none.item() == 0.0 and none.requires_grad


def test_mask_loss_eq10_matches_official_focal_formula() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 1, 8, 8, generator=g) * 3
    masks = (torch.rand(2, 1, 8, 8, generator=g) > 0.7).float()
    out = mask_loss(logits, masks, gamma=5.0, focal_alpha=0.5, focal_gamma=4.0)
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy(p, masks, reduction="none")
    focal = (0.5 * (1 - torch.exp(-bce)) ** 4 * bce).mean()  # the official BinaryFocalLoss
    smooth = F.smooth_l1_loss(p, masks)
    torch.testing.assert_close(out.focal, focal, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(out.smooth_l1, smooth)
    torch.testing.assert_close(out.total, smooth + 5.0 * focal, atol=1e-6, rtol=1e-4)


def test_opacity_is_one_minus_beta() -> None:
    assert opacity_from_beta((0.2, 0.8)) == pytest.approx((0.2, 0.8))
    assert opacity_from_beta((0.1, 0.3)) == pytest.approx((0.7, 0.9))


def test_synthesis_eq12_half_batch_and_beta_direction() -> None:
    batch = make_batch(8, 32)
    torch.manual_seed(0)
    out = synthesize_batch(batch, anomaly_fraction=0.5, beta_range=(0.0, 0.0), texture_probability=1.0)
    assert torch.equal(out.images[:4], batch.images[:4]) and out.masks[:4].sum() == 0
    assert out.normal[:4].tolist() == [1.0] * 4
    assert out.normal[4:].tolist() == [0.0] * 4  # non-empty masks after resampling
    outside = out.masks[4:] == 0
    assert torch.equal(out.images[4:].masked_select(outside.expand(-1, 3, -1, -1)), batch.images[4:].masked_select(outside.expand(-1, 3, -1, -1)))
    inside = (out.masks[4:] > 0).expand(-1, 3, -1, -1)
    assert (out.images[4:] - batch.images[4:]).abs().masked_select(inside).mean() > 0.1  # β = 0: pure appearance
    # β = 1: Eq. 12 keeps the normal image inside M, so nothing changes.
    torch.manual_seed(0)
    kept = synthesize_batch(batch, anomaly_fraction=0.5, beta_range=(1.0, 1.0), texture_probability=1.0)
    torch.testing.assert_close(kept.images, batch.images)
    assert kept.masks[4:].sum() > 0


def test_synthesis_respects_foreground() -> None:
    batch = make_batch(4, 32)
    batch.foreground[:, :, :, 16:] = 0
    torch.manual_seed(1)
    out = synthesize_batch(batch, 1.0, (0.2, 0.8), 0.5)
    assert out.masks[..., 16:].sum() == 0 and out.masks.sum() > 0


def test_nonempty_synthesis_redraws_only_the_empty_masks() -> None:
    """The shared redraw loop (also what DiffusionAD's synthesize_batch runs): a sample
    keeps its first non-empty draw; one that never gets a mask keeps its image."""
    batch = make_batch(6, 32)
    batch.foreground.zero_()
    batch.foreground[:3, :, 8:24, 8:24] = 1  # samples 3-5 have no foreground at all
    out = synthesize_nonempty_anomalies(batch.images, batch.textures, batch.foreground, torch.Generator().manual_seed(0), max_rounds=4)
    assert out.found.tolist() == [True] * 3 + [False] * 3
    assert (out.masks[:3].flatten(1).sum(1) > 0).all() and out.masks[3:].sum() == 0
    assert torch.equal(out.images[3:], batch.images[3:])
    # Widening to the whole image after a round lets every sample succeed; a texture pool
    # is drawn from per round.
    pool = torch.rand(2, 3, 32, 32) * 2 - 1
    widened = synthesize_nonempty_anomalies(
        batch.images, pool, batch.foreground, torch.Generator().manual_seed(0), min_pixels=5, max_rounds=50, texture_pool=True, widen_after=1
    )
    assert widened.found.all() and (widened.masks.flatten(1).sum(1) >= 5).all()


def test_top_k_scaling_and_score() -> None:
    assert scaled_top_k(50, 256, 256, 256) == 50
    assert scaled_top_k(50, 256, 64, 64) == 3
    assert scaled_top_k(50, 256, 16, 16) == 1
    assert scaled_top_k(50, None, 64, 64) == 50
    assert scaled_top_k(10_000, None, 8, 8) == 64
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, :3] = torch.tensor([0.9, 0.6, 0.3])
    maps[1, 1, 1] = 0.5
    torch.testing.assert_close(top_k_mean(maps, 2), torch.tensor([0.75, 0.25]))


def test_network_evaluations() -> None:
    assert network_evaluations("one_step", 30) == 1
    assert network_evaluations(Paradigm.NORM_GUIDED, 30) == 2
    assert network_evaluations("ddim", 30) == 30
    assert network_evaluations("iterative", 401) == 401


# ---- networks and the method -------------------------------------------------------


def test_segmentation_unet_shapes() -> None:
    net = SegmentationUNet(6, 1, base_channels=4, channel_mult=(1, 2, 4))
    assert net(torch.randn(2, 6, 16, 16)).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 6, 10, 10))


@pytest.mark.parametrize(
    "train_paradigm, steps",
    [("norm_guided", 1), ("one_step", 1), ("ddim", 3), ("iterative", 3)],
)
def test_training_step_reaches_every_parameter(train_paradigm: str, steps: int) -> None:
    """Every parameter gets a gradient (DDP needs no find_unused_parameters), and the
    segmentation loss alone reaches the UNet: with an all-synthetic batch L_noise is 0."""
    torch.manual_seed(0)
    model = DiffusionAD(tiny(train_paradigm=train_paradigm, train_paradigm_steps=steps, train_t_single=10, anomaly_fraction=1.0))
    losses = model(make_batch())
    assert isinstance(losses, Losses)
    assert set(losses.terms) == {"L_noise", "L_mask", "L_smooth_l1", "L_focal"}
    assert losses.terms["L_noise"].item() == 0.0
    torch.testing.assert_close(losses.total, losses.terms["L_mask"])
    losses.total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert sum(p.grad.abs().sum() for p in model.unet.parameters()) > 0


def test_training_step_noise_loss_and_optimizer_groups() -> None:
    torch.manual_seed(0)
    model = DiffusionAD(tiny())
    losses = model(make_batch(4))
    assert losses.terms["L_noise"].item() > 0.1  # untrained ε̂ vs ε ~ N(0, I)
    torch.testing.assert_close(losses.total, losses.terms["L_noise"] + losses.terms["L_mask"])
    optimizers = model.configure_optimizers()
    assert [g["lr"] for g in optimizers.optimizer.param_groups] == [model.config.learning_rate, model.config.segmentation_learning_rate]
    assert optimizers.scheduler is None
    n_params = sum(p.numel() for g in optimizers.optimizer.param_groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters())


def test_predict_map_is_a_probability_and_the_score_its_top_k_mean() -> None:
    torch.manual_seed(0)
    model = DiffusionAD(tiny())
    images = make_batch(3).images
    a = model.predict(images, generator=torch.Generator().manual_seed(7))
    c = model.predict(images, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a.anomaly_map, c.anomaly_map)  # the generator drives the noise
    assert (a.anomaly_map >= 0).all() and (a.anomaly_map <= 1).all()
    k = scaled_top_k(50, 256, 16, 16)
    torch.testing.assert_close(a.image_score, top_k_mean(a.anomaly_map, k))


class _Oracle(nn.Module):
    """ε-"network" that knows the clean image: ε = (x_t - √ᾱ_t x_ref) / √(1-ᾱ_t)."""

    def __init__(self, diffusion: GaussianDiffusion, x_ref: torch.Tensor):
        super().__init__()
        self.diffusion, self.x_ref, self.images_seen = diffusion, x_ref, 0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.images_seen += x_t.shape[0]
        ref = self.x_ref.repeat(x_t.shape[0] // self.x_ref.shape[0], 1, 1, 1)
        return self.diffusion.predict_eps_from_x0(x_t, t, ref)


@pytest.mark.parametrize(
    "paradigm, steps, evaluations",
    [("one_step", 1, 1), ("norm_guided", 1, 2), ("ddim", 5, 5), ("iterative", 5, 5), ("iterative", 41, 41)],
)
def test_every_paradigm_reconstructs_what_the_denoiser_knows(paradigm: str, steps: int, evaluations: int) -> None:
    """With an oracle denoiser every paradigm returns the oracle's clean image (so the
    timesteps fed to the network and to Eqs. 3/6-8 agree), using the stated number of
    network evaluations per image."""
    model = DiffusionAD(tiny(paradigm=paradigm, paradigm_steps=steps, t_single=40))
    images = make_batch(2).images
    x_ref = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 1.6 - 0.8
    oracle = _Oracle(model.diffusion, x_ref)
    model.unet = oracle
    out = model.reconstruct(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x_ref, atol=2e-4, rtol=0)
    assert oracle.images_seen == evaluations * 2
    assert network_evaluations(paradigm, steps) == evaluations


def test_reconfigure_inference() -> None:
    model = DiffusionAD(tiny())
    model.reconfigure_inference(paradigm="ddim", paradigm_steps=4, w=2.0)
    assert model.config.paradigm is Paradigm.DDIM and model.config.w == 2.0
    with pytest.raises(ValueError, match="affect training"):
        model.reconfigure_inference(tau=100)
    with pytest.raises(ValueError, match="t_s"):
        model.reconfigure_inference(t_s=500)


def test_ancestral_noise_comes_from_the_generator() -> None:
    """Iterative (Eq. 3) draws fresh noise every step, all from the given generator: the
    same seed reproduces it, another seed changes it, for a denoiser that is not exact."""
    model = DiffusionAD(tiny(paradigm="iterative", paradigm_steps=6, t_single=20))
    model.unet = _Scaled(model.diffusion, torch.zeros(2, 3, 16, 16))
    images = make_batch(2).images
    first = model.reconstruct(images, torch.Generator().manual_seed(3))
    assert torch.equal(first, model.reconstruct(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, model.reconstruct(images, torch.Generator().manual_seed(4)))


class _Scaled(_Oracle):
    """A deliberately wrong denoiser (half the oracle's ε)."""

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * super().forward(x_t, t)


# ---- search spaces -------------------------------------------------------------------

SPACES = ("diffusionad_noise_scales", "diffusionad_guidance", "diffusionad_paradigm", "diffusionad_train_paradigm", "diffusionad_topk")


@pytest.mark.parametrize("name", SPACES)
def test_search_spaces_load_and_resolve(name: str) -> None:
    from orchestrator import search_space
    from orchestrator.config import resolve_method_config
    from orchestrator.errors import ConfigError

    space = search_space.load(name)
    assert space.method == "diffusionad" and space.metric.startswith("val_")
    valid, invalid = [], []
    for point in space.grid_points():
        if any(a.kind not in ("grid", "choice") for a in space.axes):
            point = {a.name: a.values[0] for a in space.axes}
        try:
            valid.append(resolve_method_config("diffusionad", space.scale, space.fixed, point))
        except ConfigError:
            invalid.append(point)
    assert valid
    if name == "diffusionad_noise_scales":
        assert invalid == [{"t_s": 300, "t_b": 300}] and len(valid) == 11
    else:
        assert not invalid


def test_inference_only_spaces_share_one_trained_model() -> None:
    """The orchestrator trains once per distinct set of training fields: the noise-scale,
    guidance and top-k sweeps need one model, Table VII needs two (norm-guided, one-step)."""
    from methods.base import config_fingerprint, training_fields
    from orchestrator import search_space
    from orchestrator.config import resolve_method_config

    def models(name: str) -> int:
        space = search_space.load(name)
        points = space.grid_points() if space.search == "grid" else [{a.name: v} for a in space.axes for v in a.values]
        prints = set()
        for point in points:
            try:
                config = resolve_method_config("diffusionad", space.scale, space.fixed, point)
            except Exception:
                continue
            prints.add(config_fingerprint(training_fields(config)))
        return len(prints)

    assert models("diffusionad_noise_scales") == 1
    assert models("diffusionad_guidance") == 1
    assert models("diffusionad_topk") == 1
    assert models("diffusionad_paradigm") == 2
    assert models("diffusionad_train_paradigm") == 2  # trained one-step, trained DDIM-30


def test_paper_numbers_of_tables_vii_and_viii() -> None:
    """The paper blocks hold Table VII / VIII (VisA) as printed; rows shared by the two
    tables agree, and every Table VII row of the space has its FPS."""
    from orchestrator import search_space

    vii = search_space.load("diffusionad_paradigm")
    viii = search_space.load("diffusionad_train_paradigm")
    table_vii = {  # I, P, O, A, F
        "Norm-guided": (98.8, 98.9, 96.0, 45.8, 23.5),
        "One-step": (98.0, 98.6, 94.7, 44.2, 26.7),
        "DDIM-30": (96.6, 98.2, 91.9, 41.4, 0.92),
        "Iterative-400": (96.8, 98.5, 92.5, 42.5, 0.09),
    }
    assert set(vii.condition_names()) == set(table_vii)
    for row, values in table_vii.items():
        got = vii.paper["rows"][row]["visa"]
        assert (got["det"], got["pixel_auroc"], got["loc"], got["pixel_ap"], got["fps"]) == values, row
    table_viii = {
        "One-step / One-step": (98.0, 98.6),
        "One-step / Iterative-400": (96.8, 98.5),
        "One-step / DDIM-30": (96.6, 98.2),
        "Iterative-400 / Iterative-400": (98.3, 98.8),
        "DDIM-30 / DDIM-30": (98.2, 98.6),
    }
    for row, values in table_viii.items():
        got = viii.paper["rows"][row]["visa"]
        assert (got["det"], got["pixel_auroc"]) == values, row
    for vii_row, viii_row in (("One-step", "One-step / One-step"), ("Iterative-400", "One-step / Iterative-400"), ("DDIM-30", "One-step / DDIM-30")):
        assert table_vii[vii_row][:2] == table_viii[viii_row]
    assert set(viii.condition_names()) <= set(table_viii)
