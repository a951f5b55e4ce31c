"""The DRAEM-style segmentation U-Net (DiffusionAD §IV-A "Segmentation sub-network").

A plain convolutional encoder-decoder with skip connections: each encoder level is two
3x3 conv-BatchNorm-ReLU layers followed by 2x max-pooling; each decoder level upsamples
bilinearly, convolves, concatenates the encoder features of that resolution and applies
two more conv-BN-ReLU layers. It is the discriminative sub-network of DRAEM (Zavrtanik
et al. 2021) that DiffusionAD reuses with a 6-channel input: the image x_0 and its
reconstruction x̂_0 concatenated along channels.

Widths follow DRAEM: encoder level i has ``base_channels * channel_mult[i]`` channels
(paper: 64 x (1, 2, 4, 8, 8, 8)); the decoder at level i has the width of encoder level
i - 1 (level 0 keeps its own), so the decoder narrows one level ahead of the encoder.
The network returns logits; the anomaly map is their sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _UpLevel(nn.Module):
    """Upsample x2 -> conv to ``out_channels`` -> concat skip -> two conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.up = conv_bn_relu(in_channels, out_channels)
        self.merge = nn.Sequential(conv_bn_relu(out_channels + skip_channels, out_channels), conv_bn_relu(out_channels, out_channels))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.merge(torch.cat((self.up(x), skip), dim=1))


class SegmentationUNet(nn.Module):
    """``forward(x [B, in, H, W]) -> logits [B, out, H, W]``.

    H and W must be divisible by 2^(len(channel_mult) - 1).
    """

    def __init__(
        self,
        in_channels: int = 6,
        out_channels: int = 1,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 4, 8, 8, 8),
    ):
        super().__init__()
        if len(channel_mult) < 2:
            raise ValueError(f"SegmentationUNet needs at least 2 levels, got channel_mult={channel_mult}")
        widths = [base_channels * m for m in channel_mult]
        self.downsample_factor = 2 ** (len(widths) - 1)
        self.encoder = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.encoder.append(nn.Sequential(conv_bn_relu(previous, width), conv_bn_relu(width, width)))
            previous = width
        # Decoder, deepest first: level i (i = L-2 .. 0) upsamples from level i + 1.
        self.decoder = nn.ModuleList()
        for level in range(len(widths) - 2, -1, -1):
            out = widths[max(level - 1, 0)]
            self.decoder.append(_UpLevel(previous, widths[level], out))
            previous = out
        self.head = nn.Conv2d(previous, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(f"SegmentationUNet input {tuple(x.shape[-2:])} must be divisible by {self.downsample_factor}")
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()  # the bottleneck
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.head(x)
