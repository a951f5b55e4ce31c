"""TransFusion's loss and scoring equations pinned to hand-computed values on tiny tensors
(paper §3.1-3.4, Eqs. 2, 4-11). Every expected number is written out here with plain
Python arithmetic, independently of methods/, so that a changed constant, sign,
reduction or timestep range in methods/transfusion.py fails a test (mutations/transfusion.yaml)."""

from __future__ import annotations

import math

import pytest
import torch

from methods.base import TrainBatch
from methods.transfusion import (
    Heads,
    ReverseProcess,
    TrainingSample,
    TransFusion,
    TransFusionConfig,
    anomaly_appearance_loss,
    anomaly_score,
    compose,
    final_anomaly_map,
    mask_loss,
    mean_filter,
    normal_appearance_loss,
    reconstruction_error,
    reverse_step,
    transparency_schedule,
)

TINY = dict(
    image_size=8,
    crop_size=None,
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


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t4(values) -> torch.Tensor:
    """A [1, 1, 2, 2] float64 tensor from four values."""
    return torch.tensor(values, dtype=torch.float64).reshape(1, 1, 2, 2)


# ---- §3.1: schedule and Eqs. 2-4 -------------------------------------------------------


def test_schedules_by_hand():
    assert transparency_schedule("linear", 4).tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert transparency_schedule("quadratic", 4).tolist() == pytest.approx([0, 1 / 16, 1 / 4, 9 / 16, 1])
    assert transparency_schedule("root", 4).tolist() == pytest.approx([0, 0.5, math.sqrt(0.5), math.sqrt(0.75), 1])


def test_eq2_compose_by_hand():
    # Pixel 1 inside M: (1 - β) n + β ε = 0.75 * 0.2 + 0.25 * (-0.6) = 0.0; pixel 2 outside: n.
    normal = torch.tensor([0.2, 0.2], dtype=torch.float64).reshape(1, 1, 1, 2)
    anomaly = torch.tensor([-0.6, -0.6], dtype=torch.float64).reshape(1, 1, 1, 2)
    mask = torch.tensor([1.0, 0.0], dtype=torch.float64).reshape(1, 1, 1, 2)
    assert compose(normal, anomaly, mask, 0.25).flatten().tolist() == pytest.approx([0.0, 0.2])
    assert compose(normal, anomaly, mask, 0.75).flatten().tolist() == pytest.approx([0.75 * -0.6 + 0.25 * 0.2, 0.2])


def test_eq4_reverse_step_by_hand():
    # x_{t-1} = x_t - (β_t - β_{t-1}) M ε + (β_t - β_{t-1}) M n = 0.3 + 0.25 * 0.6 + 0.25 * 0.2 = 0.5
    x_t = torch.tensor([0.3, 0.3], dtype=torch.float64).reshape(1, 1, 1, 2)
    eps = torch.full_like(x_t, -0.6)
    n = torch.full_like(x_t, 0.2)
    mask = torch.tensor([1.0, 0.0], dtype=torch.float64).reshape(1, 1, 1, 2)
    assert reverse_step(x_t, eps, n, mask, 0.5, 0.25).flatten().tolist() == pytest.approx([0.5, 0.3])


# ---- §3.2: losses (Eqs. 5-9) ------------------------------------------------------------


def reference_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float) -> float:
    """SSIM (Wang et al. 2004) written out: 11×11 Gaussian window σ = 1.5, valid positions
    only, C1 = (0.01 L)², C2 = (0.03 L)², averaged over positions and channels."""
    g = [math.exp(-((i - 5) ** 2) / (2 * 1.5**2)) for i in range(11)]
    g = [v / sum(g) for v in g]
    _, c, h, w = x.shape
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for ch in range(c):
        for i in range(h - 10):
            for j in range(w - 10):
                px = x[0, ch, i : i + 11, j : j + 11].tolist()
                py = y[0, ch, i : i + 11, j : j + 11].tolist()
                wgt = [[g[a] * g[b] for b in range(11)] for a in range(11)]
                mx = sum(wgt[a][b] * px[a][b] for a in range(11) for b in range(11))
                my = sum(wgt[a][b] * py[a][b] for a in range(11) for b in range(11))
                sxx = sum(wgt[a][b] * px[a][b] ** 2 for a in range(11) for b in range(11)) - mx**2
                syy = sum(wgt[a][b] * py[a][b] ** 2 for a in range(11) for b in range(11)) - my**2
                sxy = sum(wgt[a][b] * px[a][b] * py[a][b] for a in range(11) for b in range(11)) - mx * my
                values.append((2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sxx + syy + c2)))
    return sum(values) / len(values)


def test_eq5_normal_loss_constant_images_by_hand():
    # Constant images: SSIM = (2 μx μy + C1) / (μx² + μy² + C1), C1 = (0.01 · 2)²; L1 = 1.
    pred, target = torch.full((1, 3, 16, 16), 0.5), torch.full((1, 3, 16, 16), -0.5)
    c1 = (0.01 * 2) ** 2
    ssim = (2 * 0.5 * -0.5 + c1) / (0.25 + 0.25 + c1)
    assert normal_appearance_loss(pred, target).item() == pytest.approx((1 - ssim) + 1.0, rel=1e-5)


def test_eq5_normal_loss_is_one_minus_ssim_plus_l1():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(1, 1, 13, 13, generator=g, dtype=torch.float64) * 2 - 1
    target = (pred + 0.3 * torch.rand(1, 1, 13, 13, generator=g, dtype=torch.float64)).clamp(-1, 1)
    l1 = (pred - target).abs().mean().item()
    expected = 1 - reference_ssim(pred, target, data_range=2.0) + l1
    assert normal_appearance_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)


def hand_mask_loss(logits: list[float], mask: list[float], weight: float = 5.0) -> float:
    """α · mean(α_t (1 - p_t)² CE) + mean(smooth L1(σ(l), M)), α = 5 (Eq. 6), focal α_t
    0.25 / 0.75 and γ = 2 (official code)."""
    focal, smooth = 0.0, 0.0
    for l, m in zip(logits, mask):
        p = sigmoid(l)
        ce = -(m * math.log(p) + (1 - m) * math.log(1 - p))
        p_t = p if m else 1 - p
        alpha_t = 0.25 if m else 0.75
        focal += alpha_t * (1 - p_t) ** 2 * ce
        d = abs(p - m)
        smooth += 0.5 * d * d if d < 1 else d - 0.5
    return weight * focal / len(logits) + smooth / len(logits)


def test_eq6_mask_loss_by_hand():
    logits, mask = [0.0, 2.0, -1.0, 3.0], [1.0, 0.0, 0.0, 1.0]
    assert mask_loss(t4(logits), t4(mask)).item() == pytest.approx(hand_mask_loss(logits, mask), rel=1e-9)


def test_eq7_anomaly_loss_is_l2_by_hand():
    # differences 0.5 and -2: L2 = (0.25 + 4) / 2 = 2.125 (L1 would give 1.25)
    pred, target = torch.tensor([0.5, -2.0]), torch.tensor([0.0, 0.0])
    assert anomaly_appearance_loss(pred, target).item() == pytest.approx(2.125)


def hand_sample(model: TransFusion) -> TrainingSample:
    """One 1-channel-broadcast 2×2 sample at t = 2 of T = 4 (β_2 = 0.5, β_1 = 0.25)."""
    n = torch.tensor([0.2, -0.4, 0.6, 0.0]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2).clone()
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0]).reshape(1, 1, 2, 2)
    eps = mask * torch.tensor([-0.6, 0.9, 0.8, 0.5]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    t = torch.tensor([2])
    return TrainingSample(n, eps, mask, torch.zeros_like(mask), t, compose(n, eps, mask, model.betas[t]))


def test_eq6_l_m_term_of_the_model_uses_alpha_5():
    model = TransFusion(tiny(normal_loss=False, anomaly_loss=False, consistency_loss=False))
    sample = hand_sample(model)
    logits = [0.0, 2.0, -1.0, 3.0]
    heads = Heads(torch.zeros_like(sample.images), torch.zeros_like(sample.images), torch.tensor(logits).reshape(1, 1, 2, 2))
    losses = model.training_losses(sample, heads)
    assert set(losses.terms) == {"L_m"}
    assert losses.total.item() == pytest.approx(hand_mask_loss(logits, [1.0, 0.0, 1.0, 0.0]), rel=1e-6)


def test_eq7_l_a_term_regresses_beta_t_times_the_anomaly():
    # Scaled target (official code): β_2 ε = 0.5 ε inside M; prediction 0 -> mean((0.5 ε)²).
    model = TransFusion(tiny(normal_loss=False, mask_loss=True, consistency_loss=False))
    sample = hand_sample(model)
    zeros = torch.zeros_like(sample.images)
    heads = Heads(zeros, zeros, torch.zeros_like(sample.mask))
    terms = model.training_losses(sample, heads).terms
    expected = (0.25 * 0.36 + 0.25 * 0.64) * 3 / 12  # (0.5·-0.6)², (0.5·0.8)² over 12 values
    assert terms["L_a"].item() == pytest.approx(expected, rel=1e-6)


def test_eq8_l_c_term_by_hand():
    # Heads: ε̂ (scaled) = 0.5 · 0.4 = 0.2 -> appearance 0.4, n̂ = 0.1, binary mask [1, 1, 0, 0].
    # Eq. 4: x_{t-1} = x_t - 0.25 · M̂ (0.4 - 0.1); target Eq. 3 at β_1 = 0.25.
    model = TransFusion(tiny(normal_loss=False, anomaly_loss=False, mask_loss=True))
    sample = hand_sample(model)
    heads = Heads(torch.full_like(sample.images, 0.2), torch.full_like(sample.images, 0.1), torch.tensor([3.0, 1.0, -1.0, -3.0]).reshape(1, 1, 2, 2))
    n, eps, m = [0.2, -0.4, 0.6, 0.0], [-0.6, 0.9, 0.8, 0.5], [1, 0, 1, 0]
    x_t = [(1 - mi) * ni + 0.5 * mi * ei + 0.5 * mi * ni for ni, ei, mi in zip(n, eps, m)]
    pred = [x - 0.25 * b * (0.4 - 0.1) for x, b in zip(x_t, [1, 1, 0, 0])]
    true = [(1 - mi) * ni + 0.25 * mi * ei + 0.75 * mi * ni for ni, ei, mi in zip(n, eps, m)]
    expected = sum((p - q) ** 2 for p, q in zip(pred, true)) / 4
    assert model.training_losses(sample, heads).terms["L_c"].item() == pytest.approx(expected, rel=1e-6)


def test_eq9_total_is_the_plain_sum_of_the_terms():
    model = TransFusion(tiny())
    sample = hand_sample(model)
    g = torch.Generator().manual_seed(3)
    heads = Heads(torch.randn(1, 3, 2, 2, generator=g), torch.randn(1, 3, 2, 2, generator=g), torch.randn(1, 1, 2, 2, generator=g))
    losses = model.training_losses(sample, heads)
    assert set(losses.terms) == {"L_n", "L_m", "L_a", "L_c"}
    assert losses.total.item() == pytest.approx(sum(v.item() for v in losses.terms.values()), rel=1e-6)
    assert losses.terms["L_m"].item() == pytest.approx(mask_loss(heads.mask_logits, sample.mask, 5.0).item(), rel=1e-6)


def test_training_draws_t_from_1_to_T_and_blanks_the_previous_mask_at_T():
    model = TransFusion(tiny(anomaly_fraction=0.0, rotation_probability=0.0))
    b = 2000
    batch = TrainBatch(torch.zeros(b, 3, 8, 8), torch.ones(b, 1, 8, 8), torch.zeros(b, 3, 8, 8), torch.zeros(b, dtype=torch.long))
    torch.manual_seed(0)
    sample = model.training_sample(batch)
    assert sample.t.min().item() == 1 and sample.t.max().item() == 4
    assert set(sample.t.tolist()) == {1, 2, 3, 4}


def test_simulated_previous_mask_is_zero_at_t_equal_T():
    model = TransFusion(tiny(anomaly_fraction=1.0, rotation_probability=0.0, mask_drop_probability=0.0))
    b = 64
    g = torch.Generator().manual_seed(0)
    batch = TrainBatch(torch.rand(b, 3, 8, 8, generator=g) * 2 - 1, torch.ones(b, 1, 8, 8), torch.rand(b, 3, 8, 8, generator=g) * 2 - 1, torch.zeros(b, dtype=torch.long))
    torch.manual_seed(0)
    sample = model.training_sample(batch)
    last = sample.t == 4
    assert bool(last.any()) and sample.previous_mask[last].sum().item() == 0
    # at t < T the grown/exact/shrunk Perlin masks are visible on some samples
    assert sample.previous_mask[~last].sum().item() > 0


# ---- §3.4: anomaly maps and score (Eqs. 10-11) ------------------------------------------


def test_m_recon_is_the_channel_mean_squared_error_in_unit_range():
    # [0, 1] values: x = (0.5, 0.5, 0.5), x0 = (0.3, 0.9, 1.0 after clipping 1.5) -> errors 0.2, 0.4, 0.5
    images = torch.zeros(1, 3, 1, 1)
    reconstruction = torch.tensor([-0.4, 0.8, 2.0]).reshape(1, 3, 1, 1)
    expected = (0.2**2 + 0.4**2 + 0.5**2) / 3
    assert reconstruction_error(images, reconstruction).item() == pytest.approx(expected, rel=1e-6)


def test_mean_filter_by_hand():
    impulse = torch.zeros(1, 9, 9)
    impulse[0, 4, 4] = 1.0
    out = mean_filter(impulse, 7)
    assert out[0, 4, 4].item() == pytest.approx(1 / 49)
    assert out[0, 1, 1].item() == pytest.approx(1 / 49) and out[0, 0, 0].item() == 0.0
    corner = torch.zeros(1, 9, 9)
    corner[0, 0, 0] = 1.0
    # zero padding counted: the corner pixel's own average is still 1/49
    assert mean_filter(corner, 7)[0, 0, 0].item() == pytest.approx(1 / 49)


def test_eq10_paper_weights_and_filter():
    c = TransFusionConfig()
    assert (c.disc_weight, c.filter_size) == (0.95, 7)
    m_disc = torch.zeros(1, 9, 9)
    m_disc[0, 4, 4] = 1.0
    m_recon = torch.zeros(1, 9, 9)
    m_recon[0, 4, 5] = 1.0
    out = final_anomaly_map(m_disc, m_recon, c.disc_weight, c.filter_size)
    # (4, 1) sees only M_disc's impulse (column 5 is 4 away); (4, 8) sees only M_recon's.
    assert out[0, 4, 1].item() == pytest.approx(0.95 / 49)
    assert out[0, 4, 8].item() == pytest.approx(0.05 / 49)
    assert out[0, 4, 4].item() == pytest.approx(1 / 49)


def test_eq10_model_map_combines_disc_and_recon():
    model = TransFusion(tiny(filter_size=1))
    images = torch.zeros(1, 3, 1, 2)
    result = ReverseProcess(torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]).reshape(1, 3, 1, 2), torch.tensor([[[0.2, 0.6]]]), torch.tensor([[[0.9, 0.1]]]))
    # M_recon = ((0.5 - 0.5)², (0.5 - 1)²) = (0, 0.25); final = 0.95 M_disc + 0.05 M_recon
    assert model.anomaly_map(images, result).flatten().tolist() == pytest.approx([0.95 * 0.2, 0.95 * 0.6 + 0.05 * 0.25])


def test_eq11_score_is_the_maximum():
    maps = torch.tensor([[[0.1, 0.7], [0.3, 0.2]], [[0.0, 0.0], [0.0, 0.05]]])
    assert anomaly_score(maps).tolist() == pytest.approx([0.7, 0.05])


class StubNet(torch.nn.Module):
    """Heads with M̂_t = t / 10 everywhere, ε̂ = 0, n̂ = 0; records the mask channel it sees."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> Heads:
        self.seen.append((int(t[0]), x[:, 3:4].clone()))
        p = t.float().reshape(-1, 1, 1, 1) / 10
        logits = torch.log(p / (1 - p)).expand(x.shape[0], 1, *x.shape[-2:])
        return Heads(torch.zeros_like(x[:, :3]), torch.zeros_like(x[:, :3]), logits)


def test_reverse_process_walks_t_from_T_to_1_and_averages_the_masks():
    model = TransFusion(tiny(mask_threshold=0.25))
    model.net = StubNet()
    result = model.reverse_process(torch.full((1, 3, 2, 2), 0.5))
    assert [t for t, _ in model.net.seen] == [4, 3, 2, 1]
    # M_disc = mean(0.4, 0.3, 0.2, 0.1) = 0.25; M_1 = 0.1
    assert result.mean_mask.flatten().tolist() == pytest.approx([0.25] * 4, rel=1e-6)
    assert result.last_mask.flatten().tolist() == pytest.approx([0.1] * 4, rel=1e-6)
    # the fed-back mask starts at zero and is σ(M̂) > 0.25: 1 after t = 4, 3; 0 after t = 2
    fed = [m.unique().tolist() for _, m in model.net.seen]
    assert fed == [[0.0], [1.0], [1.0], [0.0]]
    # ε̂ = n̂ = 0: each step multiplies nothing away, x_{t-1} = x_t inside and outside M
    assert result.reconstruction.flatten().tolist() == pytest.approx([0.5] * 12)


def test_appearance_undoes_the_beta_scaling():
    model = TransFusion(tiny())
    pred = torch.full((2, 3, 1, 1), 0.3)
    t = torch.tensor([2, 4])
    # β_2 = 0.5, β_4 = 1: ε = 0.3 / 0.5 = 0.6 and 0.3
    assert model.appearance(pred, t)[:, 0].flatten().tolist() == pytest.approx([0.6, 0.3])
