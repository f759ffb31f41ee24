"""Gradients through time and clipping, recorded while training (captioner/training/grad_flow.py,
optimization.py): the recorded dL/dh_t against autograd on hand-written cells, clipping on and off,
and the records reaching the metrics log, the checkpoint, `captioner info` and the curves."""

import json
from pathlib import Path

import pytest
import torch

from captioner.cli import main
from captioner.data.vocab import END, START
from captioner.model.decoder import CaptionDecoder, DecoderConfig
from captioner.training.grad_flow import flow_record, hidden_gradients
from captioner.training.loop import train
from captioner.training.optimization import grad_scaler, optimization_step

from test_training import tiny_config, tiny_dataset  # noqa: F401 (a fixture)


def cell_step(cell: str, module, x, state):
    """One step of PyTorch's documented equations, written out (gate orders: LSTM i, f, g, o; GRU r, z, n)."""
    w_ih, w_hh, b_ih, b_hh = module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0
    if cell == "rnn":
        return torch.tanh(x @ w_ih.T + b_ih + state @ w_hh.T + b_hh)
    if cell == "gru":
        xr, xz, xn = (x @ w_ih.T + b_ih).chunk(3, dim=1)
        hr, hz, hn = (state @ w_hh.T + b_hh).chunk(3, dim=1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * state
    h, c = state
    i, f, g, o = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_the_recorded_gradient_through_time_is_autograds(cell):
    torch.manual_seed(0)
    decoder = CaptionDecoder(DecoderConfig(feature_dim=4, vocab_size=7, embed_dim=2, hidden_dim=3, dropout=0.0,
                                           cell=cell))
    features = torch.randn(2, 4)
    captions = torch.tensor([[START, 4, 5, 6, END], [START, 6, END, 0, 0]])
    lengths = torch.tensor([5, 3])
    recorded, reach, cell_reach = hidden_gradients(decoder, features, captions, lengths)
    assert all(p.grad is None for p in decoder.parameters())  # the record leaves training's gradients alone
    # by hand: the same weights, the cell's equations, the hidden state of every step kept for autograd
    projected = decoder.w_ih(features)
    if cell == "lstm":
        state = (projected[:, :3], projected[:, 3:6])
    else:
        state = projected[:, :3]
    hidden, cells, losses = [], [], []
    for t in range(4):
        state = cell_step(cell, decoder.recurrent, decoder.embed(captions[:, t]), state)
        h = state[0] if cell == "lstm" else state
        h.retain_grad()
        hidden.append(h)
        if cell == "lstm":  # c_t as the next step reads it: its gradient is the cell state's path alone
            state = (h, state[1] * 1.0)
            cells.append(state[1])
        losses.append(torch.nn.functional.cross_entropy(decoder.classifier(h), captions[:, t + 1], ignore_index=0,
                                                        reduction="sum"))
    # the last word's loss alone: caption 0's at t = 3 (its <end>), caption 1's at t = 1
    last_loss = sum(torch.nn.functional.cross_entropy(decoder.classifier(hidden[t][i]), captions[i, t + 1])
                    for i, t in ((0, 3), (1, 1)))
    last = [g.norm(dim=1) for g in torch.autograd.grad(last_loss, hidden, retain_graph=True)]
    if cell == "lstm":  # along the cell state: 0 at a caption's last word, whose loss reads h_T
        on_c = [g.norm(dim=1) for g in torch.autograd.grad(last_loss, cells[:3], retain_graph=True)]
        assert cell_reach.tolist() == pytest.approx([0.0, float(on_c[2][0] + on_c[0][1]) / 2, float(on_c[1][0]),
                                                     float(on_c[0][0])], rel=1e-4, abs=1e-9)
    else:
        assert cell_reach is None
    for h in hidden:
        h.grad = None  # a retained gradient collects autograd.grad's too
    (sum(losses) / (lengths - 1).sum()).backward()
    by_hand = [h.grad.norm(dim=1)[: int((lengths - 1 > t).sum())].mean() for t, h in enumerate(hidden)]
    assert recorded.tolist() == pytest.approx([float(v) for v in by_hand], rel=1e-4)
    # d steps back from each caption's last word, averaged over the captions that long
    reach_by_hand = [(last[3][0] + last[1][1]) / 2, (last[2][0] + last[0][1]) / 2, last[1][0], last[0][0]]
    assert reach.tolist() == pytest.approx([float(v) for v in reach_by_hand], rel=1e-4)
    assert float(last[0][0]) > 0  # h_1 hears the 4th word's loss only through time
    # through time: h_1's gradient carries the later words' losses, so it is not the first word's alone
    assert recorded[0] > 0 and len(recorded) == 4
    record = flow_record(10, recorded, reach, lengths, cell_reach)
    assert record["step"] == 10 and len(record["dL_dh"]) == 2  # the lower median of 4 and 2 words
    assert record["ratio_first_last"] == pytest.approx(record["dL_dh"][0] / record["dL_dh"][-1], rel=1e-3)
    assert record["dlT_dh"] == pytest.approx([float(reach[1]), float(reach[0])], rel=1e-3)  # h_{T-1}, h_T
    assert record["ratio_last_word"] == pytest.approx(float(reach[1] / reach[0]), rel=1e-3)
    if cell == "lstm":
        assert record["ratio_last_word_cell"] == pytest.approx(float(cell_reach[1] / reach[0]), rel=1e-3)


def test_clipping_off_leaves_gradients_as_they_are_and_a_tiny_norm_clips_them():
    torch.manual_seed(0)
    weights = torch.nn.Parameter(torch.randn(5))
    for clip_norm, expected_norm in ((0.0, None), (1e-3, 1e-3)):
        start = weights.detach().clone()
        optimizer = torch.optim.SGD([weights], lr=1.0)
        loss = (weights * torch.arange(5.0)).sum() * 3
        norm = optimization_step(loss, optimizer, grad_scaler(torch.device("cpu"), "fp32"), clip_norm)
        step = start - weights.detach()
        assert norm == pytest.approx(3 * torch.arange(5.0).norm().item())
        if expected_norm is None:
            assert torch.equal(step, 3 * torch.arange(5.0))  # unclipped, exactly
        else:
            assert step.norm().item() == pytest.approx(expected_norm, rel=1e-3)


def test_training_logs_gradients_and_clipping_and_the_checkpoint_keeps_the_record(tiny_dataset, tmp_path, capsys):
    off = train(tiny_config(tiny_dataset, tmp_path / "off", epochs=2, clip_norm=0.0, grad_flow_every=1))
    rows = [json.loads(line) for line in (tmp_path / "off" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["clipped_share"] == 0.0 and r["grad_norm_max"] > 0 for r in rows)
    assert [f["step"] for r in rows for f in r["grad_flow"]] == list(range(rows[-1]["step"]))  # every step
    tiny = train(tiny_config(tiny_dataset, tmp_path / "tiny", epochs=2, clip_norm=1e-6, grad_flow_every=2))
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["clipped_share"] == 1.0 for r in rows)
    saved = json.loads((tiny / "config.json").read_text())["training"]
    assert [f["step"] for f in saved["grad_flow"]] == [f["step"] for r in rows for f in r["grad_flow"]]
    assert main(["info", str(tiny)]) == 0
    err = capsys.readouterr().err
    assert "LSTM: |dL/dh_1| / |dL/dh_T| = " in err and f"at step {saved['grad_flow'][-1]['step']}" in err
    assert f"the last word's |dl_T/dh_1| / |dl_T/dh_T| = {saved['grad_flow'][-1]['ratio_last_word']:.4g}" in err
    assert f"|dl_T/dc_1| / |dl_T/dh_T| = {saved['grad_flow'][-1]['ratio_last_word_cell']:.4g}" in err
    assert (tmp_path / "tiny" / "run" / "curves.png").stat().st_size > 0
    assert "grad_flow" in json.loads((off / "config.json").read_text())["training"]
    # the web UI's Model tab: the run's whole curves beside its best/, else the records kept in the config
    from app import training_curves

    config = json.loads((tiny / "config.json").read_text())
    assert Path(training_curves(config, str(tiny))).stat().st_size > 0
    assert Path(training_curves(config, None)).stat().st_size > 0
    assert training_curves({"training": {}}, None) is None
