import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from captioning.data import CaptionDataset, ImageDataset
from captioning.decoder import (CaptionDecoder, DecoderConfig, beam_search, build_decoder, gnmt_length_penalty,
                                greedy_decode, sample_decode)
from captioning.encoder import build_encoder
from captioning.synthetic import synthetic_corpus
from captioning.model import CaptionModel, generate_captions
from captioning.recipes import DEFAULTS
from captioning.training import TrainConfig, caption_loss, fit
from captioning.transformer import (MultiHeadAttention, TransformerConfig, TransformerDecoder, attend, causal_mask,
                                    sinusoidal_encoding)
from captioning.vocabulary import END_ID, PAD_ID, START_ID, Vocabulary

B, N, D, V, T = 3, 5, 12, 11, 6


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def tiny(**kwargs) -> TransformerConfig:
    return TransformerConfig(**{**dict(vocab_size=V, feature_dim=D, embed_dim=16, hidden_dim=16,
                                       num_layers=2, num_heads=4, ff_dim=32, dropout=0.1), **kwargs})


def regions(seed=0):
    return torch.randn(B, N, D, generator=torch.Generator().manual_seed(seed))


def captions_in(seed=0):
    ids = torch.randint(4, V, (B, T), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = START_ID
    return ids


def decoder(seed=0, **kwargs) -> TransformerDecoder:
    torch.manual_seed(seed)
    return build_decoder(tiny(**kwargs))


def step_by_step(decoder, region_features, ids):
    state, logits, attention = decoder.init_state(None, region_features), [], []
    for t in range(ids.shape[1]):
        step_logits, state, alpha = decoder.step(ids[:, t], state)
        logits.append(step_logits)
        attention.append(alpha)
    return torch.stack(logits, 1), torch.stack(attention, 1), state


def test_build_decoder_and_weight_tying():
    d = decoder()
    assert isinstance(d, TransformerDecoder)
    assert d.output.weight is d.embedding.weight
    assert "output.weight" not in dict(d.named_parameters())  # one parameter, listed once
    with torch.no_grad():
        d.embedding.weight[5] += 1.0  # an edit through one name is visible through the other
    assert torch.equal(d.output.weight[5], d.embedding.weight[5])
    weights = d.state_dict()
    assert "output.weight" not in weights and "output.bias" in weights  # the shared matrix is saved once
    restored = decoder(seed=1)
    restored.load_state_dict(weights)  # strict: the hook restores output.weight from the embedding
    assert restored.output.weight is restored.embedding.weight and torch.equal(restored.output.weight, d.embedding.weight)
    restored = decoder(seed=1)
    restored.load_state_dict({**weights, "output.weight": weights["embedding.weight"]})  # an explicit copy loads too
    assert restored.output.weight is restored.embedding.weight


def test_attention_matches_pytorch_multihead_attention():
    torch.manual_seed(0)
    ours, reference = MultiHeadAttention(16, 4), torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([ours.query.weight, ours.key.weight, ours.value.weight]))
        reference.in_proj_bias.copy_(torch.cat([ours.query.bias, ours.key.bias, ours.value.bias]))
        reference.out_proj.weight.copy_(ours.out.weight)
        reference.out_proj.bias.copy_(ours.out.bias)
        x, memory = torch.randn(2, 6, 16), torch.randn(2, 7, 16)
        out, _ = ours(x, *ours.keys_values(x), causal=True)
        assert torch.allclose(out, reference(x, x, x, attn_mask=causal_mask(6))[0], atol=1e-5)
        out, weights = ours(x, *ours.keys_values(memory), need_weights=True)
        expected, expected_weights = reference(x, memory, memory)
        assert torch.allclose(out, expected, atol=1e-5) and torch.allclose(weights.mean(1), expected_weights, atol=1e-6)
    q = torch.randn(1, 2, 4, 8)
    assert torch.allclose(attend(q, q, q, causal=True)[0], attend(q, q, q, causal=True, need_weights=True)[0], atol=1e-6)
    with pytest.raises(ValueError, match="as many queries as keys"):
        attend(q[:, :, :1], q, q, causal=True)


def test_sinusoidal_encoding():
    pe = sinusoidal_encoding(torch.arange(10), 6)  # (10, 6)
    assert torch.allclose(pe[3], torch.tensor([torch.sin(torch.tensor(3.0)), torch.cos(torch.tensor(3.0)),
                                               torch.sin(torch.tensor(3 / 10000 ** (2 / 6))), torch.cos(torch.tensor(3 / 10000 ** (2 / 6))),
                                               torch.sin(torch.tensor(3 / 10000 ** (4 / 6))), torch.cos(torch.tensor(3 / 10000 ** (4 / 6)))]))
    assert sinusoidal_encoding(torch.tensor([[2], [7]]), 5).shape == (2, 1, 5)
    assert torch.equal(sinusoidal_encoding(torch.tensor([[2], [7]]), 6)[:, 0], pe[[2, 7]])


def test_forward_shapes_and_attention_only_when_asked():
    d = decoder()
    out = d(None, regions(), captions_in())
    assert out.logits.shape == (B, T, V) and out.logits.isfinite().all() and out.attention is None
    out = d(torch.randn(B, D), regions(), captions_in(), return_attention=True)
    assert out.attention.shape == (B, T, N) and torch.allclose(out.attention.sum(-1), torch.ones(B, T), atol=1e-5)
    with pytest.raises(ValueError, match="region features"):
        d.init_state(torch.randn(B, D), None)


def test_changing_a_later_word_never_changes_earlier_logits():
    d = decoder().eval()
    with torch.no_grad():
        base = d(None, regions(), captions_in()).logits
        for t in range(1, T):
            changed = captions_in().clone()
            changed[:, t] = (changed[:, t] - 3) % (V - 4) + 4  # a different word
            logits = d(None, regions(), changed).logits
            assert torch.allclose(logits[:, :t], base[:, :t], atol=1e-6, rtol=0)
            assert not torch.allclose(logits[:, t], base[:, t])


def test_cached_steps_equal_the_parallel_forward():
    d = decoder().eval()
    with torch.no_grad():
        out = d(None, regions(), captions_in(), return_attention=True)
        logits, attention, state = step_by_step(d, regions(), captions_in())
    assert torch.allclose(logits, out.logits, atol=1e-5) and torch.allclose(attention, out.attention, atol=1e-5)
    assert state["keys"].shape == (B, 2, 4, T, 4) and state["position"].tolist() == [T] * B  # one position per step
    looped = CaptionDecoder.forward(d, None, regions(), captions_in())  # the base class's loop over `step`
    assert torch.allclose(looped.logits, out.logits, atol=1e-5)


def test_step_leaves_per_image_state_alone():
    d = decoder()
    state = d.init_state(None, regions())
    _, new_state, _ = d.step(captions_in()[:, 0], state)
    assert set(new_state) == set(state) and set(d.per_image_state) <= set(state)
    assert all(new_state[k] is state[k] for k in d.per_image_state)
    assert all(v.shape[0] == B for v in new_state.values())  # batch-first, so reorder_state applies


def test_every_parameter_gets_a_gradient():
    d = decoder().train()
    out = d(None, regions(), captions_in())
    F.cross_entropy(out.logits.reshape(-1, V), captions_in(1).reshape(-1)).backward()
    dead = [n for n, p in d.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


def test_beam_size_one_is_greedy_and_decoders_return_valid_shapes():
    d = decoder().eval()
    for n in (0, 2):
        greedy = greedy_decode(d, None, regions(), max_len=12, no_repeat_ngram_size=n)
        assert torch.equal(beam_search(d, None, regions(), beam_size=1, max_len=12, no_repeat_ngram_size=n), greedy)
    tokens, attention = beam_search(d, None, regions(), beam_size=4, max_len=7, return_attention=True)
    assert tokens.shape[0] == B and tokens.shape[1] <= 7 and attention.shape == (*tokens.shape, N)
    assert ((tokens >= 0) & (tokens < V)).all() and not (tokens == START_ID).any()
    d.train()
    tokens, log_probs = sample_decode(d, None, regions(), max_len=8, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == log_probs.shape and tokens.shape[0] == B and (log_probs[tokens == PAD_ID] == 0).all()
    (-log_probs.sum()).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in d.parameters())


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_equals_exhaustive_search(alpha):
    "Fails if the self-attention cache is not reordered with the beams, or per-image entries are mixed up."
    d = decoder(seed=1, vocab_size=7, dropout=0.0).eval()
    with torch.no_grad():
        for p in d.parameters():
            p.mul_(2)  # peaked distributions, like a trained decoder's
    words, max_len = [END_ID, 3, 4, 5, 6], 3
    candidates = [s for n in range(1, max_len + 1) for s in itertools.product(words, repeat=n)
                  if END_ID not in s[:-1] and (n == max_len or s[-1] == END_ID)]
    r = regions()
    with torch.no_grad():
        found = beam_search(d, None, r, beam_size=len(words) ** max_len, max_len=max_len, length_penalty=alpha)
        for i in range(B):
            def score(s):
                ids = torch.tensor([[START_ID, *s]])
                log_probs = d(None, r[i:i + 1], ids[:, :-1]).logits.log_softmax(-1)
                return log_probs.gather(2, ids[:, 1:, None]).sum().item() / gnmt_length_penalty(torch.tensor(len(s)), alpha).item()
            assert tuple(t for t in found[i].tolist() if t != PAD_ID) == max(candidates, key=score)


class Recomputing(CaptionDecoder):
    "The same decoder without a cache: its state is the token prefix, which any reordering handles trivially."

    def __init__(self, transformer):
        torch.nn.Module.__init__(self)
        self.transformer, self.config = transformer, transformer.config

    def init_state(self, global_features, region_features):
        return {"regions": region_features, "prefix": torch.zeros(len(region_features), 0, dtype=torch.long)}

    def step(self, tokens, state):
        prefix = torch.cat([state["prefix"], tokens.unsqueeze(1)], 1)
        out = self.transformer(None, state["regions"], prefix, return_attention=True)
        return out.logits[:, -1], {**state, "prefix": prefix}, out.attention[:, -1]


@pytest.mark.parametrize("beam_size", [2, 4])
def test_beam_search_with_the_cache_equals_beam_search_without(beam_size):
    "The self-attention cache must follow each beam's parent: a cache-free decoder gives the reference."
    d = decoder(seed=0, dropout=0.0, vocab_size=30).eval()
    # blocking repeated words keeps the untrained decoder's captions varied, so beams really swap parents
    kwargs = dict(beam_size=beam_size, max_len=8, no_repeat_ngram_size=1, return_attention=True)
    with torch.no_grad():
        cached, cached_attention = beam_search(d, None, regions(3), **kwargs)
        reference, reference_attention = beam_search(Recomputing(d), None, regions(3), **kwargs)
    assert torch.equal(cached, reference) and torch.allclose(cached_attention, reference_attention, atol=1e-5)


def test_config_round_trips_and_validates():
    config = tiny(num_heads=2, ff_dim=24)
    restored = DecoderConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert type(restored) is TransformerConfig and restored == config  # the registry picks the config class by kind
    no_heads = {k: v for k, v in config.to_dict().items() if k not in ("num_heads", "ff_dim")}
    restored = DecoderConfig.from_dict(no_heads)  # fields left out take the recommended values
    assert (restored.num_heads, restored.ff_dim) == (DEFAULTS["transformer"]["num_heads"], DEFAULTS["transformer"]["ff_dim"])
    with pytest.raises(ValueError, match="unknown DecoderConfig fields"):  # the LSTMs' configs have no heads
        DecoderConfig.from_dict({**DecoderConfig(V, D, kind="lstm").to_dict(), "num_heads": 8})
    with pytest.raises(ValueError, match="embed_dim must equal hidden_dim"):
        tiny(embed_dim=8)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        tiny(num_heads=3)
    for bad in [dict(num_heads=0), dict(ff_dim=0), dict(num_layers=0), dict(kind="transformers"), dict(dropout=1.0)]:
        with pytest.raises(ValueError):
            tiny(**bad)
    DecoderConfig(V, D, kind="lstm", hidden_dim=10)  # head divisibility concerns the transformer only
    recommended = TransformerConfig(2541, 1280)
    assert (recommended.hidden_dim, recommended.embed_dim, recommended.num_layers, recommended.num_heads,
            recommended.ff_dim, recommended.dropout) == (512, 512, 3, 8, 2048, 0.3)
    assert TransformerConfig(100, 8, hidden_dim=64, num_heads=4).embed_dim == 64  # tied: follows d_model
    with pytest.raises(ValueError, match="needs a TransformerConfig"):
        TransformerDecoder(DecoderConfig(V, D, kind="gru"))


def setup(seed=0):
    torch.manual_seed(seed)
    items = synthetic_corpus(n_train=24, n_dev=6, n_test=0, seed=2)
    rng = torch.Generator().manual_seed(0)
    features = [(torch.randn(16, generator=rng), torch.randn(4, 16, generator=rng)) for _ in range(30)]
    vocab = Vocabulary.build([c for i in items["train"] for c in i.captions], min_freq=1)
    decoder = build_decoder(TransformerConfig(len(vocab), 16, hidden_dim=16, num_layers=2, num_heads=4, ff_dim=32))
    model = CaptionModel(build_encoder("tiny", pretrained=False), decoder, vocab)
    return model, vocab, CaptionDataset(items["train"], vocab, features=features[:24]), ImageDataset(items["dev"], features=features[24:])


def test_fit_with_default_train_config_and_export_round_trip(tmp_path):
    model, vocab, train, dev = setup()
    config = TrainConfig(epochs=1)  # everything else default: attention_penalty=1, precision='auto'
    history = fit(model, vocab, train, dev, config, tmp_path / "run", progress=False)
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["train_loss"]))
    output = model((torch.randn(2, 16), torch.randn(2, 4, 16)), torch.tensor([[START_ID, 5, 6], [START_ID, 7, 8]]))
    assert output.attention is None  # so caption_loss adds no doubly stochastic penalty
    targets = torch.tensor([[5, 6, END_ID], [7, 8, END_ID]])
    assert torch.equal(caption_loss(output, targets, attention_penalty=1.0), caption_loss(output, targets))
    folder = tmp_path / "export"
    model.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["decoder"]["kind"] == "transformer"
    loaded = CaptionModel.from_pretrained(folder)
    assert isinstance(loaded.decoder, TransformerDecoder) and loaded.decoder.output.weight is loaded.decoder.embedding.weight
    assert generate_captions(loaded, dev, loaded.vocab, beam_size=3) == generate_captions(model, dev, vocab, beam_size=3)
