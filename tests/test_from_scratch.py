"Tests of `captioning.from_scratch`: the hand-written LSTM, GRU, SGD and Adam agree with PyTorch's built-ins."
import pytest
import torch
from torch import nn

from captioning.from_scratch import (AdamFromScratch, SGDFromScratch, gru_forward, lstm_forward,
                                     rnn_weights)

DTYPE = torch.float64  # rounding error ~1e-16, so 1e-10 catches real mistakes and nothing else


def max_err(ours, theirs):
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("seed", [0, 1])
def test_lstm_matches_nn_lstm(seed):
    torch.manual_seed(seed)
    B, T, I, H = 2, 4, 3, 5
    lstm = nn.LSTM(I, H, batch_first=True).to(DTYPE)
    x = torch.randn(B, T, I, dtype=DTYPE, requires_grad=True)          # (B, T, I)
    h0, c0 = torch.randn(B, H, dtype=DTYPE), torch.randn(B, H, dtype=DTYPE)

    out, (h, c) = lstm_forward(x, *rnn_weights(lstm), h0, c0)
    ref_out, (ref_h, ref_c) = lstm(x, (h0[None], c0[None]))
    assert out.shape == (B, T, H) and h.shape == c.shape == (B, H)
    assert max_err([out, h, c], [ref_out, ref_h[0], ref_c[0]]) <= 1e-10

    weights = torch.randn(B, T, H, dtype=DTYPE)  # a loss whose gradient is not symmetric in the outputs
    params = [x, *rnn_weights(lstm)]
    ours = torch.autograd.grad((out * weights).sum() + c.sum(), params)
    theirs = torch.autograd.grad((ref_out * weights).sum() + ref_c[0].sum(), params)
    assert max_err(ours, theirs) <= 1e-10


def test_gru_matches_nn_gru():
    torch.manual_seed(0)
    B, T, I, H = 2, 4, 3, 5
    gru = nn.GRU(I, H, batch_first=True).to(DTYPE)
    x = torch.randn(B, T, I, dtype=DTYPE, requires_grad=True)  # (B, T, I)

    out, h = gru_forward(x, *rnn_weights(gru))                  # default zero initial state
    ref_out, ref_h = gru(x)
    assert out.shape == (B, T, H) and h.shape == (B, H)
    assert max_err([out, h], [ref_out, ref_h[0]]) <= 1e-10

    weights = torch.randn(B, T, H, dtype=DTYPE)
    params = [x, *rnn_weights(gru)]
    ours = torch.autograd.grad((out * weights).sum(), params)
    theirs = torch.autograd.grad((ref_out * weights).sum(), params)
    assert max_err(ours, theirs) <= 1e-10


def _tiny_problem():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(16, 3, generator=gen, dtype=DTYPE)   # (N, 3)
    y = torch.sin(X.sum(1, keepdim=True))                # (N, 1)

    def params():
        g = torch.Generator().manual_seed(1)
        return [torch.randn(3, 4, generator=g, dtype=DTYPE).requires_grad_(),
                torch.randn(4, 1, generator=g, dtype=DTYPE).requires_grad_()]

    def loss(p): return ((torch.tanh(X @ p[0]) @ p[1] - y) ** 2).mean()
    return params, loss


def _follow(make_ours, make_theirs, steps=20):
    params, loss = _tiny_problem()
    ours_p, theirs_p = params(), params()
    ours_opt, theirs_opt = make_ours(ours_p), make_theirs(theirs_p)
    start = loss(ours_p).item()
    for _ in range(steps):
        for opt, p in ((ours_opt, ours_p), (theirs_opt, theirs_p)):
            opt.zero_grad(); loss(p).backward(); opt.step()
        assert max_err(ours_p, theirs_p) <= 1e-10
    assert loss(ours_p).item() < start  # it also trains


@pytest.mark.parametrize("kw", [dict(lr=0.05), dict(lr=0.05, weight_decay=0.1)])
def test_adam_matches_torch_adam(kw):
    _follow(lambda p: AdamFromScratch(p, **kw), lambda p: torch.optim.Adam(p, **kw))


def test_decoupled_adam_matches_torch_adamw():
    _follow(lambda p: AdamFromScratch(p, lr=0.05, weight_decay=0.1, decoupled_weight_decay=True),
            lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1))


def test_sgd_momentum_matches_torch_sgd():
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    _follow(lambda p: SGDFromScratch(p, **kw), lambda p: torch.optim.SGD(p, **kw))


def test_zero_grad_sets_none():
    p = torch.ones(2, dtype=DTYPE, requires_grad=True)
    opt = AdamFromScratch([p])
    p.sum().backward()
    opt.zero_grad()
    assert p.grad is None
    opt.step()  # parameters without a gradient are left alone
    assert torch.equal(p, torch.ones(2, dtype=DTYPE))


def test_adam_counts_steps_per_parameter():
    "A parameter that gets no gradient on some steps keeps its own step count, as in torch.optim.Adam."
    torch.manual_seed(0)
    ours_p = [torch.randn(3, dtype=DTYPE, requires_grad=True) for _ in range(2)]
    theirs_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ours, theirs = AdamFromScratch(ours_p, lr=0.1), torch.optim.Adam(theirs_p, lr=0.1)
    for step in range(6):
        for opt, (a, b) in ((ours, ours_p), (theirs, theirs_p)):
            opt.zero_grad()
            loss = (a ** 2).sum() + ((b ** 3).sum() if step % 2 else 0)  # b is used every other step only
            loss.backward()
            opt.step()
        assert max_err(ours_p, theirs_p) <= 1e-10
