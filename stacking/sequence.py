"""Stage two's sequence member: a small network along each series, as the 1st and 2nd places stacked.

SeuTao (1st, 2019) ran bidirectional GRUs over each series' per-slice CNN
outputs; darraghdog (2nd) an LSTM over the pooled embeddings in series
order. The member here is their common core, sized for stage two's inputs:

    per slice: every experiment's stage-one logits, its aligned PCA
               components (stacking.run), the relative position, the z
               spacing (and the brain fraction when slices.parquet has it),
               standardized on the member's own training rows
    -> Linear + GELU (per-slice projection)
    -> bidirectional GRU over the series in z-order (batches of series of
       one length: no padding enters either direction)
    -> Linear on [projection, GRU state] -> a correction to the six logits

With `start_from_stage_one` (as LightGBM's init score) the output is
logit(mean stage-one probability) + correction, and the head starts at zero,
so an untrained member is stage one and training learns what the
neighbours add. The loss is the competition's: binary cross-entropy with
weight 2 for `any`, 1 for the subtypes, over every real slice.

Each member is evaluated and kept as an exponential moving average of its
weights (torch.optim.swa_utils, a horizon of about one epoch of steps): on
the demo's ~40 training series per member the raw weights' validation loss
jumped by 20% from one epoch to the next, which made the epoch picked on
the other folds' curves a lottery; the average moves smoothly.

The protocol is LightGBM's (stacking.model), so their honest scores compare:
- member k trains on the OOF rows of the folds != k (features from stage-one
  fold models j != k) and is scored on fold k;
- the K members train in lockstep, one epoch each at a time, each recording
  its validation loss on its held-out fold; member k keeps the weights of
  epoch n_k = early stopping on the mean curve of the *other* folds
  (stacking.model.pick_rounds), so neither its weights nor n_k are chosen by
  how it does on fold k;
- at test time member k runs on stage-one fold model k's test outputs, and
  the prediction is the mean over k.

This module imports torch; the rest of stacking/ does not (tests/test_layout.py),
so a LightGBM-only stage two runs without it, and stacking.run / stacking.apply
import this module only when the config lists the member.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from ich.labels import LABELS

from .model import early_stop, logit, pick_rounds

LABEL_WEIGHTS = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 2.0])  # the metric's: `any` counts twice


# --- series -----------------------------------------------------------------------------------------

@dataclass
class Series:
    """Rows grouped by series in z-order: index[s, t] = row of slice t of series s (-1 past its end)."""
    index: np.ndarray   # (n_series, max_len) int64
    lengths: np.ndarray  # (n_series,)

    @classmethod
    def of(cls, slices: pd.DataFrame, rows: np.ndarray | None = None) -> "Series":
        """The series of `slices` (only `rows` of it, when given: a series keeps its slices among them)."""
        rows = np.arange(len(slices)) if rows is None else np.asarray(rows)
        sid = slices["series_id"].to_numpy()[rows]
        order = rows[np.lexsort((slices["slice_index"].to_numpy()[rows], sid))]
        codes = pd.factorize(slices["series_id"].to_numpy()[order])[0]
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        lengths = np.diff(np.r_[starts, len(order)])
        index = np.full((len(starts), int(lengths.max(initial=1))), -1, dtype=np.int64)
        pos = np.arange(len(order)) - np.repeat(starts, lengths)
        index[np.repeat(np.arange(len(starts)), lengths), pos] = order
        return cls(index, lengths)

    def batches(self, batch_size: int, rng: np.random.Generator | None = None):
        """Series indices per batch, every batch of one series length: no padding, so no packing.

        A bidirectional GRU run over padding would carry the padded steps into
        the backward direction of the real ones; packing avoids that but made
        a CPU training step 3x slower (measured), and batches of equal lengths
        avoid it for free (real series take some 40 distinct lengths).
        Shuffled (rng: the series within each length, then the batch order) or
        in order.
        """
        groups = []
        for length in np.unique(self.lengths):
            same = np.flatnonzero(self.lengths == length)
            if rng is not None:
                same = rng.permutation(same)
            groups += [same[i:i + batch_size] for i in range(0, len(same), batch_size)]
        for i in (rng.permutation(len(groups)) if rng is not None else range(len(groups))):
            yield groups[i]


# --- the network ---------------------------------------------------------------------------------------

class SeriesNet(nn.Module):
    """Per-slice projection, bidirectional GRU along the series, per-slice head (module docstring)."""

    def __init__(self, n_inputs: int, hidden: int = 64, layers: int = 1, dropout: float = 0.1):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(n_inputs, hidden), nn.GELU(), nn.Dropout(dropout))
        self.gru = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True, bidirectional=True,
                          dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(3 * hidden, len(LABELS)))
        nn.init.zeros_(self.head[1].weight)  # starts as "no correction": stage one, when it starts from it
        nn.init.zeros_(self.head[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d), B series of the same length T (`Series.batches`) -> (B, T, 6) logits (corrections)."""
        h = self.proj(x)
        out, _ = self.gru(h)
        return self.head(torch.cat([h, out], dim=-1))


@dataclass
class Member:
    """One trained member k: its weights at epoch n_k and its input standardization (saved with stage two)."""
    state: dict
    mean: np.ndarray
    std: np.ndarray
    n_inputs: int
    epochs: int


@dataclass
class SequenceResult:
    oof: np.ndarray                      # (n_train, 6), honest: member k at epochs picked on the other folds
    test: np.ndarray | None              # (n_test, 6), mean over k of member k on fold model k's outputs
    oof_optimistic: np.ndarray           # (n_train, 6), member k at the epoch best on fold k (comparison only)
    members: dict = field(default_factory=dict)   # fold k -> Member
    curves: np.ndarray | None = None     # (K, epochs trained) validation weighted log loss
    epochs: dict = field(default_factory=dict)            # k -> n_k (honest)
    epochs_optimistic: dict = field(default_factory=dict)  # k -> best epoch on fold k


def device_of(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("sequence.device is cuda but torch sees no GPU: set sequence.device: auto or cpu")
    return torch.device(setting)


class _Data:
    """Inputs, base logits and labels on the device, gathered into padded batches of whole series."""

    def __init__(self, X: np.ndarray, base: np.ndarray | None, y: np.ndarray | None, device):
        tensor = lambda a: torch.from_numpy(np.array(a, dtype=np.float32)).to(device)  # noqa: E731  (a copy)
        self.X = tensor(X)
        self.base = None if base is None else tensor(logit(base))
        self.y = None if y is None else tensor(y)
        self.device = device

    def logits(self, net: SeriesNet, series: Series, which: np.ndarray):
        """Logits (B, T, 6) of a batch of equal-length series, and their rows (B, T) of X."""
        rows = torch.as_tensor(series.index[which, :int(series.lengths[which[0]])], device=self.device)
        out = net(self.X[rows])
        if self.base is not None:
            out = out + self.base[rows]
        return out, rows


def _loss(out, y):
    """The metric's weighted log loss, as a mean over the batch's slices."""
    w = LABEL_WEIGHTS.to(out.device)
    per = nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none") * w
    return per.sum() / (out.shape[0] * out.shape[1] * w.sum())


@torch.no_grad()
def predict(net: SeriesNet, data: _Data, series: Series, n_rows: int, batch_size: int) -> np.ndarray:
    """Probabilities (n_rows, 6) of every row of `series` (other rows NaN)."""
    net.eval()
    out = np.full((n_rows, len(LABELS)), np.nan)
    for which in series.batches(batch_size):
        logits, rows = data.logits(net, series, which)
        out[rows.reshape(-1).cpu().numpy()] = torch.sigmoid(logits.reshape(-1, len(LABELS)).double()).cpu().numpy()
    return out


def _weighted_log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-15, 1 - 1e-15)
    per = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    w = LABEL_WEIGHTS.numpy().astype(np.float64)
    return float((per * w).sum() / (len(p) * w.sum()))


def standardize(X: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X[rows].mean(axis=0)
    std = X[rows].std(axis=0)
    return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


def fit_predict(slices: pd.DataFrame, X: np.ndarray, y: np.ndarray, folds: np.ndarray, base: np.ndarray | None,
                tests: dict[int, tuple[pd.DataFrame, np.ndarray, np.ndarray | None]] | None, params: dict,
                progress: bool = True) -> SequenceResult:
    """Train the K members in lockstep with honest epochs (module docstring); predict OOF and test.

    X: (n, d) stacking.features.series_inputs of the OOF rows (row order of `slices`); base: the
    mean stage-one OOF probability to start from (or None); tests: fold k ->
    (test slices, series_inputs of fold model k's test outputs, its base).
    params: the config's `sequence` settings (stacking.config.DEFAULT_SEQUENCE).
    """
    device = device_of(params["device"])
    if params["num_threads"]:
        torch.set_num_threads(int(params["num_threads"]))
    fold_ids = [int(k) for k in sorted(np.unique(folds))]
    if tests is not None and sorted(tests) != fold_ids:
        raise ValueError(f"tests needs the test inputs of each fold model {fold_ids}, got {sorted(tests)}")
    held = {k: np.flatnonzero(folds == k) for k in fold_ids}
    nets, opts, averaged, data, train_series, valid_series, norms, snapshots = {}, {}, {}, {}, {}, {}, {}, {}
    for k in fold_ids:
        torch.manual_seed(params["seed"] + k)
        norms[k] = standardize(X, np.flatnonzero(folds != k))
        data[k] = _Data((X - norms[k][0]) / norms[k][1], base, y, device)
        train_series[k] = Series.of(slices, np.flatnonzero(folds != k))
        valid_series[k] = Series.of(slices, held[k])
        nets[k] = SeriesNet(X.shape[1], params["hidden"], params["layers"], params["dropout"]).to(device)
        opts[k] = torch.optim.AdamW(nets[k].parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
        steps = sum(1 for _ in train_series[k].batches(params["batch_size"]))
        averaged[k] = AveragedModel(nets[k], multi_avg_fn=get_ema_multi_avg_fn(1 - 1 / max(steps, 2)))
        snapshots[k] = []
    epochs, patience = params["epochs"], params["patience"]
    curves = np.empty((len(fold_ids), epochs))
    best_own = {k: (np.inf, None) for k in fold_ids}  # the optimistic protocol, for comparison only
    bar = tqdm(total=epochs, desc="stage two: sequence", unit="epoch", disable=not progress)
    trained = epochs
    for t in range(epochs):
        for i, k in enumerate(fold_ids):
            rng = np.random.default_rng([params["seed"], k, t])
            nets[k].train()
            for which in train_series[k].batches(params["batch_size"], rng):
                out, rows = data[k].logits(nets[k], train_series[k], which)
                loss = _loss(out, data[k].y[rows])
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                opts[k].step()
                averaged[k].update_parameters(nets[k])
            p = predict(averaged[k].module, data[k], valid_series[k], len(X), params["batch_size"])[held[k]]
            curves[i, t] = _weighted_log_loss(p, y[held[k]])
            snapshots[k].append(copy.deepcopy(averaged[k].module.state_dict()))
            if curves[i, t] < best_own[k][0]:
                best_own[k] = (curves[i, t], p)
        bar.update(1)
        bar.set_postfix(valid=f"{curves[:, t].mean():.4f}")
        if pick_rounds(curves[:, :t + 1], patience)[1].all():
            trained = t + 1
            break
    bar.close()
    curves = curves[:, :trained]
    honest, _ = pick_rounds(curves, patience)
    optimistic, _ = early_stop(curves, patience)
    result = SequenceResult(oof=np.full(y.shape, np.nan), oof_optimistic=np.full(y.shape, np.nan),
                            test=None if tests is None else np.zeros((len(next(iter(tests.values()))[0]), 6)),
                            curves=curves)
    for i, k in enumerate(fold_ids):
        n = int(honest[i])
        member = Member(snapshots[k][n - 1], *norms[k], X.shape[1], n)
        result.members[k], result.epochs[k], result.epochs_optimistic[k] = member, n, int(optimistic[i])
        net = build(member, params, device)
        result.oof[held[k]] = predict(net, data[k], valid_series[k], len(X), params["batch_size"])[held[k]]
        result.oof_optimistic[held[k]] = best_own[k][1]
        if tests is not None:
            t_slices, t_X, t_base = tests[k]
            result.test += apply_member(member, params, t_slices, t_X, t_base, device) / len(fold_ids)
    return result


def build(member: Member, params: dict, device) -> SeriesNet:
    net = SeriesNet(member.n_inputs, params["hidden"], params["layers"], params["dropout"]).to(device)
    net.load_state_dict(member.state)
    return net.eval()


def apply_member(member: Member, params: dict, slices: pd.DataFrame, X: np.ndarray, base: np.ndarray | None,
                 device=None) -> np.ndarray:
    """Probabilities (n, 6) of one trained member on new slices (X: their series_inputs, base: stage one)."""
    device = device or device_of(params["device"])
    if X.shape[1] != member.n_inputs:
        raise ValueError(f"the sequence member was trained on {member.n_inputs} inputs per slice, got {X.shape[1]}")
    data = _Data((X - member.mean) / member.std, base, None, device)
    return predict(build(member, params, device), data, Series.of(slices), len(X), params["batch_size"])
