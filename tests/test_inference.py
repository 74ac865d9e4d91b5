"""Stage-one inference (models.inference, models.predict_split) on its reworked input path.

predict must give the outputs the straightforward loop gave (a `.cpu()` per
batch), make every item exactly once, feed a compiled model full batches only,
require_fold_checkpoints is the one "no fold checkpoints" check.
"""
from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from models.inference import make_loader, padded, predict
from models.net import SliceNet
from models.runtime import setup

N, SIZE = 21, 32


class CountingSet(Dataset):
    """uint8 images; counts the items made, in whatever process makes them."""

    def __init__(self, n: int = N):
        self.images = np.random.default_rng(0).integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8)
        self.made = mp.Value("i", 0)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        with self.made.get_lock():
            self.made.value += 1
        return torch.from_numpy(self.images[i]), torch.zeros(6), i


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SliceNet("test_resnet").eval()


def reference(model, dataset, batch_size, tta=True):
    """The loop as it was before the rework: two device->host copies per batch, float16 on the host."""
    probs, embs = [], []
    with torch.no_grad():
        for x, _, _ in DataLoader(dataset, batch_size=batch_size):
            logits, emb = model(x, return_embedding=True)
            prob = model.probabilities(logits)
            if tta:
                logits_f, emb_f = model(torch.flip(x, dims=[3]), return_embedding=True)
                prob = (prob + model.probabilities(logits_f)) / 2
                emb = (emb + emb_f) / 2
            probs.append(prob.cpu().numpy())
            embs.append(emb.float().cpu().numpy().astype(np.float16))
    return np.concatenate(probs), np.concatenate(embs)


@pytest.mark.parametrize("tta", [True, False])
def test_outputs_equal_the_per_batch_copy_loop(model, tta):
    ds = CountingSet()
    probs, emb = predict(model, make_loader(ds, setup("none", False), 8, 0), setup("none", False), tta_hflip=tta,
                         progress=False)
    ref_probs, ref_emb = reference(model, ds, 8, tta)
    np.testing.assert_array_equal(probs, ref_probs)
    assert emb.dtype == np.float16 and np.array_equal(emb.view(np.uint16), ref_emb.view(np.uint16))
    no_emb = predict(model, make_loader(ds, setup("none", False), 8, 0), setup("none", False), tta_hflip=tta,
                     embeddings=False, progress=False)
    assert no_emb[1] is None and np.array_equal(no_emb[0], probs)


@pytest.mark.parametrize("progress", [False, True])
def test_every_item_is_made_once(model, progress):
    """tqdm.auto iterated a DataLoader twice: its first pass started the workers and loaded
    prefetch_factor x num_workers batches that were thrown away."""
    ds = CountingSet()
    rt = setup("none", False)
    predict(model, make_loader(ds, rt, 4, 1), rt, tta_hflip=False, progress=progress)
    assert ds.made.value == N


def test_a_compiled_model_sees_full_batches_only(model):
    """A short last batch is padded to the loader's batch size (torch.compile would compile
    again for it); the padding rows are dropped, the outputs stay those of the plain loop."""
    shapes = []
    hook = model.backbone.register_forward_hook(lambda m, args, out: shapes.append(args[0].shape[0]))
    model.__dict__["_compiled"] = model.backbone  # stands in for torch.compile(backbone): same function
    try:
        rt = setup("none", False)
        probs, emb = predict(model, make_loader(CountingSet(), rt, 8, 0), rt, progress=False)
    finally:
        model.__dict__["_compiled"] = None
        hook.remove()
    assert set(shapes) == {8} and len(shapes) == 2 * 3  # 21 images: 3 batches, x2 for the flip
    ref_probs, ref_emb = reference(model, CountingSet(), 8)
    np.testing.assert_allclose(probs, ref_probs, atol=1e-6, rtol=0)
    np.testing.assert_allclose(emb.astype(np.float32), ref_emb.astype(np.float32), atol=1e-3, rtol=1e-3)
    x = torch.arange(3 * 2).view(3, 2)
    assert padded(x, 5).tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]] and padded(x, 0) is x


def test_require_fold_checkpoints(tmp_path):
    """The one "no fold checkpoints" check (models.predict_split), which stage one on test uses."""
    from types import SimpleNamespace

    from models.predict_split import InferenceError, require_fold_checkpoints
    from models.runtime import Runtime
    from pipeline.engine import Engine
    exp = tmp_path / "exp_a"
    exp.mkdir()
    (exp / "fold1.last.pt").write_bytes(b"")  # a resume state is not a fold model
    message = f"no fold checkpoints in {exp}: run train.py for exp_a first"
    with pytest.raises(InferenceError) as err:
        require_fold_checkpoints(exp)
    assert str(err.value) == message
    with pytest.raises(InferenceError) as err:
        require_fold_checkpoints(tmp_path / "missing")
    assert str(err.value) == f"no fold checkpoints in {tmp_path / 'missing'}: run train.py for missing first"
    with pytest.raises(InferenceError) as err:
        Engine(SimpleNamespace(experiments=["exp_a"], batch_size=4), tmp_path, Runtime(device=torch.device("cpu")),
               stage_two=False)
    assert str(err.value) == message
    for k in (2, 0):
        (exp / f"fold{k}.pt").write_bytes(b"")
    assert require_fold_checkpoints(exp) == {0: exp / "fold0.pt", 2: exp / "fold2.pt"}
