"""train_loop's ``patience``: stop after that many epochs without a better score, keep the best checkpoint."""

from __future__ import annotations

import torch

from onnxrepair.train import train_loop


def _run(scores, patience, epochs=6):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def score(epoch):
        seen.append(epoch)
        return scores[epoch], {"s": scores[epoch]}

    res = train_loop(model, opt, lambda e: [(torch.ones(4, 2), torch.zeros(4, 1))],
                     lambda b, step: ((model(b[0]) - b[1]) ** 2).mean(), epochs=epochs, n_batches=1, score=score, patience=patience)
    return res, seen


def test_patience_stops_after_epochs_without_improvement():
    scores = [0.1, 0.5, 0.4, 0.3, 0.9, 0.2, 0.1]  # a later peak (epoch 4) that patience 2 never reaches
    res, seen = _run(scores, patience=2)
    assert seen == [0, 1, 2, 3] and res.stopped_at == 3 and res.best_epoch == 1
    res, seen = _run(scores, patience=3)
    assert seen == [0, 1, 2, 3, 4, 5, 6] and res.stopped_at is None and res.best_epoch == 4


def test_no_patience_runs_every_epoch():
    res, seen = _run([0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], patience=0)
    assert seen == list(range(7)) and res.stopped_at is None and res.best_epoch == 0
