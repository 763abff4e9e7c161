"""Filter assessment: the batched suffix-only ablation must equal a naive per-channel full-model loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _deeppatch_fixtures import TinyCNN, synthetic, to_onnx_and_back, train_tiny
from onnxrepair.data.contract import InputContract
from onnxrepair.localize.filters import assess_filters, conv_nodes
from onnxrepair.nn import first_output
from onnxrepair.perturb.blur import gaussian_blur


class _ResBlock(torch.nn.Module):
    """A skip connection around a conv: the suffix must read a live-in from before the split."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.c2 = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        b = torch.relu(self.c2(a)) + a
        return self.fc(b.mean((2, 3)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = synthetic(160, seed=3)
    model = train_tiny(TinyCNN(), data, epochs=6)
    gm = to_onnx_and_back(model, tmp_path_factory.mktemp("loc") / "tiny.onnx")
    c = InputContract(scale=255.0)
    unit = c.to_unit(data.x)
    return gm, unit, gaussian_blur(unit, 1.5), torch.as_tensor(data.y)


def _naive(gm, x_clean, x_pert, y, method):
    """One full forward per channel with a hook editing the conv output."""
    out = {}
    mods = dict(gm.named_modules())
    for node, conv in conv_nodes(gm):
        clean_map = {}
        h = conv.register_forward_hook(lambda m, i, o: clean_map.setdefault("o", o))
        gm(x_clean)
        h.remove()
        base = first_output(gm(x_pert))
        acc = []
        for c in range(conv.out_channels):
            def hook(m, i, o, c=c):
                o = o.clone()
                o[:, c] = 0.0 if method == "perfloss" else clean_map["o"][:, c]
                return o

            h = conv.register_forward_hook(hook)
            o = first_output(gm(x_pert))
            h.remove()
            acc.append(float((o.argmax(1) == y).float().mean()))
        b = float((base.argmax(1) == y).float().mean())
        acc = np.array(acc)
        out[node.name] = b - acc if method == "perfloss" else acc - b
    return out


@pytest.mark.parametrize("method", ["perfloss", "featswap"])
@torch.no_grad()
def test_batched_equals_naive(setup, method):
    gm, clean, pert, y = setup
    fast = assess_filters(gm, clean, pert, y, method=method, group=5, batch_size=64)
    slow = _naive(gm, clean, pert, y, method)
    assert set(fast) == set(slow) and len(fast) == 3
    for name, s in fast.items():
        np.testing.assert_allclose(s.acc_score, slow[name], atol=1e-6)  # one sample is 1/len(y) >> 1e-6
        assert s.n_samples == len(y)
    # featswap scores are not all zero on a blur-sensitive model (the test can fail)
    assert any(np.abs(s.acc_score).max() > 0 for s in fast.values())


@torch.no_grad()
def test_skip_connection_and_ranking_order(tmp_path):
    torch.manual_seed(0)
    gm = to_onnx_and_back(_ResBlock().eval(), tmp_path / "res.onnx")
    x = torch.rand(40, 1, 12, 12)
    y = torch.randint(0, 4, (40,))
    fast = assess_filters(gm, x, gaussian_blur(x, 2.0), y, method="perfloss", group=4, batch_size=16)
    slow = _naive(gm, x, gaussian_blur(x, 2.0), y, "perfloss")
    for name, s in fast.items():
        np.testing.assert_allclose(s.acc_score, slow[name], atol=1e-6)  # one sample is 1/len(y) >> 1e-6
        order = s.order
        # perfloss: most blamed = smallest harm from masking
        assert s.acc_score[order[0]] == s.acc_score.min()
        assert sorted(order.tolist()) == list(range(len(s.acc_score)))


@torch.no_grad()
def test_stable_assessment_stops_early_with_the_scores_of_the_samples_it_used(setup):
    """``stable``: a conv stops once its blamed set repeats; its scores are exactly a full run's on the samples it used."""
    gm, clean, pert, y = setup
    k = lambda c: c // 4  # noqa: E731
    early = assess_filters(gm, clean, pert, y, method="featswap", batch_size=16, stable=1, top_k=k)
    full = assess_filters(gm, clean, pert, y, method="featswap", batch_size=16)
    assert all(s.n_samples == len(y) for s in full.values())
    used = {name: s.n_samples for name, s in early.items()}
    assert min(used.values()) < len(y), used  # measured: every conv of the tiny CNN stops by 48 of 160 samples
    for name, s in early.items():
        ref = assess_filters(gm, clean[: s.n_samples], pert[: s.n_samples], y[: s.n_samples], method="featswap",
                             batch_size=16, layers=[name])[name]
        np.testing.assert_array_equal(s.acc_score, ref.acc_score)
        np.testing.assert_allclose(s.loss_score, ref.loss_score, rtol=1e-12, atol=1e-12)


def test_taylor_is_the_first_order_featswap_loss_change(setup):
    """``taylor``: channel c's score is the directional derivative of the summed NLL along (clean - perturbed) map of
    c, sign flipped (a recovery). Checked against a central finite difference of the real loss, per channel."""
    gm, clean, pert, y = setup
    clean, pert, y = clean[:48], pert[:48], y[:48]
    fast = assess_filters(gm, clean, pert, y, method="taylor", batch_size=20)  # three batches: sums across them
    assert len(fast) == 3 and all(s.n_samples == 48 and not s.acc_score.any() for s in fast.values())
    eps = 1e-3
    with torch.no_grad():
        for node, conv in conv_nodes(gm):
            maps = {}
            h = conv.register_forward_hook(lambda m, i, o: maps.setdefault("clean", o))
            gm(clean)
            h.remove()
            h = conv.register_forward_hook(lambda m, i, o: maps.setdefault("pert", o))
            gm(pert)
            h.remove()
            delta = maps["clean"] - maps["pert"]
            fd = []
            for c in range(conv.out_channels):
                losses = []
                for sgn in (1, -1):
                    def hook(m, i, o, c=c, sgn=sgn):
                        o = o.clone()
                        o[:, c] += sgn * eps * delta[:, c]
                        return o

                    h = conv.register_forward_hook(hook)
                    out = first_output(gm(pert)).double()
                    h.remove()
                    losses.append(float(torch.nn.functional.cross_entropy(out, y, reduction="sum")))
                fd.append(-(losses[0] - losses[1]) / (2 * eps) / len(y))
            s = fast[node.name]
            np.testing.assert_allclose(s.loss_score, fd, rtol=2e-2, atol=2e-4)
            assert np.abs(s.loss_score).max() > 1e-3  # not trivially zero
            assert s.top(2) == [int(i) for i in np.argsort(-np.array(fd), kind="stable")[:2]]
