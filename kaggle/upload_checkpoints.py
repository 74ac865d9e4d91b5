#!/usr/bin/env python
"""Stage the checkpoints dataset that kaggle/kernel.py needs, and (only with --upload) upload it.

For the stage-one experiments named in a predict config it gathers, from the
paths of a settings file:

    MODEL_CHECKPOINT_DIR/<exp>/fold{k}.pt          best weights, one per fold (not fold{k}.last.pt)
    MODEL_CHECKPOINT_DIR/<exp>/fold{k}.oof.parquet  held-out ids per fold (stage two checks its folds)
    MODEL_CHECKPOINT_DIR/<exp>/oof.parquet          stage-one out-of-fold probabilities
    MODEL_CHECKPOINT_DIR/<exp>/oof_emb.npy          only when the config has PCA features (pca_width > 0)
    MODEL_CHECKPOINT_DIR/<exp>/config.json          the experiment config (when present)
    TRAIN_DATA_CLEAN_PATH/slices.parquet            labels + folds, which stage two trains on
    TRAIN_DATA_CLEAN_PATH/cache_meta.json           how the train image cache was built

and lays them out in a staging folder as

    <out>/dataset-metadata.json       from kaggle/datasets/checkpoints/, id filled in
    <out>/ich_checkpoints.json        manifest: what is here, read by kernel.py to find this dataset
    <out>/predict.yaml                the predict config (its `name` kept, so outputs are named alike)
    <out>/prepare_test.yaml           prepare config rebuilt from the train cache_meta.json, so
                                      the kernel caches the test images exactly like train's
    <out>/models/<exp>/...            the files above
    <out>/train_clean/slices.parquet  (+ cache_meta.json)

Test-set outputs (test*.parquet, test_fold*_emb.npy), resume states (fold{k}.last.pt)
and stage-two outputs are left out: the kernel recomputes them.

Default is a dry run: build the folder, print the kaggle command. `--upload`
runs it (`kaggle datasets create`, or `kaggle datasets version` when the
dataset exists already). Example:

    python kaggle/upload_checkpoints.py --config configs/predict/default.yaml \\
        --username YOUR_KAGGLE_NAME [--out data/kaggle/checkpoints] [--link] [--upload]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ich import stage_one  # noqa: E402

TEMPLATE = HERE / "datasets" / "checkpoints" / "dataset-metadata.json"
MANIFEST = "ich_checkpoints.json"
PLACEHOLDER = "<your-username>"
MANIFEST_FORMAT = 1


class StageError(RuntimeError):
    """The staging folder cannot be built; the message says what is missing."""


def _fmt_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _put(src: Path, dst: Path, link: bool) -> int:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return dst.stat().st_size
        except OSError:
            pass  # another file system: copy
    shutil.copy2(src, dst)
    return dst.stat().st_size


def experiment_files(exp_dir: Path, folds: list[int], need_emb: bool) -> list[str]:
    """Names of the files of one experiment to stage; StageError naming everything missing."""
    required = ["oof.parquet"]
    for k in folds:
        required += [stage_one.fold_checkpoint(exp_dir, k).name, stage_one.fold_oof(exp_dir, k).name]
    if need_emb:
        required.append("oof_emb.npy")
    missing = [n for n in required if not (exp_dir / n).is_file()]
    if missing:
        raise StageError(f"{exp_dir} lacks {', '.join(missing)}: finish train.py for {exp_dir.name} first "
                         "(every fold of slices.parquet)")
    optional = [n for n in ("config.json",) if (exp_dir / n).is_file()]
    return required + optional


def prepare_yaml_from_meta(meta: dict) -> str:
    """A configs/prepare-style YAML that rebuilds a cache with the same key as `meta` (test files differ)."""
    import yaml

    from ich.config import cache_settings
    cfg = {**cache_settings(meta), "n_jobs": -1}
    return ("# written by kaggle/upload_checkpoints.py from the train cache_meta.json:\n"
            "# the test cache must match the train cache the models were trained on\n"
            + yaml.safe_dump(cfg, sort_keys=False))


def dataset_metadata(dataset_id: str, title: str | None) -> dict:
    meta = json.loads(TEMPLATE.read_text())
    meta["id"] = dataset_id
    if title:
        meta["title"] = title
    return meta


def stage(settings_path: Path, config_path: Path, out: Path, *, dataset_id: str, title: str | None = None,
          link: bool = False, log=print) -> dict:
    """Build the staging folder; returns the manifest."""
    import pandas as pd
    import yaml

    from ich.settings import load_settings
    from stacking.config import load_predict_config

    settings = load_settings(settings_path)
    cfg = load_predict_config(config_path)
    train_dir = settings.train_clean_dir
    slices_path = train_dir / "slices.parquet"
    if not slices_path.is_file():
        raise StageError(f"{slices_path} not found: run prepare_data.py --split train first")
    folds = sorted(int(k) for k in pd.read_parquet(slices_path, columns=["fold"])["fold"].unique())
    plan: list[tuple[Path, str]] = []  # (source, path inside the dataset)
    for exp in cfg.experiments:
        exp_dir = settings.model_checkpoint_dir / exp
        if not exp_dir.is_dir():
            raise StageError(f"no folder {exp_dir} for experiment {exp} (MODEL_CHECKPOINT_DIR of {settings_path})")
        for name in experiment_files(exp_dir, folds, cfg.pca_width > 0):
            plan.append((exp_dir / name, f"models/{exp}/{name}"))
    plan.append((slices_path, "train_clean/slices.parquet"))
    cache_meta = train_dir / "cache_meta.json"
    meta = json.loads(cache_meta.read_text()) if cache_meta.is_file() else None
    if meta is not None:
        plan.append((cache_meta, "train_clean/cache_meta.json"))

    out = Path(out)
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
            raise StageError(f"{out} exists and is not a staging folder of this script (no {MANIFEST}); "
                             "choose another --out or remove it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    total = 0
    for src, rel in plan:
        total += _put(src, out / rel, link)

    text = Path(config_path).read_text()
    if "name" not in (yaml.safe_load(text) or {}):
        text = text.rstrip("\n") + ("\n# added by kaggle/upload_checkpoints.py: stage-two outputs keep the "
                                    f"original config's name\nname: {cfg.name}\n")
    (out / "predict.yaml").write_text(text)
    if load_predict_config(out / "predict.yaml").name != cfg.name:  # the staged copy must mean the same
        raise StageError(f"{out / 'predict.yaml'} does not keep the config name {cfg.name}")
    if meta is not None:
        (out / "prepare_test.yaml").write_text(prepare_yaml_from_meta(meta))
    else:
        log(f"warning: {cache_meta} not found; the kernel will prepare the test set with the code's "
            "configs/prepare/default.yaml (make sure it matches the train cache)")

    (out / "dataset-metadata.json").write_text(json.dumps(dataset_metadata(dataset_id, title), indent=2) + "\n")
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "predict_config": "predict.yaml",
        "predict_config_source": str(config_path),
        "config_name": cfg.name,
        "prepare_config": "prepare_test.yaml" if meta is not None else None,
        "experiments": list(cfg.experiments),
        "folds": folds,
        "models_dir": "models",
        "train_clean_dir": "train_clean",
        "files": sorted(rel for _, rel in plan),
        "bytes": total,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"staged {len(plan)} files ({_fmt_size(total)}) for {', '.join(cfg.experiments)} "
        f"({len(folds)} folds) in {out}")
    return manifest


def kaggle_commands(out: Path, message: str) -> dict:
    return {
        "create": ["kaggle", "datasets", "create", "-p", str(out), "--dir-mode", "zip"],
        "version": ["kaggle", "datasets", "version", "-p", str(out), "--dir-mode", "zip", "-m", message],
    }


def upload(out: Path, dataset_id: str, mode: str, message: str, log=print) -> int:
    if PLACEHOLDER in dataset_id or "/" not in dataset_id:
        raise StageError(f"dataset id {dataset_id!r} still has the {PLACEHOLDER} placeholder: pass "
                         "--username NAME (or --dataset-id NAME/SLUG)")
    if shutil.which("kaggle") is None:
        raise StageError("the kaggle CLI is not on PATH (pip install kaggle; token in ~/.kaggle/kaggle.json)")
    if mode == "auto":
        status = subprocess.run(["kaggle", "datasets", "status", dataset_id], capture_output=True, text=True)
        mode = "version" if status.returncode == 0 and "error" not in (status.stdout + status.stderr).lower() \
            else "create"
    cmd = kaggle_commands(out, message)[mode]
    log(f"$ {shlex.join(cmd)}")
    return subprocess.run(cmd).returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=str(REPO / "SETTINGS.json"), help="paths file (default: SETTINGS.json)")
    p.add_argument("--config", default=str(REPO / "configs" / "predict" / "default.yaml"),
                   help="predict config naming the experiments (default: configs/predict/default.yaml)")
    p.add_argument("--out", default=None, help="staging folder (default: data/kaggle/checkpoints next to "
                   "the settings file)")
    p.add_argument("--username", default=os.environ.get("KAGGLE_USERNAME"),
                   help="your Kaggle user name (default: $KAGGLE_USERNAME); fills <your-username>")
    p.add_argument("--dataset-id", default=None, help="full dataset id, overrides --username "
                   "(default: <username>/rsna-ich-checkpoints)")
    p.add_argument("--title", default=None, help="dataset title (default: the template's)")
    p.add_argument("--link", action="store_true", help="hard-link instead of copying when on the same disk")
    p.add_argument("--upload", action="store_true", help="really run the kaggle command (default: dry run)")
    p.add_argument("--mode", choices=["auto", "create", "version"], default="auto",
                   help="with --upload: create the dataset, add a version, or ask Kaggle which (default)")
    p.add_argument("--message", default="new checkpoints", help="version message (kaggle datasets version -m)")
    args = p.parse_args(argv)

    from ich.config import ConfigError
    from ich.settings import SettingsError

    template_id = json.loads(TEMPLATE.read_text())["id"]
    dataset_id = args.dataset_id or (template_id.replace(PLACEHOLDER, args.username) if args.username
                                     else template_id)
    out = Path(args.out) if args.out else Path(args.settings).resolve().parent / "data" / "kaggle" / "checkpoints"
    try:
        stage(Path(args.settings), Path(args.config), out, dataset_id=dataset_id, title=args.title, link=args.link)
        cmds = kaggle_commands(out, args.message)
        if not args.upload:
            print("dry run: nothing uploaded. To upload (or rerun with --upload):")
            print(f"  {shlex.join(cmds['create'])}      # first time")
            print(f"  {shlex.join(cmds['version'])}      # dataset exists already")
            if PLACEHOLDER in dataset_id:
                print(f"  (first replace {PLACEHOLDER} in {out / 'dataset-metadata.json'}, or pass --username)")
            return 0
        return upload(out, dataset_id, args.mode, args.message)
    except (StageError, SettingsError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
