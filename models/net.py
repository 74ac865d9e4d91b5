"""The stage-one network: a timm backbone, global pooling, one linear head.

Pretrained weights come only from a local file (a Kaggle dataset or a
download done beforehand): timm is told the file through
`pretrained_cfg_overlay`, so it never reaches for the network, and a missing
file is a clear error naming it. Inputs arrive as uint8 and are normalized
here with the backbone's own mean/std, on the device.

Facts the weights depend on live in the weights (persistent buffers, so they
travel in every checkpoint's state dict and nowhere else):
- `mean` / `std`: the input normalization the network was trained with. A
  checkpoint is read with its own values, whatever the installed timm's
  default for the backbone is today.
- `neg_keep`: the share of `any`-negative images the training sampler kept
  (1.0 for `sampler: all`). A balanced sampler shifts the prior the network
  learns; `probabilities()` undoes that shift (see `correct_sampling`), so
  validation, out-of-fold and test probabilities are all on the real prior.
"""
from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from torch import nn

from ich.labels import LABELS

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: no hub access, ever

# torch.compile's backend. Tests set "aot_eager": the same graphs, guards and recompiles, without
# minutes of C++ compiling per graph on a CPU.
COMPILE_BACKEND = "inductor"


class MissingWeightsError(FileNotFoundError):
    """The configured pretrained weights file does not exist."""


def weights_file(pretrained: str) -> Path:
    """The configured pretrained weights file, or MissingWeightsError saying what to do."""
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise MissingWeightsError(
            f"pretrained weights file not found: {path} (model.pretrained in the config). "
            "Nothing is downloaded at run time: put the file there (e.g. attach the Kaggle dataset "
            "that holds it), or set model.pretrained: null to train from scratch.")
    return path


class SliceNet(nn.Module):
    def __init__(self, backbone: str, pretrained: str | None = None, dropout: float = 0.0, in_chans: int = 3):
        super().__init__()
        kwargs = {}
        if pretrained:
            path = weights_file(pretrained)
            kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
        try:
            # in_chans != 3: timm widens the first convolution, and adapts pretrained RGB filters to it
            self.backbone = timm.create_model(backbone, num_classes=0, in_chans=in_chans, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise ValueError(f"unknown timm backbone {backbone!r} (model.backbone in the config)") from exc
            raise
        cfg = self.backbone.pretrained_cfg or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32) * 255
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32) * 255
        # more channels than RGB (e.g. 3 slices x 3 windows): each repeats the RGB statistics in turn
        mean, std = mean[torch.arange(in_chans) % len(mean)], std[torch.arange(in_chans) % len(std)]
        self.in_chans = in_chans
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))
        self.register_buffer("neg_keep", torch.ones(()))
        self.dropout = nn.Dropout(dropout)
        # pooled width: head_hidden_size where timm adds a pre-logits layer (MobileNetV3, ...)
        self.num_features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.head = nn.Linear(self.num_features, len(LABELS))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> pooled features (B, num_features)."""
        x = (x.float() - self.mean) / self.std
        compiled = self.__dict__.get("_compiled" if self.training else "_compiled_eval")
        if compiled is not None:
            try:
                return compiled(x)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: eager is always right
                self.__dict__["_compiled"] = self.__dict__["_compiled_eval"] = None
                self.compile_note = (f"warning: torch.compile failed ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); running eager")
        return self.backbone(x)

    def _eval_backbone(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone for evaluation: compiled on its own (compile_backbone says why)."""
        return self.backbone(x)

    def compile_backbone(self) -> None:
        """Run the backbone through torch.compile from the next call on; eager again if compiling fails.

        Static graphs (`dynamic=False`): one graph per input shape, each
        compiled once, with kernels specialised to that size. Progressive
        resizing changes the size a few times per fold; with torch's default
        (automatic dynamic shapes) the second size recompiled the backbone as
        one dynamic-shape graph (about 125 s on an H200, BENCHMARKS.md) whose
        kernels ran at rates nobody had measured. Shapes must then stay
        fixed within a size: the trainer drops a compiled run's short last
        training batch, and models.inference pads the last evaluation batch.

        Two compiled callables, training (`_compiled`, the module) and
        evaluation (`_compiled_eval`, `_eval_backbone`). Torch keeps compiled
        graphs per code object, each guarded on grad mode and train/eval
        mode. Through one callable, every validation pass at a new size
        failed the `grad_mode` guard and recompiled, and the train and eval
        graphs of all sizes shared one cache of `recompile_limit` (8)
        entries, past which dynamo silently runs eager. Apart, each cache
        holds one graph per size: the evaluation graph of a size is compiled
        once, as a first compile of its own code, not a recompile of the
        training graph. (Running evaluation with gradients on, to hit the
        same guard, would cost the memory and time of autograd for
        nothing, and the eval-mode BatchNorm still needs its own graph.)

        A new SliceNet of the same architecture reuses the graphs (the
        weights are graph inputs), so the folds of an experiment compile
        once (tests/test_compile.py counts the graphs). The compiled modules
        are kept outside the registered submodules, so state_dict() stays
        the plain module's (checkpoints load without compile) and
        `model.to()` moves the one set of weights. A failure (no compiler,
        an unsupported op) is caught at the first call, where torch.compile
        really compiles, and leaves a one-line `compile_note`.
        """
        self.__dict__["_compiled"] = torch.compile(self.backbone, dynamic=False, backend=COMPILE_BACKEND)
        self.__dict__["_compiled_eval"] = torch.compile(self._eval_backbone, dynamic=False,
                                                        backend=COMPILE_BACKEND)
        self.compile_note = None

    def forward(self, x: torch.Tensor, return_embedding: bool = False):
        emb = self.embed(x)
        logits = self.head(self.dropout(emb))
        return (logits, emb) if return_embedding else logits

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> probabilities on the real label prior (corrected for the training sampler)."""
        return correct_sampling(torch.sigmoid(logits.float()), self.neg_keep)

    def set_sampling(self, neg_keep: float) -> None:
        """Record the share of `any`-negatives the training sampler keeps (1.0: all)."""
        if not 0 < neg_keep <= 1:
            raise ValueError(f"neg_keep must be in (0, 1], got {neg_keep}")
        self.neg_keep.fill_(float(neg_keep))

    def backbone_parameters(self):
        return self.backbone.parameters()

    def head_parameters(self):
        return self.head.parameters()


def correct_sampling(probs: torch.Tensor, neg_keep) -> torch.Tensor:
    """Probabilities learned under negative subsampling -> probabilities under the real prior.

    The balanced sampler keeps every image with `any` = 1 and a share q
    (`neg_keep`) of the images with `any` = 0. Under that sampling an image x
    with true posterior p_j for label j is seen with weight 1 when positive
    and q when negative, so the network learns
        p_s_any = p_any / D,  p_s_j = p_j / D,  D = p_any + (1 - p_any) q
    (every subtype implies `any`, so every label's positives have weight 1).
    Solving with p_s_any gives D = 1 / (p_s_any + (1 - p_s_any) / q) and the
    same correction for all six labels: p_j = p_s_j * D. For `any` that is
    the familiar logit shift by log(q). q = 1 changes nothing.
    """
    q = torch.as_tensor(neg_keep, dtype=probs.dtype, device=probs.device)
    p_any = probs[:, -1:]
    return probs / (p_any + (1 - p_any) / q)
