import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from captioning.decoder import (
    DECODERS, CaptionDecoder, DecoderConfig, PrunableUnits, ShowAndTellDecoder, ShowAttendTellDecoder, beam_search,
    block_repeated_ngrams, build_decoder, doubly_stochastic_penalty, gnmt_length_penalty, greedy_decode, plot_attention,
    register_decoder, reorder_state, sample_decode,
)
from captioning.vocabulary import END_ID, PAD_ID, START_ID

B, N, D, V, T = 3, 5, 12, 11, 6
VARIANTS = [
    dict(kind="lstm"),
    dict(kind="lstm", feed_features="first_step", num_layers=2),
    dict(kind="gru"),
    dict(kind="gru", feed_features="first_step"),
    dict(kind="attention"),
    dict(kind="attention", gate_attention=False),
]
IDS = [json.dumps(v) for v in VARIANTS]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def tiny(**kwargs) -> DecoderConfig:
    return DecoderConfig(**{**dict(vocab_size=V, feature_dim=D, embed_dim=8, hidden_dim=16, attention_dim=8), **kwargs})


def features(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=generator), torch.randn(B, N, D, generator=generator)


def captions_in(seed=0):
    ids = torch.randint(4, V, (B, T), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = START_ID
    return ids


def test_config_round_trips_through_json_and_validates():
    config = tiny(kind="gru", feed_features="first_step", dropout=0.1)
    assert DecoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in [dict(kind=""), dict(kind=3), dict(feed_features="every_step"), dict(dropout=1.0), dict(hidden_dim=0),
                dict(vocab_size=4), dict(kind="attention", feed_features="first_step"), dict(kind="attention", num_layers=2)]:
        with pytest.raises(ValueError):
            tiny(**bad)
    with pytest.raises(ValueError, match="unknown"):
        DecoderConfig.from_dict({**config.to_dict(), "hiden_dim": 3})
    with pytest.raises(ValueError, match="JSON object"):
        DecoderConfig.from_dict(["lstm"])


def test_build_decoder_picks_the_registered_class():
    assert isinstance(build_decoder(tiny(kind="lstm")), ShowAndTellDecoder)
    assert isinstance(build_decoder(tiny(kind="gru")), ShowAndTellDecoder)
    assert isinstance(build_decoder(tiny(kind="attention")), ShowAttendTellDecoder)
    assert {"lstm", "gru", "attention"} <= set(DECODERS)
    with pytest.raises(ValueError, match=r"no decoder of kind 'rnn' is registered \(known: .*attention.*lstm"):
        build_decoder(tiny(kind="rnn"))  # a kind is plain data until a decoder registers it


def test_a_decoder_registered_elsewhere_is_built_and_loaded_by_its_kind():
    "The registry is the one place that names decoders: a new one needs no change to this module."
    from dataclasses import dataclass

    @dataclass
    class WideConfig(DecoderConfig):
        kind: str = "wide"
        width: int = 3

    @register_decoder("wide")
    class WideDecoder(ShowAndTellDecoder):
        config_class = WideConfig
        def __init__(self, config):
            super().__init__(DecoderConfig(**{k: v for k, v in config.to_dict().items() if k not in ("kind", "width")}))
            self.config = config

    try:
        config = DecoderConfig.from_dict({"vocab_size": V, "feature_dim": D, "kind": "wide", "width": 5, "hidden_dim": 8})
        assert type(config) is WideConfig and config.width == 5
        assert type(build_decoder(config)) is WideDecoder
    finally:
        del DECODERS["wide"]
    with pytest.raises(ValueError, match="no decoder of kind 'wide'"):
        build_decoder(config)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_forward_shapes_and_no_nans(variant):
    g, r = features()
    out = build_decoder(tiny(**variant))(g, r, captions_in())
    assert out.logits.shape == (B, T, V) and out.logits.isfinite().all()
    if variant["kind"] == "attention":
        assert out.attention.shape == (B, T, N)
        assert torch.allclose(out.attention.sum(-1), torch.ones(B, T))
    else:
        assert out.attention is None


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_step_by_step_equals_forward(variant):
    g, r = features()
    decoder = build_decoder(tiny(**variant)).eval()
    ids = captions_in()
    with torch.no_grad():
        state, logits = decoder.init_state(g, r), []
        for t in range(T):
            step_logits, state, _ = decoder.step(ids[:, t], state)
            logits.append(step_logits)
        assert torch.allclose(torch.stack(logits, 1), decoder(g, r, ids).logits, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_every_parameter_gets_a_gradient(variant):
    g, r = features()
    decoder = build_decoder(tiny(**variant)).train()
    out = decoder(g, r, captions_in())
    loss = F.cross_entropy(out.logits.reshape(-1, V), captions_in(1).reshape(-1), ignore_index=PAD_ID)
    if out.attention is not None:
        loss = loss + doubly_stochastic_penalty(out.attention)
    loss.backward()
    dead = [n for n, p in decoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_save_load_round_trip(variant, tmp_path):
    g, r = features()
    decoder = build_decoder(tiny(**variant))
    decoder(g, r, captions_in())  # moves BatchNorm's running statistics away from their initial values
    decoder.eval()
    (tmp_path / "config.json").write_text(json.dumps(decoder.config.to_dict()))
    torch.save(decoder.state_dict(), tmp_path / "weights.pt")
    restored = build_decoder(DecoderConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))).eval()
    restored.load_state_dict(torch.load(tmp_path / "weights.pt"))
    with torch.no_grad():
        assert torch.equal(decoder(g, r, captions_in()).logits, restored(g, r, captions_in()).logits)
        assert torch.equal(beam_search(decoder, g, r, max_len=8), beam_search(restored, g, r, max_len=8))


def test_reorder_state_selects_rows():
    state = {"h": torch.arange(6.0).view(3, 2), "c": torch.arange(3.0)}
    picked = reorder_state(state, torch.tensor([2, 2, 0]))
    assert picked["h"].tolist() == [[4, 5], [4, 5], [0, 1]] and picked["c"].tolist() == [2, 2, 0]
    assert reorder_state(state, torch.tensor([1, 0, 2]), keep=("c",))["c"] is state["c"]


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_step_leaves_per_image_state_alone(variant):
    "Beam search skips re-indexing `per_image_state`: `step` must pass those entries through unchanged."
    g, r = features()
    decoder = build_decoder(tiny(**variant))
    state = decoder.init_state(g, r)
    _, new_state, _ = decoder.step(captions_in()[:, 0], state)
    assert set(new_state) == set(state)
    assert all(new_state[k] is state[k] for k in decoder.per_image_state)


class ScriptedDecoder(CaptionDecoder):
    "Plays fixed captions back: row i's logits pick script[i, t] at step t, whatever it reads."

    def __init__(self, script):
        super().__init__(DecoderConfig(vocab_size=V, feature_dim=1, embed_dim=1, hidden_dim=1))
        self.script = script  # (B, T)

    def init_state(self, global_features, region_features):
        B = global_features.shape[0]
        return {"row": torch.arange(B), "t": torch.zeros(B, dtype=torch.long)}

    def step(self, tokens, state):
        t = state["t"].clamp(max=self.script.shape[1] - 1)
        logits = 5.0 * F.one_hot(self.script[state["row"], t], V).float()  # (B, V)
        return logits, {"row": state["row"], "t": state["t"] + 1}, None


def test_greedy_handles_rows_that_end_at_different_times():
    script = torch.tensor([[4, 5, END_ID, 9, 9, 9], [6, END_ID, 9, 9, 9, 9], [7, 8, 9, 10, END_ID, 9]])
    decoded = greedy_decode(ScriptedDecoder(script), torch.zeros(3, 1), max_len=10)
    assert decoded.tolist() == [[4, 5, END_ID, PAD_ID, PAD_ID], [6, END_ID, PAD_ID, PAD_ID, PAD_ID], [7, 8, 9, 10, END_ID]]
    # max_len cuts rows that have not ended; beam search of any width agrees on a deterministic decoder
    assert greedy_decode(ScriptedDecoder(script), torch.zeros(3, 1), max_len=3).tolist() == \
        [[4, 5, END_ID], [6, END_ID, PAD_ID], [7, 8, 9]]
    assert torch.equal(beam_search(ScriptedDecoder(script), torch.zeros(3, 1), beam_size=3, max_len=10), decoded)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_beam_size_one_is_greedy(variant):
    g, r = features()
    decoder = build_decoder(tiny(**variant)).eval()
    for n in (0, 2):
        greedy = greedy_decode(decoder, g, r, max_len=12, no_repeat_ngram_size=n)
        assert torch.equal(beam_search(decoder, g, r, beam_size=1, max_len=12, no_repeat_ngram_size=n), greedy)


def test_beam_search_returns_aligned_attention():
    g, r = features()
    decoder = build_decoder(tiny(kind="attention")).eval()
    tokens, attention = beam_search(decoder, g, r, beam_size=4, max_len=7, return_attention=True)
    assert attention.shape == (*tokens.shape, N)
    live = torch.cat([torch.ones(B, 1, dtype=torch.bool), (tokens != END_ID).cumprod(1)[:, :-1].bool()], 1)  # (B, L)
    assert torch.allclose(attention.sum(-1), live.float())  # weights sum to 1 up to <end>, 0 after
    greedy_tokens, greedy_attention = greedy_decode(decoder, g, r, max_len=7, return_attention=True)
    beam1_tokens, beam1_attention = beam_search(decoder, g, r, beam_size=1, max_len=7, return_attention=True)
    assert torch.equal(greedy_tokens, beam1_tokens) and torch.allclose(greedy_attention, beam1_attention)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_equals_exhaustive_search(alpha):
    torch.manual_seed(0)
    g, _ = features()
    decoder = build_decoder(DecoderConfig(7, D, kind="gru", embed_dim=8, hidden_dim=16, dropout=0.0)).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.mul_(3)
    words, max_len = [END_ID, 3, 4, 5, 6], 3
    candidates = [s for n in range(1, max_len + 1) for s in itertools.product(words, repeat=n)
                  if END_ID not in s[:-1] and (n == max_len or s[-1] == END_ID)]
    with torch.no_grad():
        found = beam_search(decoder, g, None, beam_size=len(words) ** max_len, max_len=max_len, length_penalty=alpha)
        for i in range(B):
            def score(s):
                ids = torch.tensor([[START_ID, *s]])
                log_probs = decoder(g[i:i + 1], None, ids[:, :-1]).logits.log_softmax(-1)
                return log_probs.gather(2, ids[:, 1:, None]).sum().item() / gnmt_length_penalty(torch.tensor(len(s)), alpha).item()
            assert tuple(t for t in found[i].tolist() if t != PAD_ID) == max(candidates, key=score)


def test_block_repeated_ngrams():
    history = torch.tensor([[4, 5, 4, 6, 4], [4, 4, 4, 4, 4]])
    banned = lambda n: (block_repeated_ngrams(torch.zeros(2, 8), history, n) == float("-inf")).nonzero().tolist()
    assert banned(2) == [[0, 5], [0, 6], [1, 4]]
    assert banned(1) == [[0, 4], [0, 5], [0, 6], [1, 4]]
    assert banned(3) == [[1, 4]]
    assert banned(6) == [] and banned(0) == []


def test_beam_search_with_ngram_blocking_never_repeats_a_bigram():
    g, r = features()
    decoder = build_decoder(tiny(kind="lstm")).eval()
    for row in beam_search(decoder, g, r, beam_size=4, max_len=15, no_repeat_ngram_size=2).tolist():
        row = [t for t in row if t != PAD_ID]
        assert len(set(zip(row, row[1:]))) == len(row) - 1


def test_decoders_never_generate_start_or_pad_before_end():
    g, r = features()
    decoder = build_decoder(tiny(kind="gru")).eval()
    with torch.no_grad():
        decoder.output.bias[[START_ID, PAD_ID]] = 100.0  # make them the most likely words by far
    for tokens in [greedy_decode(decoder, g, r, max_len=6), beam_search(decoder, g, r, beam_size=2, max_len=6),
                   sample_decode(decoder, g, r, max_len=6)[0]]:
        ended = (tokens == END_ID).cumsum(1) > 0
        assert not (tokens == START_ID).any() and not ((tokens == PAD_ID) & ~ended).any()


def test_sample_decode_is_differentiable_and_cold_sampling_is_greedy():
    _, r = features()
    decoder = build_decoder(tiny(kind="attention")).train()
    tokens, log_probs = sample_decode(decoder, None, r, max_len=8, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == log_probs.shape and (log_probs[tokens == PAD_ID] == 0).all()
    (-log_probs.sum()).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in decoder.parameters())
    decoder.eval()
    cold, _ = sample_decode(decoder, None, r, max_len=8, temperature=1e-4)
    assert torch.equal(cold, greedy_decode(decoder, None, r, max_len=8))
    top1, _ = sample_decode(decoder, None, r, max_len=8, top_k=1)
    assert torch.equal(top1, greedy_decode(decoder, None, r, max_len=8))


def test_doubly_stochastic_penalty():
    assert doubly_stochastic_penalty(torch.eye(N).expand(2, N, N)) == 0
    always_first = F.one_hot(torch.zeros(1, N, dtype=torch.long), N).float()  # (1, N, N)
    assert doubly_stochastic_penalty(always_first, weight=0.5) == 0.5 * ((1 - N) ** 2 + N - 1)
    mask = torch.ones(1, N, dtype=torch.bool)
    mask[0, 2:] = False
    assert doubly_stochastic_penalty(always_first, mask) == doubly_stochastic_penalty(always_first[:, :2])


@pytest.mark.parametrize("variant", VARIANTS[:1] + VARIANTS[3:5], ids=IDS[:1] + IDS[3:5])
def test_overfits_a_handful_of_captions(variant):
    torch.manual_seed(0)
    config = DecoderConfig(12, 16, embed_dim=16, hidden_dim=32, attention_dim=16, dropout=0.0, **variant)
    g, r = torch.randn(6, 16), torch.randn(6, 4, 16)
    captions = torch.full((6, 9), PAD_ID)
    for i, n in enumerate([3, 5, 7, 4, 6, 2]):
        captions[i, :n + 2] = torch.tensor([START_ID, *torch.randint(4, 12, (n,)).tolist(), END_ID])
    decoder = build_decoder(config)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    for _ in range(200):
        logits = decoder(g, r, captions[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, 12), captions[:, 1:].reshape(-1), ignore_index=PAD_ID)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    decoder.eval()
    decoded = greedy_decode(decoder, g, r, max_len=10)
    assert torch.equal(decoded, captions[:, 1:1 + decoded.shape[1]])


def test_plot_attention_draws_one_panel_per_word():
    import matplotlib.pyplot as plt
    image = torch.rand(3, 28, 28)
    fig = plot_attention(image, ["a", "dog", "<end>"], torch.softmax(torch.randn(3, 49), -1), ncols=2)
    assert len([ax for ax in fig.axes if ax.images]) == 4  # the image and three words
    with pytest.raises(ValueError, match="grid"):
        plot_attention(image, ["a"], torch.rand(1, 10))
    plt.close("all")


def test_attention_decoder_casts_regions_once_under_autocast():
    "Under bf16 autocast the regions enter the state as bf16 (one cast per image, not one per step); fp32 otherwise."
    torch.manual_seed(0)
    decoder = build_decoder(tiny(kind="attention")).eval()
    (_, regions), captions = features(), captions_in()
    assert decoder.init_state(None, regions)["regions"].dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert decoder.init_state(None, regions)["regions"].dtype == torch.bfloat16
        low = decoder(None, regions, captions).logits.float()  # (B, T, V)
    with torch.no_grad():
        full = decoder(None, regions, captions).logits
    assert (low - full).abs().max() < 0.1  # bf16 rounding only: the computation is the same


ALL_KINDS = VARIANTS + [dict(kind="transformer")]


def any_decoder(variant):
    import captioning.transformer  # noqa: F401  registers the Transformer
    if variant["kind"] == "transformer":
        return build_decoder(DECODERS["transformer"].config_class(V, D, hidden_dim=16, num_layers=2, num_heads=2, ff_dim=24))
    return build_decoder(tiny(**variant))


@pytest.mark.parametrize("variant", ALL_KINDS, ids=[json.dumps(v) for v in ALL_KINDS])
def test_prunable_weights_are_matrices_that_write_or_read_units_never_embeddings(variant):
    decoder = any_decoder(variant)
    found = decoder.prunable_weights()
    embeddings = {id(m.weight) for m in decoder.modules() if isinstance(m, torch.nn.Embedding)}
    assert found and len({(id(m), n) for m, n in found}) == len(found)
    for module, name in found:
        weight = getattr(module, name)
        assert weight.dim() == 2 and id(weight) not in embeddings
    linears = [m for m in decoder.modules() if isinstance(m, torch.nn.Linear) and id(m.weight) not in embeddings]
    assert all((m, "weight") in found for m in linears)
    if variant["kind"] == "transformer":  # the output layer is the embedding: pruning it would prune the words
        assert not any(module is decoder.output for module, _ in found)


@pytest.mark.parametrize("variant", [v for v in ALL_KINDS if v.get("num_layers", 1) == 1],
                         ids=[json.dumps(v) for v in ALL_KINDS if v.get("num_layers", 1) == 1])
def test_prunable_units_name_tensors_of_the_right_size(variant):
    decoder = any_decoder(variant)
    units = decoder.prunable_units()
    assert isinstance(units, PrunableUnits) and units.groups
    count = getattr(decoder.config, units.config_field)
    for group in units.groups:
        for module, tensor, dim, repeats in group:
            weight = getattr(decoder.get_submodule(module), tensor)
            assert isinstance(weight, torch.nn.Parameter) and weight.shape[dim] == repeats * count, (module, tensor)
    with pytest.raises(ValueError, match="one recurrent layer"):
        build_decoder(tiny(kind="lstm", num_layers=2)).prunable_units()
