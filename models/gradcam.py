"""Grad-CAM for the stage-one network, with the `grad-cam` package (pytorch_grad_cam).

It explains a stage-one model, so it lives in models/: the HTML report
(reporting.sections, via `explain`) and the web viewer (web.engine, via
`target_layer` and `cam_for`) both import it from here.

Which images: for each subtype, the most confident true positives and the
worst false positives by the first experiment's out-of-fold probability, so
every image is explained by the fold model that never saw it in training
(fold{k}.pt of the image's fold).

Target layer: the last feature block of the timm backbone
(`backbone.feature_info[-1]["module"]`, e.g. `layer4` of a ResNet,
`stages.3` of a ConvNeXt), else the last nn.Conv2d; at small inputs (the
64 px demo) the deepest block whose map is still 8 cells wide, since a 2 x 2
map cannot point at anything. SliceNet normalizes its
input inside (`x.float()`), so a float tensor of 0..255 values is the same
input as the uint8 batch and lets gradients flow.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from ich.labels import LABELS, SUBTYPES

MIN_CELLS = 8  # the CAM layer's map must be at least this many cells wide (8 x 8 at 256 px / 32)


def target_layer(model: nn.Module, input_size: int | None = None, min_cells: int = MIN_CELLS) -> nn.Module:
    """The Grad-CAM layer: a feature block of the timm backbone, else the model's last Conv2d.

    The last feature block (`backbone.feature_info[-1]`), unless the input is
    so small that its map is under `min_cells` wide (64 px / 32 = 2 x 2 cells
    says nothing about where a lesion is): then the deepest block whose map is
    at least that wide.
    """
    backbone = getattr(model, "backbone", model)
    info = getattr(backbone, "feature_info", None)
    blocks = []
    if isinstance(info, list):
        blocks = [(d.get("module"), d.get("reduction")) for d in info if isinstance(d, dict) and d.get("module")]
    elif info is not None and hasattr(info, "module_name"):  # timm FeatureInfo object (features_only models)
        blocks = [(info.module_name(i), info.reduction(i)) for i in range(len(info))]
    if blocks:
        name = blocks[-1][0]
        if input_size:
            wide = [n for n, r in blocks if r and input_size / r >= min_cells]
            if wide and input_size / (blocks[-1][1] or 1) < min_cells:
                name = wide[-1]
        try:
            return backbone.get_submodule(name)
        except AttributeError:
            pass
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"no convolution in {type(model).__name__}: cannot pick a Grad-CAM target layer")
    return convs[-1]


def pick_examples(slices: pd.DataFrame, probs: np.ndarray, n_tp: int = 2, n_fp: int = 2) -> list[dict]:
    """Per subtype: the n_tp positives with the highest probability and the n_fp negatives with the highest.

    Positives are true positives when their probability is >= 0.5; when the
    model is too weak for any, the best-ranked positives are shown anyway and
    the caption says so. Returns dicts with label, kind (tp/fp), row, prob.
    """
    out = []
    for label in SUBTYPES:
        j = LABELS.index(label)
        y = slices[label].to_numpy() > 0
        p = probs[:, j]
        pos = np.flatnonzero(y)
        neg = np.flatnonzero(~y)
        for row in pos[np.argsort(-p[pos], kind="stable")][:n_tp]:
            out.append({"label": label, "kind": "tp", "row": int(row), "prob": float(p[row])})
        for row in neg[np.argsort(-p[neg], kind="stable")][:n_fp]:
            out.append({"label": label, "kind": "fp", "row": int(row), "prob": float(p[row])})
    return out


def cam_for(model: nn.Module, layer: nn.Module, image: np.ndarray, label_index: int) -> np.ndarray:
    """HxWxC uint8 network input -> HxW Grad-CAM in [0, 1] for one output label.

    The input asks for gradients, so a model whose parameters ask for none (web.engine's) still gets
    the target layer's gradients, and keeps no parameter gradients after the map is made."""
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().unsqueeze(0).requires_grad_(True)
    with GradCAM(model=model, target_layers=[layer]) as cam:
        grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(label_index)])
    return grayscale[0]


def overlay(gray: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """Grayscale uint8 slice + CAM in [0, 1] -> RGB uint8 heat-map overlay."""
    rgb = np.repeat((gray.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    return show_cam_on_image(rgb, cam.astype(np.float32), use_rgb=True, image_weight=0.55)


def explain(examples: list[dict], *, slices: pd.DataFrame, clean_dir: Path, checkpoint_for, display_channel: int = 0,
            runtime=None, images=None) -> list[dict]:
    """Grad-CAM of every example with the fold model that held its image out.

    checkpoint_for(fold) -> path of fold{k}.pt. Adds to each example:
    image (HxW uint8, the displayed channel), overlay (HxWx3 uint8), cam, fold.
    images: the split's images by cache_row when not the cache in clean_dir (ich.dicom_rows.split_images).
    """
    from .data import SliceDataset, with_neighbors
    from .runtime import Runtime
    from .checkpoint import load_fold_model

    runtime = runtime or Runtime(device=torch.device("cpu"))
    table = with_neighbors(slices)
    folds = table["fold"].to_numpy()
    by_fold: dict[int, list[dict]] = {}
    for ex in examples:
        by_fold.setdefault(int(folds[ex["row"]]), []).append(ex)
    for fold, items in sorted(by_fold.items()):
        model, cfg, _ = load_fold_model(checkpoint_for(fold), runtime)
        model = model.float().eval()
        layer = target_layer(model, cfg.final_size)
        layer_name = next((n for n, m in model.named_modules() if m is layer), type(layer).__name__)
        dataset = SliceDataset(table, clean_dir, mode=cfg.input.mode, channel=cfg.input.adjacent_channel,
                               size=cfg.final_size, images=images)
        for ex in items:
            image = dataset.image(ex["row"])
            center = 1 if cfg.input.mode == "adjacent" else display_channel
            gray = image[:, :, min(center, image.shape[2] - 1)]
            ex["cam"] = cam_for(model, layer, image, LABELS.index(ex["label"]))
            ex["image"], ex["overlay"], ex["fold"] = gray, overlay(gray, ex["cam"]), fold
            ex["image_id"] = str(table["image_id"].iloc[ex["row"]])
            ex["layer"] = f"{layer_name} of {cfg.model.backbone}"
        del model
    return examples


def save_overlay(example: dict, path: Path, size: int = 256) -> Path:
    """The slice and its overlay side by side, upscaled to `size` px, as one PNG."""
    import cv2

    gray = cv2.resize(example["image"], (size, size), interpolation=cv2.INTER_LINEAR)
    over = cv2.resize(example["overlay"], (size, size), interpolation=cv2.INTER_LINEAR)
    pair = np.concatenate([np.repeat(gray[..., None], 3, axis=2), np.full((size, 4, 3), 255, np.uint8), over], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(pair[:, :, ::-1])):  # OpenCV writes BGR
        raise OSError(f"could not write {path}")
    return path
