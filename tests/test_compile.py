"""train.compile with progressive resizing: one static graph per input size and mode, built once.

Counted with dynamo's own counter (`unique_graphs`) and its recompile log. The
backend is aot_eager: dynamo's graphs, guards and recompiles are those of
inductor, without the minutes of C++ compiling each graph costs on a CPU
(4 graphs of test_resnet took 100 s with inductor on the 2-core VM).
"""
import logging

import pandas as pd
import pytest
import torch
from torch._dynamo.utils import counters

from conftest import write_config
from models import net
from models.config import load_experiment


class Recompiles(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def recompile_log():
    handler = Recompiles()
    logger = logging.getLogger("torch._dynamo")
    torch._logging.set_logs(recompiles=True)
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)
    torch._logging.set_logs()


def test_each_progressive_size_compiles_once_for_training_and_once_for_evaluation(prepared, tmp_path, monkeypatch,
                                                                                recompile_log):
    """train_fold on a small part of two folds, then each fold's OOF pass (flip TTA), as run_experiment does."""
    from models import trainer
    from models.data import with_neighbors
    from models.inference import make_loader, predict
    from models.runtime import setup
    monkeypatch.setattr(net, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    sizes = [32, 40, 48]
    cfg = load_experiment(write_config(
        tmp_path, "prog", input={"size": 48, "progressive": [[s, 1] for s in sizes]},
        augment={"hflip": 0.0}, train={"epochs": 3, "compile": True, "batch_size": 32, "tta_hflip": True}))
    clean = prepared / "clean" / "train"
    slices = with_neighbors(pd.read_parquet(clean / "slices.parquet"))
    runtime, built, histories = setup("none", False), [], []
    (tmp_path / "m").mkdir()

    def fold(k):
        # 100 training images: 3 full batches and a short one, which a compiled run drops
        data = trainer.FoldData(train=slices[slices["fold"] != k].iloc[:100],
                                valid=slices[slices["fold"] == k].iloc[:40], clean_dir=clean)
        model, history = trainer.train_fold(cfg, k, data, tmp_path / "m", runtime, resume=False, progress=False,
                                            log=lambda *a: None)
        valid = trainer.make_dataset(cfg, data.valid, clean, cfg.final_size, train=False)
        predict(model, make_loader(valid, runtime, cfg.train.batch_size * 2, 0), runtime, tta_hflip=True,
                progress=False)
        built.append(counters["stats"]["unique_graphs"])
        histories.append(history)

    fold(0)
    # three sizes x (training, evaluation); the OOF pass with flip TTA reuses the final size's eval graph.
    # Dynamic shapes would build fewer (one dynamic graph for sizes 40 and 48), a short last batch more.
    assert built == [2 * len(sizes)], recompile_log
    assert not any("grad_mode" in m for m in recompile_log), recompile_log  # eval is no recompile of train
    fold(1)
    assert built[1] == built[0], recompile_log  # the next fold's new model reuses every graph
    assert (histories[0]["compile_s"] > 0).all() and (histories[0]["img_per_s"] > 0).all()
    assert (histories[1]["compile_s"] == 0).all()
