"""DRDC: Diffusion Refinement with Dual Conditions for multi-class anomaly detection.

One model for all categories of a dataset (the unified setting). Paper: "Enhancing
Multi-Class Anomaly Detection through Diffusion Refinement with Dual Conditions"
(no public code exists), so every choice the
paper leaves open is written next to the code that makes it.

    python -m orchestrator.sweep ablation=drdc_conditions    # Table 5 rows
    python -m orchestrator.sweep ablation=drdc_gamma         # γ of Eq. 19 (Optuna)
    python -m orchestrator.sweep ablation=drdc_fusion        # timesteps / grids / scales / m

Three parts (paper Fig. 1):

1. Base model (§3.1): a frozen backbone's multi-stage features F_in, reconstructed by a
   UniAD-style transformer (methods/feature_reconstruction.py); Eq. 1 loss, Eq. 2 map.
2. Diffusion refinement by inpainting (§4.2, §4.3): grid cells of the image are split
   into n_s disjoint sets; each set is replaced by noise and inpainted by a few DDIM
   steps from an early timestep, with the dual conditions: the ε-network also sees I_in
   (model condition, Eq. 12) and the known region is re-sampled from q(x_t | x_0) at
   every step (test-time condition, Eqs. 13-15).
3. Spatio-temporal fusion (§4.4): distance maps over timesteps, grid sizes and scales
   are averaged (Eqs. 16-17), mean-filtered (Eq. 18) and blended with the base map
   (Eq. 19); the image score is the maximum of the average-pooled final map.

Notation (code name -> paper symbol):

    features           F_in        [B, C_feat, h, w]  backbone features (h = w = 14 at 224²)
    reconstruction     F_out       [B, C_feat, h, w]  transformer output
    cell               c           grid cell side in pixels (c ∈ {1, 16, 32})
    num_sets           n_s         disjoint sets the G = (H/c)(W/c) cells are split into
    known_mask         M_i         [.., 1, H, W] 1 on known pixels, 0 on the set S_i
    condition          I_in        image with S_i replaced by Gaussian noise
    original           I_ori       the test image
    timesteps          {t_i}       the DDIM schedule of the one reverse pass (250, ..., 0)
    train_start_timestep t_1       the pass start the Eq. 12 training states imitate (refinement_state)
    x0_prediction      x̃_0^t      Eq. 9
    inpainted          I_out^{t,c} Eq. 10
    scales             {l_i}       Eq. 16 down-sampling factors
    gamma              γ           Eq. 19 blend weight
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from methods.backbones import BACKBONES, backbone_channels
from methods.base import AnomalyMethod, BackboneFactory, Losses, MethodConfig, MultiClassConfig, Optimizers, Prediction, TrainBatch, check, infer_field, train_field
from methods.feature_reconstruction import FeatureReconstructionTransformer, FeatureResize, feature_jitter, max_neighbor_size, resize_and_concatenate
from methods.gaussian_diffusion import BetaSchedule, GaussianDiffusion, extract
from methods.unet import UNet

log = logging.getLogger(__name__)

IMAGE_CHANNELS = 3  # C_img of Eq. 19


class Fusion(str, Enum):
    """Which diffusion heatmaps Eq. 17 averages (always over the grid sizes c).

    §4.4 fuses "various timesteps and spatial scales"; Table 5 turns the whole module
    off, which leaves the final prediction of the reverse pass at full resolution."""

    SPATIOTEMPORAL = "spatiotemporal"  # every timestep x every scale (Eq. 17, the paper)
    TEMPORAL = "temporal"  # every timestep, scale l = 1 only
    SPATIAL = "spatial"  # the final timestep, every scale
    NONE = "none"  # the final timestep at l = 1 (Table 5, "spatio-temporal fusion" x)


@dataclass(frozen=True)
class DRDCConfig(MultiClassConfig):
    """DRDC hyperparameters; defaults are the paper's (§5) and, where the paper builds on
    UniAD without restating it, UniAD's. ``num_categories`` (from MultiClassConfig) is set
    by the orchestrator from the trial's category list."""

    # --- data and schedule (read by the orchestrator) -------------------------------
    image_size: int = train_field(224, "resize side in pixels (§5: 224)")
    crop_size: int | None = train_field(None, "centre crop side after resizing; None = no crop (§5 resizes only)")
    epochs: int = train_field(1000, "training epochs (not in the paper; UniAD's 1000)")
    batch_size: int = train_field(64, "global batch size (not in the paper; UniAD's 8 per GPU x 8 GPUs)")
    learning_rate: float = train_field(1e-4, "AdamW learning rate of the transformer (not in the paper; UniAD's 1e-4)")

    # --- base model (§3.1, §5; UniAD's transformer) ---------------------------------
    backbone: str = train_field("efficientnet_b4", "frozen ImageNet backbone (§5: efficientnet_b4; efficientnet_lite0 is the offline CPU choice)")
    backbone_stages: tuple[int, ...] = train_field((1, 2, 3, 4), "backbone stages (1-based) whose features form F_in (§5: stages 1-4)")
    feature_stride: int = train_field(16, "F_in resolution = input size / feature_stride (§5: 14x14 at 224)")
    feature_resize: FeatureResize = train_field(FeatureResize.BILINEAR, "how stages are resized to F_in: bilinear (UniAD's code) | area (block means, anti-aliased)")
    hidden_dim: int = train_field(256, "transformer width (UniAD: 256)")
    transformer_heads: int = train_field(8, "transformer attention heads (UniAD: 8); the UNet's are set by head_channels")
    encoder_layers: int = train_field(4, "transformer encoder layers (UniAD: 4)")
    decoder_layers: int = train_field(4, "transformer decoder layers, each with its own learned query (UniAD: 4)")
    ffn_dim: int = train_field(1024, "transformer feed-forward width (UniAD: 1024)")
    transformer_dropout: float = train_field(0.1, "transformer dropout (UniAD: 0.1)")
    neighbor_size: int = train_field(7, "side of UniAD's neighbour-masked attention window (odd; 0 = no mask; UniAD: 7)")
    feature_jitter_scale: float = train_field(20.0, "UniAD feature-jitter scale (0 = off; UniAD: 20)")
    feature_jitter_prob: float = train_field(1.0, "probability of jittering a training sample's features (UniAD: 1)")
    category_query: bool = train_field(
        False, "add a learned per-category embedding to the decoder queries (needs category labels at test time; the paper's unified setting does not use them)"
    )

    # --- diffusion model (§4.2-4.3, §5) ----------------------------------------------
    num_timesteps: int = train_field(1000, "diffusion steps T for training (§5: 1000)")
    beta_schedule: BetaSchedule = train_field(BetaSchedule.LINEAR, "β schedule (ADM linear; not stated in the paper)")
    model_condition: bool = train_field(True, "model condition: the ε-network also gets I_in as 3 extra input channels (§4.3, Eq. 12; Table 5)")
    train_grid_sizes: tuple[int, ...] = train_field((1, 16, 32), "grid cell sizes c of the training masks for I_in (the paper trains with its inference grids)")
    train_num_sets: int = train_field(2, "n_s of the training masks: one of n_s random disjoint sets is noised (the paper's n_s)")
    train_max_timestep: int | None = train_field(None, "largest t drawn in training; None = T-1 (§5 trains over all 1000 steps)")
    # What x_t holds in training (Eq. 12): the state the refinement pass really visits,
    # derived in refinement_state(). On the masked region the deterministic pass keeps the
    # noise fill's noise, so x_t there is not q(x_t | x_0) of the normal image.
    train_start_timestep: int = train_field(
        250,
        "t_1 of the refinement pass the Eq. 12 training states imitate (refinement_state: the masked region carries the noise of "
        "the fill forwarded to t_1); the first of `timesteps` (§5: 250); t > t_1 trains the first state of a pass started at t",
    )
    base_channels: int = train_field(128, "UNet base width (§5: ADM UNet, width not given; 128 as in DiffusionAD)")
    channel_mult: tuple[int, ...] = train_field((1, 1, 2, 2, 4, 4), "UNet width multipliers per level (ADM 256² layout)")
    layers_per_block: int = train_field(2, "residual blocks per UNet level (ADM: 2)")
    attention_resolutions: tuple[int, ...] = train_field((28, 14, 7), "UNet levels (pixels) with self-attention (ADM's 1/8, 1/16, 1/32 at 224²)")
    head_channels: int = train_field(64, "channels per UNet attention head (ADM: 64)")
    norm_groups: int = train_field(32, "GroupNorm groups in the UNet")
    dropout: float = train_field(0.0, "UNet dropout")

    # --- optimisation (§5: AdamW, weight decay 1e-4, both trained from scratch) -----
    # learning_rate (above) is the transformer's.
    diffusion_learning_rate: float = train_field(1e-4, "AdamW learning rate of the UNet (not in the paper; ADM's 1e-4)")
    weight_decay: float = train_field(1e-4, "AdamW weight decay (§5: 1e-4)")
    lr_decay_epoch: int | None = train_field(800, "epoch period of the x lr_decay_factor step (UniAD: 800 of 1000); None = constant")
    lr_decay_factor: float = train_field(0.1, "learning-rate factor applied every lr_decay_epoch epochs (UniAD: 0.1)")

    # --- inference (§4.2-4.4, §5, Table 5) --------------------------------------------
    gamma: float = infer_field(0.9, "γ of Eq. 19: weight of the diffusion heatmap (§5: 0.9)")
    timesteps: tuple[int, ...] = infer_field((250, 200, 150, 100, 50, 0), "DDIM schedule of the reverse pass, decreasing (§5)")
    grid_sizes: tuple[int, ...] = infer_field((1, 16, 32), "inpainting grid cell sizes c (§5: 1, 16, 32)")
    num_sets: int = infer_field(2, "n_s: disjoint cell sets, each inpainted once (§5: 2)")
    scales: tuple[int, ...] = infer_field((1, 2, 4, 8), "down-sampling factors l of Eq. 16 (§5: 1, 2, 4, 8)")
    mean_filter_size: int = infer_field(41, "m of Eq. 18: mean-filter side (odd; 1 = no smoothing; §5: 41)")
    test_time_condition: bool = infer_field(True, "re-sample the known region from q(x_t|x_0) at every reverse step (Eqs. 13-15; Table 5)")
    fusion: Fusion = infer_field(Fusion.SPATIOTEMPORAL, "heatmaps Eq. 17 averages: spatiotemporal (paper) | temporal | spatial | none (Table 5's x: final timestep, l = 1)")
    multiscale_base: bool = infer_field(False, "apply the Eq. 16 scales to the base heatmap too (Table 5: off in the final model)")
    clip_denoised: bool = infer_field(True, "clip x̃_0 to [-1, 1] before each DDIM step (guided-diffusion's default)")
    score_pool_size: int = infer_field(16, "average-pooling window for the image score (max of the pooled map; UniAD: 16)")

    @property
    def feature_size(self) -> int:
        """h = w of F_in."""
        return self.input_size // self.feature_stride

    def validate(self) -> None:
        super().validate()
        size = self.input_size
        check(self.backbone in BACKBONES, f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        num_stages = len(backbone_channels(self.backbone))
        check(
            len(self.backbone_stages) > 0 and list(self.backbone_stages) == sorted(set(self.backbone_stages)) and 1 <= self.backbone_stages[0] and self.backbone_stages[-1] <= num_stages,
            f"backbone_stages must be increasing stage numbers in [1, {num_stages}] for {self.backbone}, got {self.backbone_stages}",
        )
        check(self.feature_stride >= 1 and size % self.feature_stride == 0, f"feature_stride must divide the input size {size}, got {self.feature_stride}")
        check(
            self.hidden_dim % 2 == 0 and self.hidden_dim % self.transformer_heads == 0,
            f"hidden_dim must be even and divisible by transformer_heads={self.transformer_heads}, got {self.hidden_dim}",
        )
        check(min(self.encoder_layers, self.decoder_layers) >= 1, "encoder_layers and decoder_layers must be >= 1")
        largest = max_neighbor_size(self.feature_size)
        check(
            self.neighbor_size == 0 or (self.neighbor_size % 2 == 1 and self.neighbor_size <= largest),
            f"neighbor_size must be 0 or odd and <= {largest} for {self.feature_size}x{self.feature_size} features, got {self.neighbor_size}",
        )
        check(
            0.0 <= self.transformer_dropout < 1.0 and 0.0 <= self.dropout < 1.0,
            f"transformer_dropout and dropout must be in [0, 1), got {self.transformer_dropout}, {self.dropout}",
        )
        check(self.feature_jitter_scale >= 0 and 0 <= self.feature_jitter_prob <= 1, "feature_jitter_scale must be >= 0 and feature_jitter_prob in [0, 1]")
        check(self.num_timesteps >= 2, f"num_timesteps must be >= 2, got {self.num_timesteps}")
        check(
            0 <= self.train_start_timestep < self.num_timesteps,
            f"train_start_timestep must be in [0, {self.num_timesteps - 1}], got {self.train_start_timestep}",
        )
        check(
            self.train_max_timestep is None or 0 <= self.train_max_timestep < self.num_timesteps,
            f"train_max_timestep must be None or in [0, {self.num_timesteps - 1}], got {self.train_max_timestep}",
        )
        for name, cells, sets in (("grid_sizes", self.grid_sizes, self.num_sets), ("train_grid_sizes", self.train_grid_sizes, self.train_num_sets)):
            check(len(cells) > 0, f"{name} must not be empty")
            for c in cells:
                check(c >= 1 and size % c == 0, f"{name}: cell size {c} must divide the input size {size} (§4.2: c is a factor of H and W)")
                check(1 <= sets <= (size // c) ** 2, f"n_s={sets} must be in [1, {(size // c) ** 2}] (the number of {c}x{c} cells) for {name}")
        steps = self.timesteps
        check(
            len(steps) > 0 and all(0 <= t < self.num_timesteps for t in steps) and all(a > b for a, b in zip(steps, steps[1:])),
            f"timesteps must be strictly decreasing values in [0, {self.num_timesteps - 1}], got {steps}",
        )
        check(len(self.scales) > 0 and all(1 <= l <= size for l in self.scales), f"scales must be in [1, {size}], got {self.scales}")
        check(0.0 <= self.gamma <= 1.0, f"gamma must be in [0, 1], got {self.gamma}")
        check(self.mean_filter_size >= 1 and self.mean_filter_size % 2 == 1, f"mean_filter_size must be odd and >= 1, got {self.mean_filter_size}")
        check(1 <= self.score_pool_size <= size, f"score_pool_size must be in [1, {size}], got {self.score_pool_size}")
        levels = len(self.channel_mult)
        check(levels >= 1 and size % 2 ** (levels - 1) == 0, f"input size {size} must be divisible by 2^{levels - 1} for channel_mult={self.channel_mult}")
        check(
            all(self.base_channels * m % self.norm_groups == 0 for m in self.channel_mult),
            f"UNet widths must be divisible by norm_groups={self.norm_groups}",
        )
        check(self.diffusion_learning_rate > 0, f"diffusion_learning_rate must be > 0, got {self.diffusion_learning_rate}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.lr_decay_epoch is None or self.lr_decay_epoch >= 1, f"lr_decay_epoch must be None or >= 1, got {self.lr_decay_epoch}")


# ---------------------------------------------------------------------------------------
# §4.2: grid masks
# ---------------------------------------------------------------------------------------


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """N(0, 1) samples drawn from ``generator`` (on its own device) or, when None, from
    torch's global RNG (training)."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def grid_partition(
    batch: int, height: int, width: int, cell: int, num_sets: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Random partition of each image's c×c grid cells into n_s disjoint sets S_i (DRDC §4.2).

    The G = (H/c)(W/c) cells of every image are put in a uniformly random order (its own
    per image) and cut into n_s consecutive runs, so the sets are disjoint, cover the
    image and hold G/n_s cells each (⌊G/n_s⌋ or ⌈G/n_s⌉ when n_s does not divide G).
    Returns the set index of every pixel, long [B, H, W] in {0, ..., n_s - 1}."""
    if height % cell or width % cell:
        raise ValueError(f"grid cell size {cell} must divide the image size {height}x{width}")
    rows, cols = height // cell, width // cell
    cells = rows * cols
    if not 1 <= num_sets <= cells:
        raise ValueError(f"num_sets must be in [1, {cells}] for {cell}x{cell} cells of a {height}x{width} image, got {num_sets}")
    device = torch.device(device)
    order = _rand((batch, cells), generator, device).argsort(dim=1)  # [B, G] a random permutation per image
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(cells, device=device).expand(batch, -1))
    set_of_cell = rank * num_sets // cells  # [B, G] cells ranked r go to set ⌊r n_s / G⌋
    return set_of_cell.view(batch, rows, cols).repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)


def known_masks(partition: torch.Tensor, num_sets: int) -> torch.Tensor:
    """M_i for every set (DRDC §4.2): 0 on S_i, 1 elsewhere. partition [B, H, W] ->
    float [n_s, B, 1, H, W]."""
    sets = torch.arange(num_sets, device=partition.device).view(-1, 1, 1, 1, 1)
    return (partition.unsqueeze(0).unsqueeze(2) != sets).float()


def noised_condition(original: torch.Tensor, known_mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """I_in = M ⊙ I_ori + (1 - M) ⊙ n, n ~ N(0, I): the masked region filled with
    Gaussian noise rather than a binary mask (DRDC §4.2-4.3). [N, 3, H, W]"""
    return known_mask * original + (1 - known_mask) * noise


def random_training_masks(batch: int, height: int, width: int, grid_sizes: tuple[int, ...], num_sets: int, device: torch.device) -> torch.Tensor:
    """Known-region masks for training the model condition, [B, 1, H, W].

    §4.3 does not say how I_in is drawn in training; we draw it as at inference: per
    image a cell size c uniformly from ``grid_sizes``, a random partition into n_s sets
    and one of the sets, uniformly, as the noised region. Global RNG."""
    choice = torch.randint(len(grid_sizes), (batch,), device=device)
    chosen_set = torch.randint(num_sets, (batch, 1, 1), device=device)
    masks = torch.ones(batch, 1, height, width, device=device)
    for index, cell in enumerate(grid_sizes):
        rows = (choice == index).nonzero().flatten()
        if len(rows):
            partition = grid_partition(len(rows), height, width, cell, num_sets, None, device)
            masks[rows, 0] = (partition != chosen_set[rows]).float()
    return masks


# ---------------------------------------------------------------------------------------
# §4.2-4.3: inpainting by a short reverse pass with the dual conditions
# ---------------------------------------------------------------------------------------


def replace_known_region(
    x_unknown: torch.Tensor,
    original: torch.Tensor,
    known_mask: torch.Tensor,
    t: torch.Tensor,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Test-time condition (DRDC Eqs. 13-15, RePaint):
    x_t = M ⊙ x_t^known + (1 - M) ⊙ x_t^unknown with x_t^known = √ᾱ_t x_0 + √(1 - ᾱ_t) ε
    a fresh sample of q(x_t | x_0) for the known pixels (x_0 = I_ori). t = -1 gives the
    clean image itself. Shapes [N, 3, H, W]; t [N]; known_mask [N, 1, H, W]."""
    # q_sample's own float64-derived buffers, padded so that index t + 1 = 0 means t = -1
    one, zero = original.new_ones(1), original.new_zeros(1)
    signal = extract(torch.cat([one, diffusion.sqrt_alphas_cumprod]), t + 1, original.shape)
    spread = extract(torch.cat([zero, diffusion.sqrt_one_minus_alphas_cumprod]), t + 1, original.shape)
    x_known = signal * original + spread * noise
    return known_mask * x_known + (1 - known_mask) * x_unknown


class InpaintingTrajectory(NamedTuple):
    """One reverse pass: the timesteps walked, the state x_t fed to the network at each
    (after the test-time condition), and x̃_0^t (Eq. 9) predicted there."""

    timesteps: tuple[int, ...]
    states: list[torch.Tensor]  # n_t x [N, 3, H, W]
    x0_predictions: list[torch.Tensor]  # n_t x [N, 3, H, W]


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def inpaint(
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    original: torch.Tensor,
    known_mask: torch.Tensor,
    fill_noise: torch.Tensor,
    timesteps: tuple[int, ...],
    *,
    model_condition: bool,
    test_time_condition: bool,
    clip_denoised: bool,
    generator: torch.Generator | None,
) -> InpaintingTrajectory:
    """Inpaint the region (1 - M) of ``original`` with one deterministic DDIM pass over
    ``timesteps`` (DRDC §4.2-4.3, §5).

    x_0 = I_in (the masked region filled with ``fill_noise``) is taken forward to
    x_{t_1} by q(x_t | x_0) (Eq. 4), so the masked region starts as pure noise and holds
    nothing of the original there. Each step predicts z_θ(x_t, I_in, t) (Eq. 12 input;
    just x_t without the model condition), derives x̃_0^t (Eq. 9), and takes a DDIM
    step (η = 0) to the next timestep (t = -1 after the last). With the test-time
    condition, the known region of every new state is re-sampled from q(x_t | x_0)
    (Eqs. 13-15). Fresh noise comes from ``generator``.

    The paper does not say whether x̃_0 is clipped; we clip to [-1, 1] when
    ``clip_denoised`` (guided-diffusion's sampling default) and take the DDIM step with
    the ε consistent with the clipped x̃_0. Training feeds z_θ the states this pass
    visits (:func:`refinement_state`).
    """
    n = original.shape[0]
    device = original.device
    condition = noised_condition(original, known_mask, fill_noise)

    def at(step: int) -> torch.Tensor:
        return torch.full((n,), step, device=device, dtype=torch.long)

    x = diffusion.q_sample(condition, at(timesteps[0]), _randn(tuple(original.shape), generator, device))
    states, predictions = [], []
    for i, step in enumerate(timesteps):
        t = at(step)
        t_prev = at(timesteps[i + 1] if i + 1 < len(timesteps) else -1)
        network_input = torch.cat([x, condition], dim=1) if model_condition else x
        eps = denoiser(network_input, t)
        x0 = diffusion.predict_x0_from_eps(x, t, eps)  # Eq. 9
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = diffusion.predict_eps_from_x0(x, t, x0)
        states.append(x)
        predictions.append(x0)
        x_next = diffusion.ddim_step(x, t, t_prev, eps)  # x_{t-1}^unknown (Eq. 14, DDIM form)
        if test_time_condition:
            x_next = replace_known_region(x_next, original, known_mask, t_prev, diffusion, _randn(tuple(original.shape), generator, device))
        x = x_next
    return InpaintingTrajectory(tuple(timesteps), states, predictions)


class RefinementState(NamedTuple):
    """A state of the refinement pass and the noise it holds (Eq. 12's x_t and ε)."""

    x_t: torch.Tensor  # [B, 3, H, W] the input z_θ sees at step t (with I_in beside it)
    eps: torch.Tensor  # [B, 3, H, W] ε̃ = (x_t - √ᾱ_t x) / √(1 - ᾱ_t): what z_θ must predict for x̃_0 = x


def refinement_state(
    diffusion: GaussianDiffusion, images: torch.Tensor, condition: torch.Tensor, t: torch.Tensor, start: int | torch.Tensor, noise: torch.Tensor
) -> RefinementState:
    """The state inpaint() visits at step t of a pass started at t_1 = ``start``, for a
    z_θ that inpaints perfectly (DRDC Eq. 12's (x_t, ε), derived from §4.2-4.3, Eqs. 4, 9).

    Notation: images = x (normal), condition = I_in = M ⊙ x + (1 - M) ⊙ n, noise = ε.

    1. inpaint() starts from x_{t_1} = √ᾱ_{t_1} I_in + √(1-ᾱ_{t_1}) ε (Eq. 4 on I_in):
       on the masked region pure noise √ᾱ_{t_1} n + √(1-ᾱ_{t_1}) ε, with nothing of x.
    2. A perfect z_θ predicts x̃_0 = x (Eq. 9), i.e. ε̃ = (x_{t_1} - √ᾱ_{t_1} x) / √(1-ᾱ_{t_1}).
    3. The deterministic DDIM step (η = 0) to t' gives √ᾱ_{t'} x + √(1-ᾱ_{t'}) ε̃, where
       z_θ again predicts x̃_0 = x, hence the same ε̃: by induction every state is

           x_t = √ᾱ_t x + √(1-ᾱ_t) ε̃,   ε̃ = ε + √(ᾱ_{t_1}/(1-ᾱ_{t_1})) (n - x) on M = 0,

       and ε̃ = ε on the known region (which Eqs. 13-15 re-sample from q(x_t | x_0)).

    So after the first step the masked region is *not* q(x_t | x) (Eq. 8's state, Eq. 12
    as printed, ε ~ N(0, I)): given x its noise ε̃ has std 1/√(1-ᾱ_{t_1}) (1.45 at
    t_1 = 250, 1.71 at 200) instead of 1, a mean -√(ᾱ_{t_1}/(1-ᾱ_{t_1})) x, and a part
    in n that z_θ can read from I_in. Training draws exactly this (x_t, ε̃), target ε̃, so training and the
    refinement agree. A pass from t_1 never visits t > t_1; there we use the first state
    of a pass started at t (start max(t, t_1): the noise fill forwarded, q(x_t | I_in)),
    our choice. [B, 3, H, W]; t [B]; start an int or [B]."""
    start = torch.maximum(t, torch.as_tensor(start, device=t.device).expand_as(t))
    x_start = diffusion.q_sample(condition, start, noise)  # 1. x_{t_1}
    eps = diffusion.predict_eps_from_x0(x_start, start, images)  # 2. ε̃
    return RefinementState(diffusion.q_sample(images, t, eps), eps)  # 3. x_t


def combine_sets(x0_predictions: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """I_out^{t,c} (DRDC Eq. 10): each set's inpainted pixels (1 - M_i) ⊙ x̃_0 put together.

    Eq. 10 writes a 1/n_s in front of the sum. For disjoint covering sets every pixel
    is inpainted by exactly one set, so a literal 1/n_s would only shrink the image
    towards 0 and make Eq. 11 compare I_ori with I_out / n_s; we read the factor as the
    average over the sets that inpaint a pixel and divide by that count (1 for a
    partition). x0_predictions [..., n_s, B, 3, H, W], known [n_s, B, 1, H, W] ->
    [..., B, 3, H, W]."""
    unknown = 1 - known
    return (unknown * x0_predictions).sum(dim=-5) / unknown.sum(dim=0).clamp(min=1)


# ---------------------------------------------------------------------------------------
# §3.1, §4.2, §4.4: heatmaps and their fusion
# ---------------------------------------------------------------------------------------


def distance_map(a: torch.Tensor, b: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """U(‖D(a, 1/l) - D(b, 1/l)‖₂, l): channel-wise L2 distance at 1/l resolution,
    brought back to the input resolution (DRDC Eq. 16; l = 1 is Eq. 11 for images and
    Eq. 2 for features). a, b [B, C, H, W] -> [B, H, W].

    The paper does not name D and U; we use area averaging for D (exact block means
    when l divides the size, no aliasing) and bilinear interpolation for U."""
    height, width = a.shape[-2:]
    if scale > 1:
        small = (max(1, height // scale), max(1, width // scale))
        a, b = F.interpolate(a, size=small, mode="area"), F.interpolate(b, size=small, mode="area")
    distance = (a - b).pow(2).sum(dim=1, keepdim=True).sqrt()  # [B, 1, h', w']
    if distance.shape[-2:] != (height, width):
        distance = F.interpolate(distance, size=(height, width), mode="bilinear", align_corners=False)
    return distance[:, 0]


def base_heatmap(features: torch.Tensor, reconstruction: torch.Tensor, scales: tuple[int, ...] = (1,)) -> torch.Tensor:
    """H_base = ‖F_in - F_out‖₂ (DRDC Eq. 2), [B, h, w]; with several ``scales`` the mean
    of the Eq. 16 maps over them (Table 5's "multi-scale in base heatmap")."""
    return torch.stack([distance_map(features, reconstruction, s) for s in scales]).mean(dim=0)


def spatiotemporal_heatmap(original: torch.Tensor, inpainted: list[torch.Tensor], scales: tuple[int, ...]) -> torch.Tensor:
    """H_diff^ST (DRDC Eq. 17): the per-pixel mean of H_diff^{t,c,l} (Eq. 16) over every
    inpainted image I_out^{t,c} in ``inpainted`` (each [B, 3, H, W]) and every scale l.
    -> [B, H, W]"""
    maps = [distance_map(original, out, scale) for out in inpainted for scale in scales]
    return torch.stack(maps).mean(dim=0)


def mean_filter(heatmap: torch.Tensor, size: int) -> torch.Tensor:
    """H * f_{m×m} (DRDC Eq. 18): m×m box filter, [B, H, W] -> [B, H, W]. The paper does
    not say how borders are handled; we average over the window's pixels inside the
    image (no zero padding, which would darken the borders)."""
    if size == 1:
        return heatmap
    return F.avg_pool2d(heatmap.unsqueeze(1), size, stride=1, padding=size // 2, count_include_pad=False)[:, 0]


def fuse_heatmaps(base: torch.Tensor, diffusion_map: torch.Tensor, gamma: float, feature_channels: int, image_channels: int = IMAGE_CHANNELS) -> torch.Tensor:
    """H_out = (1 - γ) H_base / C_feat + γ H_diff^SST / C_img (DRDC Eq. 19), each map
    divided by the channel count of what its L2 norm was taken over. [B, H, W]"""
    return (1 - gamma) * base / feature_channels + gamma * diffusion_map / image_channels


def image_score(heatmap: torch.Tensor, pool_size: int) -> torch.Tensor:
    """Image anomaly score: the maximum of the average-pooled H_out (DRDC §4.4;
    UniAD's stride-1 pooling). [B, H, W] -> [B]"""
    pooled = F.avg_pool2d(heatmap.unsqueeze(1), pool_size, stride=1)
    return pooled.flatten(1).amax(dim=1)


# ---------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------


class DRDC(AnomalyMethod):
    """Base model + diffusion refinement with dual conditions + spatio-temporal fusion."""

    Config: ClassVar[type[MethodConfig]] = DRDCConfig
    multi_class: ClassVar[bool] = True
    # the transformer's heads were num_heads until the UNet got its own (head_channels)
    renamed_fields: ClassVar[dict[str, str]] = {"num_heads": "transformer_heads"}
    training_synthesis: ClassVar[tuple[str, ...]] = ("grid_cells_gaussian_noise", "feature_jitter")  # inpainting masks (§4.3), UniAD jitter
    paper_speed: ClassVar[str] = "not reported"
    paper_parameters: ClassVar[str] = "not stated (no public code)"  # checked in ../shared/papers/
    paper_backbone: ClassVar[str | None] = "efficientnet_b4"  # §5
    # Inference fields along the paper's own ablation axes; declared 2026-12-07, before any measurement on the generality set v2.
    selection_grid: ClassVar[tuple[dict[str, Any], ...]] = ({}, {"gamma": 0.9}, {"gamma": 1.0}, {"fusion": "temporal"}, {"score_pool_size": 9})
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        # CPU minutes, all synthetic categories in one model, at the data's native 128 px.
        # F_in is 8x8 (stride 16, as the paper's 14x14 at 224) so the transformer has 64
        # tokens, but built from 128 px input with area resizing: bilinear resizing of
        # the stride-2/4 stages aliases texture (a nearest-neighbour probe on F_in gave
        # gravel image AUROC 0.69 bilinear vs 0.93 area; 64 px input with area: 0.79).
        # Paper sizes scaled by 128/224: grid cells 1 and 16 (32 px cells would be a
        # quarter of the image), scales 1, 2, 4, m = 23 (41 · 128/224 ≈ 23). Three
        # reverse steps from t = 200 and training t ≤ 300, since only those are ever
        # evaluated. A small, 4-level UNet (base width 8: the 128 px UNet dominates the
        # cost), a small transformer, higher learning rates, 20 epochs.
        # γ = 0.5 instead of the paper's 0.9: after 20 epochs (the paper trains 1000) the
        # diffusion map alone reaches only ~0.75 image AUROC against the base map's 0.91
        # (seed 0), and at γ = 0.9 it pulls the fused map down to ~0.81; γ = 0.5 gives
        # 0.89. Pool 5 (≈ 0.89) measured against 9 (≈ 0.88, the paper's 16 · 128/224).
        # Measured on the synthetic dataset: see tests/test_drdc_learning.py.
        "smoke": {
            "image_size": 128,
            "epochs": 20,
            "batch_size": 16,
            "backbone": "efficientnet_lite0",
            "feature_stride": 16,
            "feature_resize": "area",
            "hidden_dim": 64,
            "transformer_heads": 4,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "ffn_dim": 128,
            "neighbor_size": 3,
            "train_grid_sizes": (1, 16),
            "train_max_timestep": 300,
            "train_start_timestep": 200,  # the first of the reverse steps below
            "base_channels": 8,  # a 128 px training step costs ~0.7 s CPU at 8, ~1.3 s at 16
            "channel_mult": (1, 2, 2, 4),
            "layers_per_block": 1,
            "attention_resolutions": (16,),
            "head_channels": 16,
            "norm_groups": 4,
            "learning_rate": 3e-3,  # features have norm ~100: 1e-3 left L_feat far from converged
            "diffusion_learning_rate": 1e-3,
            "lr_decay_epoch": None,
            "gamma": 0.5,
            "timesteps": (200, 100, 0),
            "grid_sizes": (1, 16),
            "scales": (1, 2, 4),
            "mean_filter_size": 23,
            "score_pool_size": 5,
        },
    }

    @classmethod
    def minimal_sampling(cls, config: MethodConfig) -> dict[str, Any]:
        # One DDIM jump from the first timestep to the last (a schedule of one or two steps is
        # already minimal); n_s stays (it partitions the image into cells inpainted in turn:
        # a coverage, not a number of samples).
        steps = tuple(config.timesteps)
        return {"timesteps": (steps[0], steps[-1])} if len(steps) > 2 else {}

    def __init__(self, config: DRDCConfig, backbone_factory: BackboneFactory | None = None):
        super().__init__(config, backbone_factory)
        if backbone_factory is None:
            raise ValueError("DRDC needs a backbone_factory (name -> feature extractor) for its frozen base-model backbone")
        self.config: DRDCConfig = config
        backbone = backbone_factory(config.backbone)
        channels = list(backbone.channels)
        if config.backbone_stages[-1] > len(channels):
            raise ValueError(f"backbone_stages {config.backbone_stages} exceed the {len(channels)} stages of {config.backbone}")
        self.backbone = backbone.eval().requires_grad_(False)  # frozen (§3.1: "fixed weights")
        self.feature_channels = sum(channels[s - 1] for s in config.backbone_stages)  # C_feat of Eq. 19
        self.reconstructor = FeatureReconstructionTransformer(
            channels=self.feature_channels,
            size=config.feature_size,
            hidden_dim=config.hidden_dim,
            num_heads=config.transformer_heads,
            num_encoder_layers=config.encoder_layers,
            num_decoder_layers=config.decoder_layers,
            ffn_dim=config.ffn_dim,
            dropout=config.transformer_dropout,
            neighbor_size=config.neighbor_size,
            num_categories=config.num_categories if config.category_query else 0,
        )
        self.unet = UNet.from_config(
            config,
            in_channels=2 * IMAGE_CHANNELS if config.model_condition else IMAGE_CHANNELS,  # + I_in (model condition)
            out_channels=IMAGE_CHANNELS,
        )
        self.diffusion = GaussianDiffusion(config.num_timesteps, config.beta_schedule)
        if config.model_condition and config.timesteps[0] != config.train_start_timestep:
            log.warning("DRDC: the refinement pass starts at t=%d but training imitated a pass from t=%d (train_start_timestep): "
                        "its later states are off the training distribution", config.timesteps[0], config.train_start_timestep)

    def train(self, mode: bool = True) -> "DRDC":
        """The backbone is frozen: it stays in eval mode (BatchNorm statistics fixed)."""
        super().train(mode)
        self.backbone.eval()
        return self

    # --- base model ------------------------------------------------------------------

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """F_in: the chosen backbone stages resized to h×w and concatenated (§5). [B, C_feat, h, w]"""
        with torch.no_grad():
            stages = self.backbone(images, num_stages=self.config.backbone_stages[-1])  # skip unused deeper stages
            return resize_and_concatenate([stages[s - 1] for s in self.config.backbone_stages], self.config.feature_size, self.config.feature_resize)

    @staticmethod
    def feature_loss(features: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """L_feat = ‖F_in - F_out‖₂² / (H_feat W_feat) (DRDC Eq. 1): the squared error
        summed over channels, averaged over positions (and over the batch)."""
        return (features - reconstruction).pow(2).sum(dim=1).mean()

    # --- training ----------------------------------------------------------------------

    def forward(self, batch: TrainBatch) -> Losses:
        """L_feat (Eq. 1) for the transformer plus L_diff (Eq. 12) for the ε-network."""
        config = self.config
        images = batch.images
        b, device = images.shape[0], images.device

        features = self.extract_features(images)
        jittered = feature_jitter(features, config.feature_jitter_scale, config.feature_jitter_prob)
        reconstruction = self.reconstructor(jittered, batch.category)
        loss_feat = self.feature_loss(features, reconstruction)

        t_max = config.num_timesteps - 1 if config.train_max_timestep is None else config.train_max_timestep
        t = torch.randint(0, t_max + 1, (b,), device=device)
        noise = torch.randn_like(images)
        if config.model_condition:
            masks = random_training_masks(b, *images.shape[-2:], config.train_grid_sizes, config.train_num_sets, device)
            condition = noised_condition(images, masks, torch.randn_like(images))
            loss_diff = self.inpainting_loss(images, condition, t, noise)
        else:  # Table 5's "w/o model condition": the plain DDPM of Eq. 8
            loss_diff = F.mse_loss(self.unet(self.diffusion.q_sample(images, t, noise), t), noise)

        total = loss_feat + loss_diff
        return Losses(total, {"L_feat": loss_feat.detach(), "L_diff": loss_diff.detach()})

    def inpainting_loss(self, images: torch.Tensor, condition: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """L_diff = E‖ε̃ - z_θ(x_t, I_in, t)‖² (DRDC Eq. 12) on the states the refinement pass
        visits (:func:`refinement_state`, started at ``train_start_timestep``), mean over
        pixels. images = x, condition = I_in [B, 3, H, W]; t [B]; noise = ε [B, 3, H, W]."""
        state = refinement_state(self.diffusion, images, condition, t, self.config.train_start_timestep, noise)
        return F.mse_loss(self.unet(torch.cat([state.x_t, condition], dim=1), t), state.eps)

    def configure_optimizers(self) -> Optimizers:
        """AdamW with weight decay 1e-4 for both networks (§5); per-network learning rates."""
        config = self.config
        optimizer = torch.optim.AdamW(
            [
                {"params": list(self.reconstructor.parameters()), "lr": config.learning_rate},
                {"params": list(self.unet.parameters()), "lr": config.diffusion_learning_rate},
            ],
            weight_decay=config.weight_decay,
        )
        scheduler = None
        if config.lr_decay_epoch is not None:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_decay_epoch, gamma=config.lr_decay_factor)
        return Optimizers(optimizer, scheduler)

    # --- inference -----------------------------------------------------------------------

    def diffusion_heatmap(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """H_diff^SST (DRDC Eqs. 9-11, 16-18): for every grid size c, partition the cells
        into n_s sets, inpaint each set in one batched reverse pass, combine the sets
        (Eq. 10) at every timestep, then average the distance maps over timesteps, grid
        sizes and scales (Eq. 17) and mean-filter (Eq. 18). [B, 3, H, W] -> [B, H, W].

        ``config.fusion`` picks the timesteps (all, or the final prediction) and scales
        (all, or l = 1) that are averaged; the grid sizes (the inpainting
        specifications, without which there is no map) are always averaged and Eq. 18
        always smooths, since neither is the "spatio-temporal" part of §4.4."""
        config = self.config
        b, _, height, width = images.shape
        n_s = config.num_sets
        inpainted: list[torch.Tensor] = []
        for cell in config.grid_sizes:
            masks = known_masks(grid_partition(b, height, width, cell, n_s, generator, images.device), n_s)  # [n_s, B, 1, H, W]
            original = images.unsqueeze(0).expand(n_s, -1, -1, -1, -1).reshape(n_s * b, *images.shape[1:])
            trajectory = inpaint(
                self.unet,
                self.diffusion,
                original,
                masks.reshape(n_s * b, 1, height, width),
                _randn(tuple(original.shape), generator, images.device),
                config.timesteps,
                model_condition=config.model_condition,
                test_time_condition=config.test_time_condition,
                clip_denoised=config.clip_denoised,
                generator=generator,
            )
            x0 = torch.stack(trajectory.x0_predictions).view(len(config.timesteps), n_s, b, *images.shape[1:])
            outputs = combine_sets(x0, masks)  # [n_t, B, 3, H, W] = I_out^{t,c}
            all_steps = config.fusion in (Fusion.SPATIOTEMPORAL, Fusion.TEMPORAL)
            inpainted.extend(outputs.unbind(0) if all_steps else [outputs[-1]])
        scales = config.scales if config.fusion in (Fusion.SPATIOTEMPORAL, Fusion.SPATIAL) else (1,)
        return mean_filter(spatiotemporal_heatmap(images, inpainted, scales), config.mean_filter_size)

    def infer(self, images: torch.Tensor, category: torch.Tensor | None, generator: torch.Generator) -> Prediction:
        """H_out (Eq. 19) at the input resolution and the image score (§4.4). Randomness
        (grid partitions, noise) comes from ``generator``; the global RNG is never touched."""
        config = self.config
        height, width = images.shape[-2:]
        features = self.extract_features(images)
        reconstruction = self.reconstructor(features, category)
        base = base_heatmap(features, reconstruction, config.scales if config.multiscale_base else (1,))
        base = F.interpolate(base.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        if config.gamma > 0:
            refined = self.diffusion_heatmap(images, generator)
        else:  # γ = 0: Eq. 19 ignores the diffusion branch, so skip its reverse passes
            refined = torch.zeros_like(base)
        fused = fuse_heatmaps(base, refined, config.gamma, self.feature_channels)
        return Prediction(fused, image_score(fused, config.score_pool_size))
