"""The shared denoising UNet (ADM / guided-diffusion style), built on diffusers' UNet2DModel.

Width, depth, attention resolutions and input channels are configurable so one builder
serves every method: TransFusion (5 input channels: x_t, previous mask, positional
encoding), DiffusionAD and MDPS (3-channel ε-prediction), DRDC (3 + 3 channels for the
model condition I_in).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def attention_levels(image_size: int, channel_mult: tuple[int, ...], attention_resolutions: tuple[int, ...]) -> list[bool]:
    """Per UNet level, whether it has self-attention. Level i works at image_size / 2^i
    pixels; attention is placed where that resolution is listed (guided-diffusion's
    ``attention_resolutions`` given in pixels rather than downsample factors)."""
    return [image_size // 2**i in attention_resolutions for i in range(len(channel_mult))]


class UNet(nn.Module):
    """ε-style UNet: ``forward(x [B, in, H, W], t [B]) -> [B, out, H, W]``.

    Each level has ``layers_per_block`` residual blocks (+ attention where asked); levels
    are separated by 2x down/up-sampling; the middle block always has attention, as in
    ADM. ``head_channels`` is the width of each attention head (ADM's
    ``num_head_channels``); ``num_heads``, when given, fixes the number of heads of every
    attention layer instead, whatever its width (ADM's ``num_heads`` with
    ``num_head_channels = -1``). H and W must be divisible by 2^(len(channel_mult) - 1).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: int,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),
        layers_per_block: int = 2,
        attention_resolutions: tuple[int, ...] = (32, 16, 8),
        head_channels: int = 64,
        norm_groups: int = 32,
        dropout: float = 0.0,
        num_heads: int | None = None,
    ):
        # diffusers (~2 s to import) loads when a UNet is built, not when a config is read:
        # the command line checks method fields from these modules before any model exists.
        from diffusers import UNet2DModel
        from diffusers.models.attention_processor import Attention

        super().__init__()
        channels = tuple(base_channels * m for m in channel_mult)
        if any(c % norm_groups for c in channels):
            raise ValueError(f"UNet widths {channels} must be divisible by norm_groups={norm_groups}")
        attn = attention_levels(image_size, channel_mult, attention_resolutions)
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.net = UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=out_channels,
            block_out_channels=channels,
            layers_per_block=layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            attention_head_dim=min(head_channels, min(channels)),
            norm_num_groups=norm_groups,
            dropout=dropout,
            time_embedding_type="positional",
            flip_sin_to_cos=True,
            freq_shift=0,
        )
        if num_heads is not None:
            # diffusers takes one head width for every level; ADM's fixed head count means
            # a head width of channels / num_heads per layer. The q/k/v projections are
            # channels -> channels either way, so only the split into heads changes (the
            # attention processor derives head_dim = channels // heads and scales by it).
            for module in self.net.modules():
                if isinstance(module, Attention):
                    if module.inner_dim % num_heads:
                        raise ValueError(f"num_heads={num_heads} must divide every attention width, got {module.inner_dim}")
                    module.heads = module.sliceable_head_dim = num_heads
                    module.scale = (module.inner_dim // num_heads) ** -0.5

    @classmethod
    def from_config(cls, config: Any, in_channels: int, out_channels: int) -> "UNet":
        """The UNet a method config describes: its ``input_size`` and the UNet fields every
        diffusion method declares under the same names (``base_channels``, ``channel_mult``,
        ``layers_per_block``, ``attention_resolutions``, ``head_channels``,
        ``norm_groups``, ``dropout``; ``num_heads`` where the method declares it). The
        channel counts are the method's own."""
        return cls(
            in_channels=in_channels,
            out_channels=out_channels,
            image_size=config.input_size,
            base_channels=config.base_channels,
            channel_mult=config.channel_mult,
            layers_per_block=config.layers_per_block,
            attention_resolutions=config.attention_resolutions,
            head_channels=config.head_channels,
            norm_groups=config.norm_groups,
            dropout=config.dropout,
            num_heads=getattr(config, "num_heads", None),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(f"UNet input {tuple(x.shape[-2:])} must be divisible by {self.downsample_factor}")
        return self.net(x, t).sample
