"""V4's RMSNorm: computed in fp32 with an fp32 weight (kept so in bf16 models) and cast back to the input's
dtype, as transformers' V4 does (our V2/V3 norm returns the weight's dtype instead)."""

from __future__ import annotations

import torch

from model_worker.layers.norm import RMSNorm


class V4RMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).to(x.dtype)
