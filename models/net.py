"""The stage-one network: a timm backbone, global pooling, one linear head.

Pretrained weights come only from a local file (a Kaggle dataset or a
download done beforehand): timm is told the file through
`pretrained_cfg_overlay`, so it never reaches for the network, and a missing
file is a clear error naming it. Inputs arrive as uint8 and are normalized
here with the backbone's own mean/std, on the device.
"""
from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from torch import nn

from ich.labels import LABELS

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: no hub access, ever


class MissingWeightsError(FileNotFoundError):
    """The configured pretrained weights file does not exist."""


class SliceNet(nn.Module):
    def __init__(self, backbone: str, pretrained: str | None = None, dropout: float = 0.0):
        super().__init__()
        kwargs = {}
        if pretrained:
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise MissingWeightsError(
                    f"pretrained weights file not found: {path} (model.pretrained in the config). "
                    "Nothing is downloaded at run time: put the file there (e.g. attach the Kaggle dataset "
                    "that holds it), or set model.pretrained: null to train from scratch.")
            kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
        try:
            self.backbone = timm.create_model(backbone, num_classes=0, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise ValueError(f"unknown timm backbone {backbone!r} (model.backbone in the config)") from exc
            raise
        cfg = self.backbone.pretrained_cfg or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32) * 255
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32) * 255
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)
        self.dropout = nn.Dropout(dropout)
        # pooled width: head_hidden_size where timm adds a pre-logits layer (MobileNetV3, ...)
        self.num_features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.head = nn.Linear(self.num_features, len(LABELS))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> pooled features (B, num_features)."""
        x = (x.float() - self.mean) / self.std
        return self.backbone(x)

    def forward(self, x: torch.Tensor, return_embedding: bool = False):
        emb = self.embed(x)
        logits = self.head(self.dropout(emb))
        return (logits, emb) if return_embedding else logits

    def backbone_parameters(self):
        return self.backbone.parameters()

    def head_parameters(self):
        return self.head.parameters()
