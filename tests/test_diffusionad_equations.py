"""DiffusionAD's equations pinned to hand-computed values on tiny tensors (Eqs. 1, 6-12,
§IV-C scoring, §V-A training recipe). ᾱ_t is recomputed here from the linear schedule
with plain Python, so every expected number is independent of methods/; a changed sign,
constant, reduction, timestep range or top-k fails a test (mutations/diffusionad.yaml)."""

from __future__ import annotations

import math

import pytest
import torch

import methods.diffusionad as diffusionad
from methods.base import TrainBatch
from methods.diffusionad import (
    DiffusionAD,
    DiffusionADConfig,
    SegmentationSchedule,
    SyntheticBatch,
    mask_loss,
    noise_loss,
    norm_guided_noise,
    norm_guided_x0,
    one_step_x0,
    opacity_from_beta,
)
from methods.gaussian_diffusion import GaussianDiffusion
from methods.unet import UNet

TINY = dict(DiffusionAD.PRESETS["smoke"], image_size=16, base_channels=8, seg_base_channels=4)


def tiny(**changes) -> DiffusionADConfig:
    return DiffusionADConfig(**{**TINY, **changes})


def hand_alpha_bar(t: int, T: int = 1000) -> float:
    """ᾱ_t = Π_{s<=t} (1 - β_s), β linear from 1e-4 to 0.02 over T steps (0-based t)."""
    out = 1.0
    for s in range(t + 1):
        out *= 1 - (1e-4 + (0.02 - 1e-4) * s / (T - 1))
    return out


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(1000, "linear")


def scalar(value: float) -> torch.Tensor:
    return torch.tensor([value]).reshape(1, 1, 1, 1)


def ts(value: int) -> torch.Tensor:
    return torch.tensor([value])


# ---- the paper's settings (§IV-B, §IV-C, §V-A) -----------------------------------------


def test_paper_constants():
    c = DiffusionADConfig()
    assert (c.num_timesteps, c.tau, c.t_s, c.t_b, c.w) == (1000, 300, 200, 400, 1.0)
    assert (c.gamma, c.focal_alpha, c.focal_gamma) == (5.0, 0.5, 4.0)  # Eq. 10 γ; official focal
    assert (c.top_k, c.top_k_reference_size, c.num_heads) == (50, 256, 4)
    assert (c.learning_rate, c.segmentation_learning_rate) == (1e-4, 1e-5)
    assert (c.segmentation_schedule, c.segmentation_cosine_steps) == (SegmentationSchedule.COSINE, 10)


# ---- Eq. 1 and Eq. 6 ---------------------------------------------------------------------


def test_eq1_forward_process_by_hand(diffusion):
    a = hand_alpha_bar(200)
    x_t = diffusion.q_sample(scalar(0.5), ts(200), scalar(-1.2))
    assert x_t.item() == pytest.approx(math.sqrt(a) * 0.5 + math.sqrt(1 - a) * -1.2, rel=1e-5)


def test_eq6_one_step_by_hand_and_clipped(diffusion):
    a = hand_alpha_bar(400)
    x_t, eps = 0.3, 0.4
    expected = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    assert one_step_x0(diffusion, scalar(x_t), ts(400), scalar(eps)).item() == pytest.approx(expected, rel=1e-4)
    assert abs(expected) < 1
    # far outside [-1, 1] before clipping
    assert one_step_x0(diffusion, scalar(0.9), ts(400), scalar(-1.0)).item() == 1.0
    assert one_step_x0(diffusion, scalar(-0.9), ts(400), scalar(1.0)).item() == -1.0


# ---- Eqs. 7-8: norm guidance -------------------------------------------------------------


def test_eq7_guided_noise_by_hand(diffusion):
    a = hand_alpha_bar(200)
    x_ts, eps_hat_s, guide, w = 0.3, 0.5, -0.2, 1.5
    n_ts = math.sqrt(a) * guide + math.sqrt(1 - a) * eps_hat_s  # re-noised with the predicted ε
    expected = eps_hat_s - math.sqrt(1 - a) * w * (n_ts - x_ts)
    got = norm_guided_noise(diffusion, scalar(x_ts), ts(200), scalar(eps_hat_s), scalar(guide), w)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_eq8_guided_reconstruction_by_hand(diffusion):
    a_s, a_b = hand_alpha_bar(200), hand_alpha_bar(400)
    x_ts, eps_hat_s, x_tb, eps_hat_b, w = 0.3, 0.2, 0.1, -0.3, 1.0
    guide = (x_tb - math.sqrt(1 - a_b) * eps_hat_b) / math.sqrt(a_b)  # Eq. 6 at t_b
    n_ts = math.sqrt(a_s) * guide + math.sqrt(1 - a_s) * eps_hat_s
    eps_guided = eps_hat_s - math.sqrt(1 - a_s) * w * (n_ts - x_ts)
    expected = (x_ts - math.sqrt(1 - a_s) * eps_guided) / math.sqrt(a_s)  # Eq. 6 at t_s
    assert abs(guide) < 1 and abs(expected) < 1
    got = norm_guided_x0(diffusion, scalar(x_ts), ts(200), scalar(eps_hat_s), scalar(x_tb), ts(400), scalar(eps_hat_b), w)
    assert got.item() == pytest.approx(expected, rel=1e-4)


# ---- Eqs. 9-11: losses -------------------------------------------------------------------


def test_eq9_noise_loss_by_hand():
    # Per sample: mean (ε̂_s - ε_s)² + mean (ε̂_b - ε_b)²; averaged over normal samples, / 2.
    eps_s = torch.zeros(3, 1, 1, 2)
    eps_hat_s = torch.tensor([[1.0, 3.0], [10.0, 10.0], [2.0, 0.0]]).reshape(3, 1, 1, 2)
    eps_b = torch.ones(3, 1, 1, 2)
    eps_hat_b = torch.tensor([[1.0, 2.0], [5.0, 5.0], [0.0, 1.0]]).reshape(3, 1, 1, 2)
    normal = torch.tensor([1.0, 0.0, 1.0])
    sample0 = (1 + 9) / 2 + (0 + 1) / 2  # 5.5
    sample2 = (4 + 0) / 2 + (1 + 0) / 2  # 2.5
    assert noise_loss(eps_s, eps_hat_s, eps_b, eps_hat_b, normal).item() == pytest.approx((sample0 + sample2) / 2 / 2)


def hand_mask_loss(logits: list[float], mask: list[float], gamma: float = 5.0, alpha: float = 0.5, focal_gamma: float = 4.0) -> float:
    """SmoothL1(σ(l), M) + γ · mean(α (1 - p_t)^4 CE) (Eq. 10; official BinaryFocalLoss α 0.5, γ 4)."""
    focal, smooth = 0.0, 0.0
    for l, m in zip(logits, mask):
        p = 1 / (1 + math.exp(-l))
        ce = -(m * math.log(p) + (1 - m) * math.log(1 - p))
        p_t = p if m else 1 - p
        focal += alpha * (1 - p_t) ** focal_gamma * ce
        d = abs(p - m)
        smooth += 0.5 * d * d if d < 1 else d - 0.5
    return smooth / len(logits) + gamma * focal / len(logits)


def test_eq10_mask_loss_by_hand():
    logits, mask = [0.5, -2.0, 1.5, -0.5], [1.0, 0.0, 0.0, 1.0]
    c = DiffusionADConfig()
    out = mask_loss(torch.tensor(logits).reshape(1, 1, 2, 2), torch.tensor(mask).reshape(1, 1, 2, 2), c.gamma, c.focal_alpha, c.focal_gamma)
    assert out.total.item() == pytest.approx(hand_mask_loss(logits, mask), rel=1e-5)
    assert out.total.item() == pytest.approx(out.smooth_l1.item() + 5 * out.focal.item(), rel=1e-6)


def test_eq11_training_total_is_noise_plus_mask_loss():
    model = DiffusionAD(tiny())
    g = torch.Generator().manual_seed(0)
    batch = TrainBatch(torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, torch.ones(4, 1, 16, 16), torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, torch.zeros(4, dtype=torch.long))
    torch.manual_seed(0)
    losses = model(batch)
    t = losses.terms
    assert losses.total.item() == pytest.approx(t["L_noise"].item() + t["L_mask"].item(), rel=1e-6)
    assert t["L_mask"].item() == pytest.approx(t["L_smooth_l1"].item() + 5 * t["L_focal"].item(), rel=1e-6)


class _Stop(Exception):
    pass


def test_training_draws_t_s_from_0_to_tau_and_t_b_from_tau_to_T(monkeypatch):
    """§IV-B: t_s ∈ S = [0, τ), t_b ∈ B = [τ, T) (official code: randint(0, 300), randint(300, 1000))."""
    model = DiffusionAD(tiny())
    seen = {}

    def capture(x0, t_s, t_b, w, noise):
        seen.update(t_s=t_s, t_b=t_b)
        raise _Stop

    def no_synthesis(batch, *args):
        return SyntheticBatch(batch.images, torch.zeros_like(batch.images[:, :1]), torch.ones(batch.images.shape[0]))

    monkeypatch.setattr(model, "reconstruct_norm_guided", capture)
    monkeypatch.setattr(diffusionad, "synthesize_batch", no_synthesis)
    b = 20000
    batch = TrainBatch(torch.zeros(1, 3, 2, 2).expand(b, -1, -1, -1), torch.ones(1, 1, 2, 2).expand(b, -1, -1, -1), torch.zeros(1, 3, 2, 2).expand(b, -1, -1, -1), torch.zeros(b, dtype=torch.long))
    torch.manual_seed(0)
    with pytest.raises(_Stop):
        model(batch)
    assert (seen["t_s"].min().item(), seen["t_s"].max().item()) == (0, 299)
    assert (seen["t_b"].min().item(), seen["t_b"].max().item()) == (300, 999)


# ---- Eq. 12: synthesis opacity -----------------------------------------------------------


def test_eq12_beta_weights_the_normal_image():
    # β ~ U[0.1, 0.3) weights the normal image, so the anomaly's opacity is 1 - β ∈ (0.7, 0.9].
    assert opacity_from_beta((0.1, 0.3)) == pytest.approx((0.7, 0.9))


# ---- §IV-C: anomaly map and image score --------------------------------------------------


def test_map_is_the_sigmoid_of_the_segmentation_and_the_score_its_top_k_mean(monkeypatch):
    model = DiffusionAD(DiffusionADConfig(**{**DiffusionAD.PRESETS["smoke"], "base_channels": 8, "seg_base_channels": 4}))
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    logits = torch.full((1, 1, 64, 64), -20.0)
    for (i, j), value in zip([(0, 0), (5, 7), (30, 2), (63, 63), (10, 10)], [3.0, 2.0, 1.0, 0.5, -0.5]):
        logits[0, 0, i, j] = value
    seen = {}

    class Segmentation(torch.nn.Module):
        def forward(self, x):
            seen["input"] = x
            return logits

    monkeypatch.setattr(model, "reconstruct", lambda x, generator: -x)
    model.segmentation = Segmentation()
    pred = model.infer(images, None, torch.Generator().manual_seed(0))
    assert torch.equal(seen["input"], torch.cat((images, -images), dim=1))  # [x_0, x̂_0]
    assert pred.anomaly_map[0, 5, 7].item() == pytest.approx(1 / (1 + math.exp(-2.0)))
    # top 50 at 256² -> round(50 · 64² / 256²) = 3 pixels at 64²: σ(3), σ(2), σ(1)
    expected = sum(1 / (1 + math.exp(-v)) for v in (3.0, 2.0, 1.0)) / 3
    assert pred.image_score.item() == pytest.approx(expected, rel=1e-6)


# ---- §V-A architecture, official optimiser ----------------------------------------------


def _attention_heads(unet: UNet) -> list[tuple[int, int]]:
    from diffusers.models.attention_processor import Attention

    return [(m.inner_dim, m.heads) for m in unet.modules() if isinstance(m, Attention)]


def test_paper_unet_has_4_heads_at_every_attention_width():
    with torch.device("meta"):
        unet = UNet.from_config(DiffusionADConfig(), in_channels=3, out_channels=3)
    heads = _attention_heads(unet)
    assert {width for width, _ in heads} == {256, 512}  # 32 px and 16/8 px levels + middle
    assert all(h == 4 for _, h in heads)


def test_num_heads_changes_the_attention_split():
    torch.manual_seed(0)
    unet = UNet(3, 3, 16, base_channels=8, channel_mult=(1, 2), attention_resolutions=(8,), head_channels=4, norm_groups=4, num_heads=2)
    assert all(h == 2 for _, h in _attention_heads(unet))
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
    two = unet(x, t)
    from diffusers.models.attention_processor import Attention

    for m in unet.modules():
        if isinstance(m, Attention):
            m.heads = 1
    assert not torch.allclose(two, unet(x, t))


def test_segmentation_lr_follows_the_official_cosine():
    model = DiffusionAD(tiny(segmentation_schedule=SegmentationSchedule.COSINE, learning_rate=1e-4, segmentation_learning_rate=1e-5))
    opt = model.configure_optimizers()
    assert opt.scheduler_per_batch
    unet_lr, seg_lr = [], []
    for _ in range(25):
        unet_lr.append(opt.optimizer.param_groups[0]["lr"])
        seg_lr.append(opt.optimizer.param_groups[1]["lr"])
        opt.optimizer.step()
        opt.scheduler.step()
    assert unet_lr == pytest.approx([1e-4] * 25)
    # CosineAnnealingLR(T_max = 10, η_min = 0): 1e-5 (1 + cos(π s / 10)) / 2, period 20 steps
    assert seg_lr == pytest.approx([1e-5 * (1 + math.cos(math.pi * s / 10)) / 2 for s in range(25)], abs=1e-12)
    assert seg_lr[10] == pytest.approx(0.0, abs=1e-15) and seg_lr[20] == pytest.approx(1e-5)
    constant = DiffusionAD(tiny(segmentation_schedule=SegmentationSchedule.CONSTANT)).configure_optimizers()
    assert constant.scheduler is None


def test_respaced_ancestral_step_is_the_ddpm_posterior_of_the_respaced_chain():
    """Iterative paradigm with fewer steps than timesteps (t = 40, 20, 0): each step draws
    x_{t'} ~ q(x_{t'} | x_t, x̂_0) of the chain respaced to ᾱ_40, ᾱ_20 (DDPM Eqs. 6-7 with
    β' = 1 - ᾱ_t/ᾱ_{t'}), i.e. fresh noise of variance β'(1-ᾱ_{t'})/(1-ᾱ_t): DDIM η = 1, not η = 0."""
    model = DiffusionAD(tiny(paradigm="iterative", paradigm_steps=3, t_single=40))
    g = torch.Generator().manual_seed(0)
    images, x_ref = (torch.rand(2, 3, 16, 16, generator=g) * 1.6 - 0.8 for _ in range(2))
    draws = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(3)]
    seen = []

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # predicts x̂_0 = x_ref
        seen.append((x_t.clone(), t.clone()))
        a = torch.tensor([hand_alpha_bar(int(s)) for s in t]).view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x_ref) / (1 - a).sqrt()

    model._eps = oracle
    pending = list(draws)
    out = model.reconstruct_single_scale(images, diffusionad.Paradigm.ITERATIVE, 40, 3, lambda shape: pending.pop(0))
    assert [int(t[0]) for _, t in seen] == [40, 20, 0]
    a_t, a_p = hand_alpha_bar(40), hand_alpha_bar(20)
    beta = 1 - a_t / a_p
    x_40 = math.sqrt(a_t) * images + math.sqrt(1 - a_t) * draws[0]
    mean = math.sqrt(a_p) * beta / (1 - a_t) * x_ref + math.sqrt(1 - beta) * (1 - a_p) / (1 - a_t) * x_40
    expected = mean + math.sqrt(beta * (1 - a_p) / (1 - a_t)) * draws[1]
    torch.testing.assert_close(seen[1][0], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(out, x_ref, atol=1e-4, rtol=0)
