"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

The training-free reference: nothing is learnt by gradient descent. Mid-level features of a
frozen ImageNet backbone, averaged over each position's 3×3 neighbourhood (§3.1, "locally
aware patch features"), are collected from every normal training image into a memory bank
(§3.1), which is reduced by greedy k-center coreset selection (§3.2, Algorithm 1). A test
patch's anomaly score is its distance to the nearest bank entry; the image score is the
largest patch score (§3.3, Eq. 6), optionally reweighted (Eq. 7).

Notation (code name -> paper symbol):

    backbone(images)[stage]   φ_j(x)           frozen features of hierarchy level j
    config.feature_strides    j ∈ {2, 3}       levels used, by stride (WRN-50 layer2, layer3 = 8, 16)
    config.patch_size         p                neighbourhood of the local aggregation (§3.1: 3)
    patch_features(images)    P_{s,p}(φ_j)     locally aware patch features, levels concatenated
    memory_bank               M / M_C          the bank (all patches), then its coreset
    config.coreset_ratio      |M_C| / |M|      §4.1: 1 %, 10 %, 25 %
    config.projection_dim     ψ                random projection used only for coreset distances
    nearest_patch_distances   s*               ‖m^test − m*‖₂ per test patch (Eq. 6)

How the bank fits the method contract (methods/base.py): ``configure_optimizers`` returns
None, so the training loop runs ``forward`` without gradients over one epoch of training
batches; each call appends its patch features. The coreset needs the complete bank, and no
hook of the loop says "the epoch is over", so it is built lazily by the first ``infer``
(the orchestrator evaluates before it stores the model, so stored models hold the coreset).
Its size is ``ceil(coreset_ratio × patches seen)``, so building it again is a no-op. The
bank's size is only known after training: ``_load_from_state_dict`` resizes the buffer to
the stored one, so a freshly built model loads any trained bank.

Choices (each a config field where it can be ablated):

* Backbone: the paper's WideResNet-50 is not among methods/backbones.py's extractors
  (adding it would change the model key of every method that imports that module); the
  offline EfficientNet-Lite0 at strides 8 and 16 stands in for WRN-50 layer2 + layer3, and
  ``backbone=wide_resnet101_2`` (the PatchCore paper's other WideResNet) where torchvision
  and its weights are present.
* The 3×3 aggregation is an average pooling that ignores padding at the border; the
  official code's extra adaptive pooling of the channels to 1024 is not applied (the bank
  keeps every channel).
* The coreset starts from a random patch (Algorithm 1) drawn from a generator seeded with
  0, and its random projection comes from that generator too: a bank does not depend on
  when or where it is built.
* The image score is the maximum patch score (``image_score=max``, what the official code
  does); ``image_score=reweighted`` applies Eq. 7 with b = ``reweight_neighbours``.
* With several DDP workers each rank sees its share of the images and rank 0's bank is
  stored: train PatchCore with ``trial.workers=1``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from methods.backbones import backbone_strides
from methods.base import AnomalyMethod, BackboneFactory, Losses, MethodConfig, Prediction, TrainBatch, check, infer_field, train_field
from methods.scoring import gaussian_blur

log = logging.getLogger(__name__)

CORESET_SEED = 0  # seeds Algorithm 1's random start and projection ψ


class ImageScore(str, Enum):
    """How the patch scores of an image become its score (§3.3)."""

    MAX = "max"  # s* of Eq. 6: the largest patch score (the official code)
    REWEIGHTED = "reweighted"  # Eq. 7: s* scaled by how isolated m* is in the bank


@dataclass(frozen=True)
class PatchCoreConfig(MethodConfig):
    """PatchCore's settings; defaults are the paper's (§4.1) where it gives them."""

    image_size: int = train_field(256, "resize side in pixels (§4.1: 256)")
    crop_size: int | None = train_field(224, "centre crop side after resizing; None = no crop (§4.1: 224)")
    epochs: int = train_field(1, "passes over the training images: 1 fills the memory bank (more would add duplicates)")
    batch_size: int = train_field(1, "images per forward call; 1 keeps every image (the training loop drops an incomplete final batch)")
    backbone: str = train_field(
        "efficientnet_lite0",
        "frozen ImageNet backbone: efficientnet_lite0 (offline default, stands in for the paper's wide_resnet50_2) | wide_resnet101_2 (needs torchvision + weights)",
    )
    feature_strides: tuple[int, ...] = train_field((8, 16), "backbone levels whose features are concatenated, by stride (§4.1: WRN-50 layer2 + layer3 = strides 8, 16)")
    patch_size: int = train_field(3, "p: side of the neighbourhood averaged into each patch feature (§3.1: 3), odd")
    coreset_ratio: float = train_field(0.01, "|M_C| / |M|: share of the bank kept by the greedy coreset (§4.1: PatchCore-1%; 1 = no subsampling)")
    projection_dim: int | None = train_field(128, "dimension of the random projection ψ used for coreset distances (§3.2: 128); None = exact distances")
    blur_sigma: float = infer_field(4.0, "σ in pixels of the Gaussian blur of the upsampled map (§3.3: 4; 0 = none)")
    image_score: ImageScore = infer_field(ImageScore.MAX, "image score: max (Eq. 6, the official code) | reweighted (Eq. 7)")
    reweight_neighbours: int = infer_field(3, "b of Eq. 7: bank neighbours of m* in the reweighting (not given in the paper)")
    chunk_size: int = infer_field(4096, "rows per torch.cdist call in the nearest-neighbour search (memory ~ chunk_size² floats); results do not depend on it")

    def validate(self) -> None:
        super().validate()
        check(self.epochs == 1, f"epochs must be 1 for PatchCore (one pass fills the memory bank), got {self.epochs}")
        strides = backbone_strides(self.backbone)  # ValueError naming the valid backbones
        check(
            len(self.feature_strides) > 0 and all(s in strides for s in self.feature_strides) and list(self.feature_strides) == sorted(set(self.feature_strides)),
            f"feature_strides must be increasing strides of {self.backbone}'s stages {strides}, got {self.feature_strides}",
        )
        check(self.input_size >= self.feature_strides[-1], f"input size {self.input_size} must be >= the largest feature stride {self.feature_strides[-1]}")
        check(self.patch_size >= 1 and self.patch_size % 2 == 1, f"patch_size must be odd and >= 1, got {self.patch_size}")
        check(0.0 < self.coreset_ratio <= 1.0, f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        check(self.projection_dim is None or self.projection_dim >= 1, f"projection_dim must be None or >= 1, got {self.projection_dim}")
        check(self.blur_sigma >= 0, f"blur_sigma must be >= 0, got {self.blur_sigma}")
        check(self.reweight_neighbours >= 1, f"reweight_neighbours b must be >= 1, got {self.reweight_neighbours}")
        check(self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}")


# --------------------------------------------------------------------------------------
# Locally aware patch features (§3.1).


def locally_aware_features(feature_map: torch.Tensor, patch_size: int) -> torch.Tensor:
    """φ(N_p^(h,w)): each position's feature averaged over its p × p neighbourhood
    (PatchCore §3.1, Eq. 2, f_agg = average pooling). Border windows average only the
    positions inside the map. [B, C, h, w] -> [B, C, h, w]."""
    if patch_size == 1:
        return feature_map
    return F.avg_pool2d(feature_map, patch_size, stride=1, padding=patch_size // 2, count_include_pad=False)


def combine_levels(feature_maps: list[torch.Tensor]) -> torch.Tensor:
    """The levels at the first (finest) level's grid, deeper ones upsampled bilinearly,
    concatenated over channels (§3.1). [B, C_j, h_j, w_j] per level -> [B, Σ C_j, h_1, w_1]."""
    size = feature_maps[0].shape[-2:]
    resized = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feature_maps]
    return torch.cat(resized, dim=1)


# --------------------------------------------------------------------------------------
# Memory bank reduction (§3.2, Algorithm 1).


def random_projection(features: torch.Tensor, dim: int | None, generator: torch.Generator) -> torch.Tensor:
    """ψ: a Gaussian random projection to ``dim`` dimensions (Johnson-Lindenstrauss, §3.2),
    or the features as they are when ``dim`` is None or not smaller. [N, D] -> [N, d]."""
    if dim is None or dim >= features.shape[1]:
        return features
    matrix = torch.randn(features.shape[1], dim, generator=generator, device=generator.device, dtype=features.dtype).to(features.device)
    return features @ matrix / math.sqrt(dim)


def greedy_coreset(features: torch.Tensor, count: int, start: int = 0) -> torch.Tensor:
    """Indices of ``count`` rows chosen by greedy k-center selection (PatchCore Algorithm 1):
    from ``start``, repeatedly add the row farthest from those chosen so far, which
    approximately minimises the largest distance of any row to its nearest chosen one
    (Eq. 4). features [N, d] (already projected by ψ) -> long [count]."""
    count = min(count, features.shape[0])
    squared_norms = features.pow(2).sum(1)

    def squared_distances_to(i: int | torch.Tensor) -> torch.Tensor:
        # ‖m − c‖² = ‖m‖² − 2 m·c + ‖c‖²: one matrix-vector product per center (~30x faster
        # than torch.cdist against one row); squares order like distances.
        return (squared_norms - 2 * features @ features[i] + squared_norms[i]).clamp_min(0)

    chosen = torch.empty(count, dtype=torch.long, device=features.device)
    chosen[0] = start
    nearest = squared_distances_to(start)  # min over chosen centers c of ‖m − c‖² for every row m
    for k in range(1, count):
        chosen[k] = torch.argmax(nearest)
        nearest = torch.minimum(nearest, squared_distances_to(chosen[k]))  # a tensor index: no device sync
    return chosen


# --------------------------------------------------------------------------------------
# Anomaly scoring (§3.3).


def nearest_patch_distances(queries: torch.Tensor, bank: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """s* per query: ‖m^test − m*‖₂ with m* = argmin_{m ∈ M} ‖m^test − m‖₂ (PatchCore
    Eq. 6, inner arg min), by torch.cdist over chunk_size × chunk_size blocks so memory
    stays bounded. queries [Q, D], bank [M, D] -> (distances [Q], indices of m* [Q])."""
    distances = torch.empty(queries.shape[0], device=queries.device, dtype=queries.dtype)
    indices = torch.empty(queries.shape[0], device=queries.device, dtype=torch.long)
    for q in range(0, queries.shape[0], chunk_size):
        block = queries[q : q + chunk_size]
        best = torch.full((block.shape[0],), float("inf"), device=queries.device, dtype=queries.dtype)
        best_index = torch.zeros(block.shape[0], device=queries.device, dtype=torch.long)
        for m in range(0, bank.shape[0], chunk_size):
            values, where = torch.cdist(block, bank[m : m + chunk_size]).min(dim=1)
            better = values < best
            best = torch.where(better, values, best)
            best_index = torch.where(better, where + m, best_index)
        distances[q : q + chunk_size], indices[q : q + chunk_size] = best, best_index
    return distances, indices


def reweighted_score(test_patch: torch.Tensor, nearest_index: int, score: torch.Tensor, bank: torch.Tensor, neighbours: int) -> torch.Tensor:
    """s = (1 − exp‖m^test,* − m*‖₂ / Σ_{m ∈ N_b(m*)} exp‖m^test,* − m‖₂) · s* (PatchCore
    Eq. 7), N_b(m*) the b bank entries nearest to m* (m* itself among them). A test patch
    whose m* lies in a dense part of the bank keeps more of its score. test_patch [D] ->
    scalar."""
    m_star = bank[nearest_index]
    b = min(neighbours, bank.shape[0])
    neighbourhood = torch.cdist(m_star[None], bank)[0].topk(b, largest=False).indices
    to_neighbours = torch.cdist(test_patch[None], bank[neighbourhood])[0]
    # exp(s*) / Σ exp(d) computed as exp(s* − logsumexp(d)): no overflow for large distances.
    return (1 - torch.exp(score - torch.logsumexp(to_neighbours, dim=0))) * score


# --------------------------------------------------------------------------------------
# The model.


class PatchCore(AnomalyMethod):
    """A memory bank of locally aware patch features and nearest-neighbour scoring; one
    bank per category. Holds no trainable parameter: its state is the bank."""

    Config: ClassVar[type[MethodConfig]] = PatchCoreConfig
    paper_speed: ClassVar[str] = "not recorded here (PatchCore paper, scoring time per coreset size)"
    paper_parameters: ClassVar[str] = "not stated (nothing trained; WRN-50 backbone)"
    # §4.1; methods/backbones.py has no extractor for it, so each bench says what stands in (the config's efficientnet_lite0).
    paper_backbone: ClassVar[str | None] = "wide_resnet50_2"
    # Its feature choices too, since its "training" is one forward pass; declared 2026-12-07, before any
    # measurement on the generality set v2.
    selection_grid: ClassVar[tuple[dict[str, Any], ...]] = (
        {}, {"feature_strides": [4, 8]}, {"patch_size": 5}, {"image_score": "reweighted"}, {"blur_sigma": 4.0}, {"image_size": 256},
    )
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        # CPU seconds: the synthetic data's own 128 px (stride 8 gives a 16 × 16 patch grid;
        # 64 px would give 8 × 8), a 10 % coreset (1 % of ~20k patches would keep ~200),
        # σ = 4 at 224² scaled to 2 at 128².
        "smoke": {"image_size": 128, "crop_size": None, "coreset_ratio": 0.1, "blur_sigma": 2.0},
    }

    @classmethod
    def minimal_sampling(cls, config: MethodConfig) -> dict[str, Any]:
        return {}  # no sampling: one backbone pass and a nearest-neighbour search

    def __init__(self, config: PatchCoreConfig, backbone_factory: BackboneFactory | None = None):
        super().__init__(config, backbone_factory)
        if backbone_factory is None:
            raise ValueError("PatchCore needs a backbone_factory (name -> feature extractor) for its patch features")
        backbone = backbone_factory(config.backbone)
        strides = tuple(backbone.strides)
        self._stage_indices = [strides.index(s) for s in config.feature_strides]
        feature_dim = sum(backbone.channels[i] for i in self._stage_indices)
        # Kept out of the module tree (so out of state_dict): the frozen backbone is rebuilt
        # by the factory, the bank is the model's whole state.
        object.__setattr__(self, "_backbone", backbone)
        self.register_buffer("memory_bank", torch.zeros(0, feature_dim))  # [M, D]
        self.register_buffer("patches_seen", torch.zeros((), dtype=torch.long))  # |M| before the coreset
        self._pending: list[torch.Tensor] = []  # patch features of forward calls not yet in memory_bank
        log.info("PatchCore backbone %s, strides %s, %d-dimensional patch features", config.backbone, config.feature_strides, feature_dim)

    # ---------------------------------------------------------------- features

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features of every position (§3.1): [B, 3, H, W] in [-1, 1]
        -> [B, D, h, w] at the finest chosen stride."""
        backbone = self._backbone.to(images.device)
        stages = backbone(images, num_stages=max(self._stage_indices) + 1)
        levels = [locally_aware_features(stages[i], self.config.patch_size) for i in self._stage_indices]
        return combine_levels(levels)

    # ---------------------------------------------------------------- memory bank (§3.1-3.2)

    def forward(self, batch: TrainBatch) -> Losses:
        """Adds the batch's patch features to the memory bank M (§3.1, Eq. 3). Nothing is
        optimised: the loss is a constant zero, the term counts the patches added."""
        with torch.no_grad():
            features = self.patch_features(batch.images)  # [B, D, h, w]
            patches = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])  # [B·h·w, D]
        self._pending.append(patches)
        self.patches_seen += patches.shape[0]
        zero = torch.zeros((), device=batch.images.device)
        return Losses(zero, {"patches_added": torch.tensor(float(patches.shape[0]), device=zero.device)})

    def configure_optimizers(self) -> None:
        """Nothing is trained by gradient descent."""
        return None

    def _merge_pending(self) -> None:
        """Moves the features of earlier forward calls into the ``memory_bank`` buffer (one
        concatenation instead of one per batch)."""
        if self._pending:
            self.memory_bank = torch.cat([self.memory_bank, *[p.to(self.memory_bank) for p in self._pending]])
            self._pending = []

    def coreset_size(self) -> int:
        """|M_C| = ceil(coreset_ratio × |M|), at least 1."""
        return max(1, math.ceil(self.config.coreset_ratio * int(self.patches_seen)))

    def reduce_memory_bank(self) -> None:
        """M -> M_C by greedy coreset selection (§3.2, Algorithm 1), once the bank holds
        more than its coreset size; a bank already reduced is left alone."""
        self._merge_pending()
        target = self.coreset_size()
        if self.memory_bank.shape[0] <= target:
            return
        generator = torch.Generator().manual_seed(CORESET_SEED)
        start = int(torch.randint(0, self.memory_bank.shape[0], (1,), generator=generator))
        projected = random_projection(self.memory_bank, self.config.projection_dim, generator)
        chosen = greedy_coreset(projected, target, start)
        log.info("PatchCore coreset: %d of %d patches", target, self.memory_bank.shape[0])
        self.memory_bank = self.memory_bank[chosen].contiguous()

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        self._merge_pending()  # a state dict always holds every patch seen
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """The bank's size is only known once trained: resize the buffer to the stored
        bank's rows before the default copy (which still checks the feature dimension)."""
        stored = state_dict.get(prefix + "memory_bank")
        if stored is not None:
            self._pending = []
            self.memory_bank = torch.zeros(stored.shape[0], self.memory_bank.shape[1], device=self.memory_bank.device, dtype=self.memory_bank.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args)

    # ---------------------------------------------------------------- inference (§3.3)

    def infer(self, images: torch.Tensor, category: torch.Tensor | None, generator: torch.Generator) -> Prediction:
        """Anomaly map [B, H, W]: s* of every patch, upsampled bilinearly to the input
        size and blurred (σ = ``blur_sigma``); image score [B]: Eq. 6 or 7. Deterministic:
        ``generator`` is not needed."""
        c = self.config
        self.reduce_memory_bank()
        if self.memory_bank.shape[0] == 0:
            raise ValueError("PatchCore's memory bank is empty: run forward over the training images first (the training loop does)")
        bank = self.memory_bank.to(images.device)
        features = self.patch_features(images)  # [B, D, h, w]
        batch, dim, h, w = features.shape
        patches = features.permute(0, 2, 3, 1).reshape(-1, dim)  # [B·h·w, D]
        distances, nearest = nearest_patch_distances(patches, bank, c.chunk_size)
        patch_scores = distances.view(batch, h, w)
        score_map = F.interpolate(patch_scores[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        anomaly_map = gaussian_blur(score_map, c.blur_sigma)
        return Prediction(anomaly_map, self._image_scores(patches.view(batch, h * w, dim), distances.view(batch, -1), nearest.view(batch, -1), bank))

    def _image_scores(self, patches: torch.Tensor, distances: torch.Tensor, nearest: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """s* = max over an image's patches (Eq. 6), reweighted by Eq. 7 when asked.
        patches [B, P, D], distances and nearest [B, P] -> [B]."""
        scores, where = distances.max(dim=1)
        if self.config.image_score is ImageScore.MAX:
            return scores
        return torch.stack([
            reweighted_score(patches[i, where[i]], int(nearest[i, where[i]]), scores[i], bank, self.config.reweight_neighbours)
            for i in range(scores.shape[0])
        ])
