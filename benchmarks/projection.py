#!/usr/bin/env python
"""The default stack's GPU time, projected from the rates measured on one H200 (BENCHMARKS.md, "Stage one
on a GPU"), one line per experiment config: the numbers in each config's header and the README's table.

Measured (train.py's own loop, bf16, channels_last, compiled, 14 loader workers; predict path, 12 workers):
- training: seresnext50_32x4d at 256 px 3,075 img/s; resnext50_32x4d at 512 px 837 img/s;
- inference, seresnext50_32x4d at 256 px: 11,094 img/s without TTA, 4,778 img/s with flip TTA.
Everything else is scaled, and the script says how on every line:
- another size of a measured backbone: by pixels from its own measurement;
- an unmeasured backbone: its training throughput relative to a measured
  one in timm's published table (RTX 3090, AMP, channels_last, 224 px:
  results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv), times that
  backbone's rate scaled by pixels; the lowest of the measured references
  (the projection errs long);
- inference: seresnext50's 256-px rates scaled by pixels and, for a slower
  backbone, by its training-rate ratio to seresnext50 at that size.
Per fold model: every epoch's training slices at its size's rate; one
validation pass per epoch without TTA (plus one more after averaging, plus
the BatchNorm recompute's 100 batches); OOF (the held-out fifth) and the
121,232 test slices with the config's TTA. H100 = 0.85x the H200's rates
(assumed: same compute, less memory bandwidth; not measured).

    .venv/bin/python benchmarks/projection.py [configs/X.yaml ...]   (default: configs/predict/default.yaml's)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.config import load_experiment  # noqa: E402

TRAIN_SLICES, TEST_SLICES, FOLDS, ANY_SHARE = 752_803, 121_232, 5, 0.14
H100 = 0.85
MEASURED_TRAIN = {("seresnext50_32x4d", 256): 3_075, ("resnext50_32x4d", 512): 837}
INFER_NO_TTA, INFER_FLIP = 11_094, 4_778  # seresnext50_32x4d at 256 px
TIMM_TRAIN = {"seresnext50_32x4d": 814.69, "resnext50_32x4d": 1001.03, "seresnext101_32x4d": 479.03,
              "resnext101_32x4d": 609.01, "resnext101_32x8d": 312.8, "tf_efficientnet_b3": 494.58 * (300 / 224) ** 2}
BN_BATCHES = 100  # models.trainer.BN_BATCHES


def train_rate(backbone: str, size: int) -> tuple[float, str]:
    """(img/s, how it was had) of train.py's loop for `backbone` at `size` px on one H200."""
    own = [(s, r) for (b, s), r in MEASURED_TRAIN.items() if b == backbone]
    if own:
        s, r = min(own, key=lambda p: abs(p[0] - size))
        return r * (s / size) ** 2, "measured" if s == size else f"scaled by pixels from {s} px"
    if backbone not in TIMM_TRAIN:
        raise SystemExit(f"no rate for {backbone}: measure it (benchmarks/train_step.py) or add timm's figure")
    found = [(r * (s / size) ** 2 * TIMM_TRAIN[backbone] / TIMM_TRAIN[b], f"{b} at {s} px x timm ratio")
             for (b, s), r in MEASURED_TRAIN.items()]
    return min(found)


def infer_rate(backbone: str, size: int, tta: bool) -> float:
    base = (INFER_FLIP if tta else INFER_NO_TTA) * (256 / size) ** 2
    ratio = train_rate(backbone, size)[0] / train_rate("seresnext50_32x4d", size)[0]
    return base * min(1.0, ratio)


def project(path: str) -> dict:
    cfg = load_experiment(path)
    train_n = TRAIN_SLICES * (FOLDS - 1) / FOLDS
    valid_n = TRAIN_SLICES / FOLDS
    per_epoch = train_n if cfg.sampler.kind == "all" else train_n * ANY_SHARE * (1 + cfg.sampler.neg_ratio)
    bb, final = cfg.model.backbone, cfg.final_size
    sizes = [cfg.size_at(e) for e in range(cfg.train.epochs)]
    train_s = sum(per_epoch / train_rate(bb, s)[0] for s in sizes)
    valid_s = sum(valid_n / infer_rate(bb, s, False) for s in sizes)
    if cfg.train.average_last > 1:
        valid_s += (valid_n + BN_BATCHES * cfg.train.batch_size) / infer_rate(bb, final, False)
    infer_s = (valid_n + TEST_SLICES) / infer_rate(bb, final, cfg.train.tta_hflip)
    h200 = FOLDS * (train_s + valid_s + infer_s) / 3600
    at_final = per_epoch * sum(s == final for s in sizes)
    rates = ", ".join(f"{s} px {train_rate(bb, s)[0]:,.0f} img/s ({train_rate(bb, s)[1]})" for s in sorted(set(sizes)))
    return {"name": cfg.name, "train_h": FOLDS * train_s / 3600, "infer_h": FOLDS * (valid_s + infer_s) / 3600,
            "h200": h200, "h100": h200 / H100, "per_epoch": per_epoch, "at_final": at_final, "rates": rates,
            "schedule": " + ".join(f"{sizes.count(s)} x {s}" for s in dict.fromkeys(sizes))}


def main(argv=None) -> None:
    paths = (argv if argv is not None else sys.argv[1:]) or [
        f"configs/{e}.yaml" for e in __import__("yaml").safe_load(open("configs/predict/default.yaml"))["experiments"]]
    rows = [project(p) for p in paths]
    print("| experiment | epochs (px) | slices/epoch | slices at final size per fold model | training | "
          "validation + OOF + test | H200 | H100 (0.85x assumed) |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['name']}` | {r['schedule']} | {r['per_epoch']:,.0f} | {r['at_final'] / 1e6:.2f}M | "
              f"{r['train_h']:.2f} h | {r['infer_h']:.2f} h | {r['h200']:.2f} h | {r['h100']:.2f} h |")
    print(f"| **stack** | | | | {sum(r['train_h'] for r in rows):.2f} h | {sum(r['infer_h'] for r in rows):.2f} h | "
          f"**{sum(r['h200'] for r in rows):.2f} h** | **{sum(r['h100'] for r in rows):.2f} h** |")
    for r in rows:
        print(f"{r['name']}: {r['rates']}")


if __name__ == "__main__":
    main()
