"""Grid features -> decoder-width tokens with learned 2-D positions."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mmcap.config import ProjectionConfig


class GridProjection(nn.Module):
    def __init__(self, cfg: ProjectionConfig, in_channels: int, width: int, max_grid: Optional[int] = None):
        """`max_grid` (rows and columns of the position table) defaults to `cfg.max_grid`."""
        super().__init__()
        self.cfg = cfg
        self.max_grid = max_grid or cfg.max_grid
        if not self.max_grid:
            raise ValueError("GridProjection needs max_grid (projection.max_grid, or the encoder's grid)")
        if cfg.kind == "linear":
            self.proj = nn.Linear(in_channels, width)
        else:
            self.proj = nn.Sequential(nn.Linear(in_channels, width), nn.GELU(), nn.Linear(width, width))
        self.norm = nn.LayerNorm(width)
        # Row and column tables (summed) let the decoder tell "left" from "right".
        self.row_embed = nn.Parameter(torch.randn(self.max_grid, width) * 0.02)
        self.col_embed = nn.Parameter(torch.randn(self.max_grid, width) * 0.02)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, H*W, width], row-major over the grid."""
        b, c, h, w = grid.shape
        if h > self.max_grid or w > self.max_grid:
            raise ValueError(
                f"image grid {h}x{w} exceeds the position table ({self.max_grid}x{self.max_grid}, "
                "projection.max_grid): use smaller images or set a larger projection.max_grid"
            )
        x = self.norm(self.proj(grid.flatten(2).transpose(1, 2)))
        pos = (self.row_embed[:h, None, :] + self.col_embed[None, :w, :]).reshape(h * w, -1)
        return self.dropout(x + pos.to(x.dtype))
