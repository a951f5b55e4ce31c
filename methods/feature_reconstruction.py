"""UniAD-style feature reconstruction transformer: DRDC's base model (DRDC §3.1, §5).

DRDC builds its base model on UniAD (You et al., NeurIPS 2022): frozen multi-stage
backbone features, resized to one low resolution and concatenated, are reconstructed
by a transformer whose decoder is driven by layer-wise learned query embeddings; the
reconstruction error is the base heatmap. This module is the transformer only (no
backbone): ``forward(features [B, C, h, w]) -> reconstruction [B, C, h, w]``.

Notation (code name -> symbol):

    features         F_in   [B, C_feat, h, w]   frozen backbone features
    reconstruction   F_out  [B, C_feat, h, w]
    tokens                  [B, h*w, D]         one token per feature position
    neighbor_size    UniAD's neighbour-masked attention window (a token may not attend
                     to the k×k positions around itself, so it cannot copy them)
    jitter           UniAD's feature jittering: training-only noise on F_in whose
                     reconstruction target stays the clean F_in

UniAD's recipe (what the DRDC paper inherits but does not restate): post-norm layers,
learned row/column position embeddings, a fresh learned query per decoder layer that
attends to the encoder memory and then to the previous decoder output, neighbour mask
7×7 on every attention, hidden 256, 8 heads, 4 + 4 layers, FFN 1024, dropout 0.1,
jitter scale 20, Xavier-uniform weights.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn


def neighbor_mask(size: int, neighbor_size: int) -> torch.Tensor | None:
    """Boolean attention mask [size², size²], True where a query may NOT attend: the
    ``neighbor_size`` × ``neighbor_size`` window centred on the query (UniAD's
    neighbour-masked attention). None when ``neighbor_size`` is 0 (no mask)."""
    if neighbor_size == 0:
        return None
    rows = torch.arange(size).repeat_interleave(size)  # [size²] row of each token
    cols = torch.arange(size).repeat(size)
    half = neighbor_size // 2
    blocked = ((rows[:, None] - rows[None, :]).abs() <= half) & ((cols[:, None] - cols[None, :]).abs() <= half)
    if blocked.all(dim=1).any():
        raise ValueError(f"neighbor_size={neighbor_size} masks every token of a {size}x{size} feature map; use a smaller odd size")
    return blocked


def max_neighbor_size(size: int) -> int:
    """The largest odd neighbour window that leaves every token of a size×size map
    something to attend to (the middle token is the worst case)."""
    return 2 * (size // 2) - 1 if size > 1 else 0


class LearnedPositionEmbedding(nn.Module):
    """Learned 2-D position embedding: [row embedding | column embedding] per token (UniAD's "learned")."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"position embedding dim must be even, got {dim}")
        self.size = size
        self.rows = nn.Parameter(torch.rand(size, dim // 2))
        self.cols = nn.Parameter(torch.rand(size, dim // 2))

    def forward(self) -> torch.Tensor:
        """[size², dim]"""
        n = self.size
        return torch.cat([self.rows[:, None, :].expand(n, n, -1), self.cols[None, :, :].expand(n, n, -1)], dim=-1).reshape(n * n, -1)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer; position embedding added to queries and keys."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        qk = x + pos
        x = self.norm1(x + self.dropout1(self.attention(qk, qk, x, attn_mask=mask, need_weights=False)[0]))
        return self.norm2(x + self.dropout2(self.ffn(x)))


class QueryDecoderLayer(nn.Module):
    """UniAD's decoder layer: its own learned query (one per token position) attends to
    the encoder memory, then to the previous decoder output, then an FFN (post-norm).
    The query never sees the input token at its own position directly, which is what
    keeps the transformer from learning the identity."""

    def __init__(self, num_tokens: int, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.query = nn.Parameter(torch.empty(num_tokens, dim))
        self.memory_attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.previous_attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(
        self,
        previous: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        mask: torch.Tensor | None,
        query_offset: torch.Tensor | None,
    ) -> torch.Tensor:
        batch = memory.shape[0]
        q = self.query.unsqueeze(0).expand(batch, -1, -1)  # [B, L, D]
        if query_offset is not None:  # optional category embedding [B, 1, D]
            q = q + query_offset
        attended = self.memory_attention(q + pos, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
        q = self.norm1(q + self.dropout1(attended))
        attended = self.previous_attention(q + pos, previous + pos, previous, attn_mask=mask, need_weights=False)[0]
        q = self.norm2(q + self.dropout2(attended))
        return self.norm3(q + self.dropout3(self.ffn(q)))


class FeatureReconstructionTransformer(nn.Module):
    """Reconstructs F_in [B, C, h, w] (h = w = ``size``) into F_out of the same shape.

    ``num_categories`` > 0 adds a learned per-category vector to every decoder query
    (an explicit category condition; ``forward`` then needs ``category``). With 0 the
    queries are category-agnostic, as in UniAD's unified setting."""

    def __init__(
        self,
        channels: int,
        size: int,
        hidden_dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        neighbor_size: int = 7,
        num_categories: int = 0,
    ):
        super().__init__()
        self.size = size
        mask = neighbor_mask(size, neighbor_size)
        self.register_buffer("attention_mask", mask, persistent=False)
        self.input_projection = nn.Linear(channels, hidden_dim)
        self.output_projection = nn.Linear(hidden_dim, channels)
        self.position = LearnedPositionEmbedding(size, hidden_dim)
        self.encoder = nn.ModuleList(EncoderLayer(hidden_dim, num_heads, ffn_dim, dropout) for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(
            QueryDecoderLayer(size * size, hidden_dim, num_heads, ffn_dim, dropout) for _ in range(num_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.category_embedding = nn.Embedding(num_categories, hidden_dim) if num_categories > 0 else None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # UniAD initialises every weight matrix Xavier-uniform; this also covers the
        # learned queries ([L, D] matrices). Position embeddings stay U(0, 1) as in DETR.
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith("position."):
                nn.init.xavier_uniform_(p)

    def forward(self, features: torch.Tensor, category: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = features.shape
        if h != self.size or w != self.size:
            raise ValueError(f"feature map {h}x{w} does not match the transformer's {self.size}x{self.size}")
        tokens = self.input_projection(features.flatten(2).transpose(1, 2))  # [B, L, D]
        pos = self.position().unsqueeze(0)  # [1, L, D]
        mask = self.attention_mask
        memory = tokens
        for layer in self.encoder:
            memory = layer(memory, pos, mask)
        offset = None
        if self.category_embedding is not None:
            if category is None:
                raise ValueError("this base model was built with a category query: pass category to forward/predict")
            offset = self.category_embedding(category).unsqueeze(1)  # [B, 1, D]
        out = memory
        for layer in self.decoder:
            out = layer(out, memory, pos, mask, offset)
        out = self.output_projection(self.decoder_norm(out))  # [B, L, C]
        return out.transpose(1, 2).reshape(b, c, h, w)


def feature_jitter(features: torch.Tensor, scale: float, probability: float) -> torch.Tensor:
    """UniAD feature jittering: with the given probability per sample, add to each
    feature vector f (one position, C channels) Gaussian noise of std scale·‖f‖₂ / C.
    Uses torch's global RNG (training only)."""
    if scale == 0 or probability == 0:
        return features
    channels = features.shape[1]
    norms = features.norm(dim=1, keepdim=True) / channels  # [B, 1, h, w]
    apply = (torch.rand(features.shape[0], 1, 1, 1, device=features.device) < probability).to(features.dtype)
    return features + apply * torch.randn_like(features) * norms * scale


class FeatureResize(str, Enum):
    """How each backbone stage is brought to the common F_in resolution."""

    BILINEAR = "bilinear"  # UniAD's resampling (align-corners bilinear, also when shrinking)
    AREA = "area"  # block averages when shrinking (anti-aliased); bilinear when enlarging


def resize_and_concatenate(stages: list[torch.Tensor], size: int, mode: FeatureResize | str = FeatureResize.BILINEAR) -> torch.Tensor:
    """F_in: each stage map resized to size×size and concatenated along channels (DRDC
    §5: "resized to 14×14, and concatenated"). [B, Σ C_s, size, size]

    The paper does not say how. UniAD, whose base model DRDC reuses, resamples
    bilinearly with aligned corners, which when shrinking (112 -> 14 at stride 2) reads
    one pixel in 64 and aliases; ``AREA`` averages the covered block instead."""
    mode = FeatureResize(mode)
    resized = []
    for s in stages:
        if s.shape[-2:] == (size, size):
            resized.append(s)
        elif mode is FeatureResize.AREA and s.shape[-1] >= size and s.shape[-2] >= size:
            resized.append(F.adaptive_avg_pool2d(s, size))
        else:
            resized.append(F.interpolate(s, size=(size, size), mode="bilinear", align_corners=True))
    return torch.cat(resized, dim=1)
