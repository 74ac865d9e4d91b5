"""Training augmentations, built from the config with albumentations.

All on uint8 HxWxC images before they become tensors. Geometry is applied
identically to every channel, which is what both input modes need (windows
of one slice, or neighbor slices).
"""
from __future__ import annotations

import albumentations as A
import cv2

from .config import AugmentCfg


def build_train_transform(cfg: AugmentCfg) -> A.Compose | None:
    steps = []
    if cfg.hflip > 0:
        steps.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.transpose > 0:
        steps.append(A.Transpose(p=cfg.transpose))
    if cfg.shift_scale_rotate > 0:
        steps.append(A.Affine(
            translate_percent=(-cfg.shift_limit, cfg.shift_limit),
            scale=(1 - cfg.scale_limit, 1 + cfg.scale_limit),
            rotate=(-cfg.rotate_limit, cfg.rotate_limit),
            border_mode=cv2.BORDER_CONSTANT, fill=0, p=cfg.shift_scale_rotate))
    if cfg.blur > 0:
        steps.append(A.GaussianBlur(blur_limit=(3, max(3, cfg.blur_limit | 1)), p=cfg.blur))
    if cfg.contrast > 0:
        steps.append(A.RandomBrightnessContrast(brightness_limit=cfg.contrast_limit,
                                                contrast_limit=cfg.contrast_limit, p=cfg.contrast))
    if cfg.erasing > 0:
        steps.append(A.CoarseDropout(num_holes_range=(1, max(1, cfg.erasing_holes)),
                                     hole_height_range=(0.02, cfg.erasing_size),
                                     hole_width_range=(0.02, cfg.erasing_size), fill=0, p=cfg.erasing))
    return A.Compose(steps) if steps else None
