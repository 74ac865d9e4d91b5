"""Stage two's sequence member: a small network along each series, as the 1st and 2nd places stacked.

SeuTao (1st, 2019) ran bidirectional GRUs over each series' per-slice CNN
outputs; darraghdog (2nd) an LSTM over the pooled embeddings in series
order. The member here is their common core, sized for stage two's inputs:

    per slice: every experiment's stage-one logits, its aligned PCA
               components (stacking.run), the relative position, the z
               spacing (and the brain fraction when slices.parquet has it),
               standardized on the member's own training rows
    -> Linear + GELU (per-slice projection)
    -> bidirectional GRU over the series in z-order (padded batches, the
       backward direction run on each series reversed in place: no padded
       step enters either direction)
    -> Linear on [projection, GRU state] -> a correction to the six logits

With `start_from_stage_one` (as LightGBM's init score) the output is
logit(mean stage-one probability) + correction, and the head starts at zero,
so an untrained member is stage one and training learns what the
neighbours add. The loss is the competition's: binary cross-entropy with
weight 2 for `any`, 1 for the subtypes, over every real slice.

On the winners' lines, each an option of the settings (stacking.config.DEFAULT_SEQUENCE, off
there; configs/predict/default.yaml says which the real run uses, BENCHMARKS.md why): the
neighbours' differences as inputs (`diffs`, the 2nd place), feature dropout (`input_dropout`),
random windows of `crop` slices in training and an auxiliary per-slice head (`aux_weight`; both
the 1st place), series read either way with the mean of both at prediction (`flip`), several
seeds per member (`seeds`), and a fixed schedule (`schedule: cosine`: every member trains
`epochs` epochs with the learning rate falling to 0 and keeps the last, so no epoch is picked
on any fold: honest by construction, and no patience epochs are spent past the best one).

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
  the prediction is the mean over k;
- for the blend, member j also predicts fold j at the epoch picked without
  fold j *and* fold k, for fold k's blend weights (stacking.model.pick_pairs):
  every epoch's weights are kept, so this costs predictions, not training.

This module imports torch; the rest of stacking/ does not (tests/test_layout.py),
so a LightGBM-only stage two runs without it, and stacking.run / stacking.apply
import this module only when the config lists the member.
"""
from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from ich.labels import LABELS

from .model import early_stop, logit, pick_pairs

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
        """Series indices per batch: series of similar lengths together (little padding).

        The series are sorted by length (ties in random order with rng), cut
        into batches, and the batches shuffled (rng) or kept in order.
        Padding sits at each series' end, which the network masks and reverses
        around (`SeriesNet`), so a batch may mix lengths exactly.
        """
        tie = rng.random(len(self.lengths)) if rng is not None else np.arange(len(self.lengths))
        order = np.lexsort((tie, self.lengths))
        groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for i in (rng.permutation(len(groups)) if rng is not None else range(len(groups))):
            yield groups[i]


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each series' real steps in reverse order, its padding left at the end: (B, T, c) -> (B, T, c)."""
    t = torch.arange(x.shape[1], device=x.device)[None, :]
    n = lengths.to(x.device)[:, None]
    index = torch.where(t < n, n - 1 - t, t)
    return torch.gather(x, 1, index[..., None].expand_as(x))


# --- the network ---------------------------------------------------------------------------------------

class Dropout(nn.Module):
    """nn.Dropout that draws from the network's own generator (`use_generator`), not torch's
    global one: members trained side by side in threads (`fit_predict`) would otherwise interleave their
    draws in whatever order the threads run, and no two runs would train the same members."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.generator = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=self.generator)
        return x * keep / (1 - self.p)


class SeriesNet(nn.Module):
    """Per-slice projection, bidirectional GRU along the series, per-slice head (module docstring).

    The two directions are two unidirectional GRUs, the backward one run on
    each series reversed in place (`reverse_padded`): with padding at the
    end, neither direction ever reads a padded step before a real one, so
    series of different lengths share a batch exactly, without packing
    (which made a CPU training step about 3x slower, measured). Several
    layers stack as in nn.GRU(bidirectional=True): each layer reads both
    directions of the one below.

    Options on the winners' lines (stacking.config.DEFAULT_SEQUENCE):
    diffs: the projection also reads each input's difference to the previous
    and to the next slice of the series (0 at its ends), as the 2nd place fed
    its LSTMs; input_dropout: in training, each series loses a random share
    of its input channels (all slices alike; the inputs are standardized, so
    0 is the channel's mean), as the 1st place's feature dropout; aux: a
    second per-slice head on the projection alone, trained beside the main
    one (`aux_weight`), so the projection must carry each slice's own
    evidence. In training the output is [main, aux] on the last axis (12
    channels); in eval the main head's 6.
    """

    def __init__(self, n_inputs: int, hidden: int = 64, layers: int = 1, dropout: float = 0.1,
                 diffs: bool = False, input_dropout: float = 0.0, aux: bool = False):
        super().__init__()
        self.diffs, self.input_dropout = diffs, input_dropout
        self.proj = nn.Sequential(nn.Linear(n_inputs * (3 if diffs else 1), hidden), nn.GELU(), Dropout(dropout))
        self.forward_grus = nn.ModuleList(nn.GRU(hidden if i == 0 else 2 * hidden, hidden, batch_first=True)
                                          for i in range(layers))
        self.backward_grus = nn.ModuleList(nn.GRU(hidden if i == 0 else 2 * hidden, hidden, batch_first=True)
                                           for i in range(layers))
        self.drop = Dropout(dropout)
        self.generator = None  # every random draw in training (dropout, feature dropout) comes from it
        self.head = nn.Linear(3 * hidden, len(LABELS))
        nn.init.zeros_(self.head.weight)  # starts as "no correction": stage one, when it starts from it
        nn.init.zeros_(self.head.bias)
        self.aux = None
        if aux:
            self.aux = nn.Linear(hidden, len(LABELS))
            nn.init.zeros_(self.aux.weight)
            nn.init.zeros_(self.aux.bias)

    def inputs(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x with feature dropout (training) and neighbour differences (options), (B, T, d) -> (B, T, d')."""
        if self.training and self.input_dropout > 0:
            keep = torch.rand(x.shape[0], 1, x.shape[2], device=x.device, generator=self.generator) >= self.input_dropout
            x = x * keep / (1 - self.input_dropout)
        if not self.diffs:
            return x
        t = torch.arange(x.shape[1], device=x.device)[None, :, None]
        n = lengths.to(x.device)[:, None, None]
        zero = torch.zeros_like(x[:, :1])
        behind = torch.where(t >= 1, x - torch.cat([zero, x[:, :-1]], 1), 0.0)
        ahead = torch.where(t < n - 1, torch.cat([x[:, 1:], zero], 1) - x, 0.0)
        return torch.cat([x, behind, ahead], dim=-1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x (B, T, d), lengths (B,): series padded at their ends -> (B, T, 6) logits (corrections);
        the outputs at padded steps mean nothing."""
        h = self.proj(self.inputs(x, lengths))
        z = h
        for i, (fwd, bwd) in enumerate(zip(self.forward_grus, self.backward_grus)):
            if i:
                z = self.drop(z)
            ahead, _ = fwd(z)
            behind, _ = bwd(reverse_padded(z, lengths))
            z = torch.cat([ahead, reverse_padded(behind, lengths)], dim=-1)
        out = self.head(self.drop(torch.cat([h, z], dim=-1)))
        if self.training and self.aux is not None:
            return torch.cat([out, self.aux(h)], dim=-1)
        return out


class Seeds(nn.Module):
    """Several SeriesNets from other seeds, trained side by side on the same batches: in eval the mean of
    their logits (seed averaging, as the 2nd place averaged 4 seeds); in training their outputs side by
    side on the last axis, so that each net's loss is its own (`_loss`)."""

    def __init__(self, nets: list[SeriesNet]):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        outs = [net(x, lengths) for net in self.nets]
        return torch.cat(outs, dim=-1) if self.training else torch.stack(outs).mean(dim=0)


def use_generator(net: nn.Module, generator: torch.Generator) -> None:
    """Every random draw of `net` in training (dropout, feature dropout) from `generator`: the member's own."""
    for m in net.modules():
        if isinstance(m, (Dropout, SeriesNet)):
            m.generator = generator


def make_net(n_inputs: int, params: dict) -> nn.Module:
    """The member's network as the settings say: one SeriesNet, or `seeds` of them (`Seeds`)."""
    net = lambda: SeriesNet(n_inputs, params["hidden"], params["layers"], params["dropout"],  # noqa: E731
                            params.get("diffs", False), params.get("input_dropout", 0.0),
                            params.get("aux_weight", 0.0) > 0)
    seeds = params.get("seeds", 1)
    return net() if seeds == 1 else Seeds([net() for _ in range(seeds)])


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
    train_curves: np.ndarray | None = None  # (K, epochs trained) mean training loss of the epoch (main head)
    epochs: dict = field(default_factory=dict)            # k -> n_k (honest)
    epochs_optimistic: dict = field(default_factory=dict)  # k -> best epoch on fold k
    nested: np.ndarray | None = None     # (K, n_train, 6): [i] = folds != i at epochs picked without fold i too


def device_of(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("sequence.device is cuda but torch sees no GPU: set sequence.device: auto or cpu")
    return torch.device(setting)


class _Data:
    """Inputs, base logits and labels on the device, gathered into padded batches of whole series.

    The K members share one copy of the inputs (torch tensors are not
    copied); each standardizes the rows of its batches with its own
    (mean, std), so memory holds X once, not K times.
    """

    def __init__(self, X, base, y, device, norm: tuple[np.ndarray, np.ndarray] | None = None):
        self.device = device
        self.X = self.tensor(X)
        self.base = None if base is None else self.tensor(base if torch.is_tensor(base) else logit(base))
        self.y = None if y is None else self.tensor(y)
        self.mean, self.std = (None, None) if norm is None else (self.tensor(norm[0]), self.tensor(norm[1]))

    def tensor(self, a) -> torch.Tensor:
        """float32 on the device; a float32 array on the CPU is shared, not copied (the OOF inputs at full scale)."""
        return a if torch.is_tensor(a) else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)

    def logits(self, net: nn.Module, series: Series, which: np.ndarray, flip: bool = False, crop: int = 0,
               rng: np.random.Generator | None = None):
        """Logits (B, T, 6) of a batch of series padded to its longest, their rows (B, T) of X
        (padding: any row) and the mask of real slices (B, T). flip: the network reads each series
        reversed (its outputs put back in slice order), as if the head were scanned the other way.
        crop (with rng): each series longer than `crop` slices cut to a random window of that many.
        A network in training may give several outputs of 6 side by side (aux head, seeds): each
        starts from the base."""
        lengths = series.lengths[which]
        index = series.index[which, :int(lengths.max())]
        if crop and lengths.max() > crop:
            start = (rng.random(len(which)) * np.maximum(lengths - crop + 1, 1)).astype(np.int64)
            index = np.take_along_axis(index, np.minimum(start[:, None] + np.arange(crop), index.shape[1] - 1), 1)
            index = np.where(np.arange(crop) < lengths[:, None], index, -1)
            lengths = np.minimum(lengths, crop)
        index = torch.as_tensor(index, device=self.device)
        mask = index >= 0
        rows = index.clamp(min=0)
        x = self.X[rows]
        if self.mean is not None:
            x = (x - self.mean) / self.std
        n = torch.as_tensor(lengths)
        out = reverse_padded(net(reverse_padded(x, n), n), n) if flip else net(x, n)
        if self.base is not None:
            base = self.base[rows]
            out = out + (base if out.shape[-1] == base.shape[-1] else base.repeat(1, 1, out.shape[-1] // 6))
        return out, rows, mask


def _loss(out, y, mask):
    """The metric's weighted log loss, as a mean over the batch's real slices."""
    w = LABEL_WEIGHTS.to(out.device)
    per = (nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none") * w).sum(-1)
    return (per * mask).sum() / (mask.sum() * w.sum())


def _training_loss(out, y, mask, aux_weight: float) -> tuple[torch.Tensor, float]:
    """(what is minimized, the main heads' loss): out holds one (main[, aux]) group of outputs per
    seed side by side; each seed's main loss, plus aux_weight x its aux loss, averaged over seeds."""
    group = 12 if aux_weight > 0 else 6
    parts = out.split(group, dim=-1)
    main = sum(_loss(p[..., :6], y, mask) for p in parts) / len(parts)
    total = main
    if aux_weight > 0:
        total = main + aux_weight * sum(_loss(p[..., 6:], y, mask) for p in parts) / len(parts)
    return total, float(main.detach())


@torch.no_grad()
def predict(net: SeriesNet, data: _Data, series: Series, n_rows: int, batch_size: int,
            flip: bool = False) -> np.ndarray:
    """Probabilities (n_rows, 6) of every row of `series` (other rows NaN); flip: the mean logit of each
    series read forwards and reversed (test-time augmentation of a member trained with `flip`)."""
    net.eval()
    out = np.full((n_rows, len(LABELS)), np.nan)
    for which in series.batches(batch_size):
        logits, rows, mask = data.logits(net, series, which)
        if flip:
            logits = (logits + data.logits(net, series, which, flip=True)[0]) / 2
        out[rows[mask].cpu().numpy()] = torch.sigmoid(logits[mask].double()).cpu().numpy()
    return out


def eval_batch(params: dict) -> int:
    """Series per batch when predicting: larger than in training (no gradients to keep; on one CPU
    thread 256 series per batch predicted 1.5x faster than 32, measured), the same outputs."""
    return max(params["batch_size"], 256)


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
                progress: bool = True, y_valid: np.ndarray | None = None) -> SequenceResult:
    """Train the K members in lockstep with honest epochs (module docstring); predict OOF and test.

    X: (n, d) stacking.features.series_inputs of the OOF rows (row order of `slices`); base: the
    mean stage-one OOF probability to start from (or None); tests: fold k ->
    (test slices, series_inputs of fold model k's test outputs, its base).
    params: the config's `sequence` settings (stacking.config.DEFAULT_SEQUENCE).
    y_valid: the labels that score each held-out fold (default y; stacking.model.fit_predict).
    """
    y_valid = y if y_valid is None else y_valid
    device = device_of(params["device"])
    threads = int(params["num_threads"]) or torch.get_num_threads()
    if params["num_threads"]:
        torch.set_num_threads(threads)
    fold_ids = [int(k) for k in sorted(np.unique(folds))]
    if tests is not None and sorted(tests) != fold_ids:
        raise ValueError(f"tests needs the test inputs of each fold model {fold_ids}, got {sorted(tests)}")
    members = []
    for k in fold_ids:  # the first member's inputs on the device, shared by all
        members.append(_Fold.start(k, slices, X, y, base, folds, members[0].data if members else None, params, device))
    epochs, patience = params["epochs"], params["patience"]
    fixed = params.get("schedule", "early_stop") == "cosine"
    bar = tqdm(total=epochs, desc="stage two: sequence", unit="epoch", disable=not progress)
    curves, train_curves, trained = _train_side_by_side(members, y_valid, params, fixed, threads, bar)
    bar.close()
    # a fixed schedule picks nothing: every member keeps its last epoch, whatever any fold's curve says
    pairs = np.full((len(fold_ids),) * 2, trained) if fixed else pick_pairs(curves, patience)[0]
    optimistic, _ = early_stop(curves, patience)
    result = SequenceResult(oof=np.full(y.shape, np.nan), oof_optimistic=np.full(y.shape, np.nan),
                            test=None if tests is None else np.zeros((len(next(iter(tests.values()))[0]), 6)),
                            curves=curves, train_curves=train_curves,
                            nested=np.full((len(fold_ids),) + y.shape, np.nan, dtype=np.float32))
    for i, m in enumerate(members):
        k, n = m.k, int(pairs[i, i])
        result.members[k], result.epochs[k], result.epochs_optimistic[k] = m.kept(n), n, int(optimistic[i])
        at = {e: m.predict_at(e, params) for e in sorted(set(pairs[i].tolist()) | {int(optimistic[i])})}
        result.oof[m.held], result.oof_optimistic[m.held] = at[n], at[int(optimistic[i])]
        for other in range(len(fold_ids)):
            if other != i:
                result.nested[other, m.held] = at[int(pairs[i, other])]
        if tests is not None:
            t_slices, t_X, t_base = tests[k]
            result.test += apply_member(result.members[k], params, t_slices, t_X, t_base, device) / len(fold_ids)
    return result


def _train_side_by_side(members: list, y_valid: np.ndarray, params: dict, fixed: bool, threads: int,
                        bar) -> tuple[np.ndarray, np.ndarray, int]:
    """Train the K members' epochs until every honest and nested pick has stopped (or `epochs`); returns
    (validation curves, training curves, epochs trained), each curve (K, epochs trained).

    On the CPU with several threads, the members train side by side, one Python thread each at a time
    and every torch op on one thread: a GRU this small keeps a second core busy only this way (two
    members in two threads trained 1.75-1.87x as fast as one after the other; torch's own two threads
    on one member 1.1x; BENCHMARKS.md). A free thread takes the member with the fewest epochs done, so
    no member runs more than one epoch ahead of the slowest, and training stops as soon as the first t
    epochs of all members decide it: at most one epoch per thread is trained past that and not used.
    Each member's epoch t depends on nothing but its own state and its own random streams (the rng of
    (seed, k, t), its network's generator), so the members, the curves and the epochs picked are the
    same whatever the number of threads (tests/test_stacking_sequence.py).
    """
    K, epochs, patience = len(members), params["epochs"], params["patience"]
    curves, train_curves = np.full((K, epochs), np.nan), np.full((K, epochs), np.nan)
    cond = threading.Condition()
    state = {"next": [0] * K, "busy": [False] * K, "complete": 0, "trained": None}

    def take():  # under the lock: the member to train next and its epoch, or None when there is nothing left
        while state["trained"] is None:
            free = [i for i in range(K) if not state["busy"][i] and state["next"][i] < epochs]
            if free:
                i = min(free, key=lambda i: (state["next"][i], i))
                state["busy"][i] = True
                return i, state["next"][i]
            if not any(state["busy"]):
                return None
            cond.wait()
        return None

    def work():
        while True:
            with cond:
                task = take()
            if task is None:
                return
            i, t = task
            m = members[i]
            try:
                loss = m.epoch(np.random.default_rng([params["seed"], m.k, t]), params)
                valid = m.validate(y_valid, params)
            except BaseException:
                with cond:  # the others stop at their next turn; the error reaches the caller
                    state["trained"] = -1
                    cond.notify_all()
                raise
            with cond:
                train_curves[i, t], curves[i, t] = loss, valid
                state["next"][i], state["busy"][i] = t + 1, False
                while state["trained"] is None and state["complete"] < min(state["next"]):
                    c = state["complete"] = state["complete"] + 1  # every member has trained c epochs
                    bar.update(1)
                    bar.set_postfix(valid=f"{curves[:, c - 1].mean():.4f}")
                    if c == epochs or (not fixed and pick_pairs(curves[:, :c], patience)[1].all()):
                        state["trained"] = c
                cond.notify_all()

    parallel = min(threads, K) if members[0].data.device.type == "cpu" else 1
    if parallel <= 1:
        work()
    else:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(parallel) as pool:
                for f in [pool.submit(work) for _ in range(parallel)]:
                    f.result()
        finally:
            torch.set_num_threads(before)
    trained = state["trained"]
    return curves[:, :trained], train_curves[:, :trained], trained


OPTIMIZERS = {  # the member's optimizer by name (sequence.optimizer), as stage one's models/optim.py
    "adamw": lambda params, s: torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"]),
    "adam": lambda params, s: torch.optim.Adam(params, lr=s["lr"], weight_decay=s["weight_decay"]),
}


def create_optimizer(params, settings: dict) -> torch.optim.Optimizer:
    """The optimizer `settings["optimizer"]` names (stacking.config.DEFAULT_SEQUENCE), at its lr and weight
    decay. Stage two keeps its own table rather than importing models.optim: stacking/ sits below stage
    one and never imports models/ (tests/test_layout.py); the two tables are a few lines each."""
    return OPTIMIZERS[settings["optimizer"]](params, settings)


@dataclass
class _Fold:
    """Member k while it trains: its network, optimizer, weight average, series and kept epochs."""
    k: int
    held: np.ndarray            # rows of fold k (scored by this member only)
    data: _Data                 # the shared inputs, standardized on the member's own training rows
    norm: tuple                 # (mean, std) of the inputs over the training rows
    train_series: Series
    valid_series: Series
    net: SeriesNet
    opt: torch.optim.Optimizer
    averaged: AveragedModel     # the EMA of the weights: what is evaluated and kept
    n_rows: int
    schedule: object = None     # per-step learning-rate schedule (schedule: cosine), or None
    snapshots: list = field(default_factory=list)  # the averaged weights after each epoch

    @classmethod
    def start(cls, k: int, slices: pd.DataFrame, X: np.ndarray, y: np.ndarray, base: np.ndarray | None,
              folds: np.ndarray, shared: _Data | None, params: dict, device) -> "_Fold":
        torch.manual_seed(params["seed"] + k)
        train_rows = np.flatnonzero(folds != k)
        norm = standardize(X, train_rows)
        data = (_Data(X, base, y, device, norm) if shared is None
                else _Data(shared.X, shared.base, shared.y, device, norm))
        train_series = Series.of(slices, train_rows)
        net = make_net(X.shape[1], params).to(device)
        generator = torch.Generator(device=device)
        generator.manual_seed(int(np.random.SeedSequence([params["seed"], k]).generate_state(1)[0]))
        use_generator(net, generator)
        steps = sum(1 for _ in train_series.batches(params["batch_size"]))
        averaged = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(1 - 1 / max(steps, 2)))
        held = np.flatnonzero(folds == k)
        opt = create_optimizer(net.parameters(), params)
        schedule = None
        if params.get("schedule", "early_stop") == "cosine":
            total = max(steps * params["epochs"], 1)
            schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, total) / total)))
        return cls(k, held, data, norm, train_series, Series.of(slices, held), net, opt, averaged, len(X), schedule)

    def epoch(self, rng: np.random.Generator, params: dict) -> float:
        """One pass over the training series (flip: each batch read reversed with probability 1/2; crop:
        random windows); returns the epoch's mean training loss of the main head(s)."""
        self.net.train()
        total, n = 0.0, 0
        for which in self.train_series.batches(params["batch_size"], rng):
            reverse = params["flip"] and rng.random() < 0.5
            out, rows, mask = self.data.logits(self.net, self.train_series, which, flip=reverse,
                                               crop=params.get("crop", 0), rng=rng)
            loss, main = _training_loss(out, self.data.y[rows], mask, params.get("aux_weight", 0.0))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if self.schedule is not None:
                self.schedule.step()
            self.averaged.update_parameters(self.net)
            total, n = total + main, n + 1
        self.snapshots.append(copy.deepcopy(self.averaged.module.state_dict()))
        return total / max(n, 1)

    def validate(self, y_valid: np.ndarray, params: dict) -> float:
        p = predict(self.averaged.module, self.data, self.valid_series, self.n_rows, eval_batch(params),
                    params["flip"])[self.held]
        return _weighted_log_loss(p, y_valid[self.held])

    def kept(self, epochs: int) -> Member:
        return Member(self.snapshots[epochs - 1], *self.norm, self.data.X.shape[1], epochs)

    def predict_at(self, epochs: int, params: dict) -> np.ndarray:
        """Fold k's probabilities from the averaged weights after `epochs` epochs."""
        net = build(self.kept(epochs), params, self.data.device)
        return predict(net, self.data, self.valid_series, self.n_rows, eval_batch(params), params["flip"])[self.held]


def build(member: Member, params: dict, device) -> nn.Module:
    net = make_net(member.n_inputs, params).to(device)
    net.load_state_dict(member.state)
    return net.eval()


def apply_member(member: Member, params: dict, slices: pd.DataFrame, X: np.ndarray, base: np.ndarray | None,
                 device=None) -> np.ndarray:
    """Probabilities (n, 6) of one trained member on new slices (X: their series_inputs, base: stage one)."""
    device = device or device_of(params["device"])
    if X.shape[1] != member.n_inputs:
        raise ValueError(f"the sequence member was trained on {member.n_inputs} inputs per slice, got {X.shape[1]}")
    data = _Data(X, base, None, device, (member.mean, member.std))
    return predict(build(member, params, device), data, Series.of(slices), len(X), eval_batch(params),
                   params.get("flip", False))
