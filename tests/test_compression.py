import copy
import importlib.util

import pytest
import torch
from torch import nn

from captioning.compression import (
    DistillationObjective, compare_to, count_parameters, make_pruning_permanent, markdown_table, measure_variant,
    prune_hidden_units, prune_magnitude, quantization_report, quantize_decoder, shrink_hidden_units, torch_variant,
    weight_sparsity,
)
from captioning.data import CaptionDataset, ImageDataset, collate_captions
from captioning.decoder import DecoderConfig, build_decoder, greedy_decode
from captioning.encoder import build_encoder
from captioning.synthetic import synthetic_corpus
from captioning.training import CaptionModel, CrossEntropyObjective, TrainConfig, fit
from captioning.vocabulary import Vocabulary

B, N, D, V = 3, 5, 12, 30
KINDS = ["attention", "lstm", "gru"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def tiny_decoder(kind="attention", seed=0, **kwargs):
    torch.manual_seed(seed)
    config = DecoderConfig(**{**dict(vocab_size=V, feature_dim=D, kind=kind, embed_dim=16, hidden_dim=32,
                                     attention_dim=16, dropout=0.0), **kwargs})
    return build_decoder(config).eval()


def memorising(decoder, steps=60):
    "The decoder after learning fixed captions for fixed features: peaked logits, so no near-ties in greedy decoding."
    g, r = features(seed=1, batch=8)
    ids = captions_in(seed=2, batch=8, length=9)
    ids[:, -1] = 2  # <end>
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    decoder.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(decoder(g, r, ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad(); loss.backward(); optimizer.step()
    return decoder.eval()


def features(seed=0, batch=B):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, D, generator=generator), torch.randn(batch, N, D, generator=generator)


def captions_in(seed=0, batch=B, length=7):
    ids = torch.randint(4, V, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1
    return ids


@pytest.mark.parametrize("kind", KINDS)
def test_int8_decoder_gives_nearly_the_same_logits_and_the_same_captions(kind):
    decoder = memorising(tiny_decoder(kind))
    quantized = quantize_decoder(decoder)
    report = quantization_report(quantized)
    recurrent = "cell" if kind == "attention" else "rnn"
    assert report[recurrent] == "int8" and report["output"] == "int8" and report["embedding"] == "float32"
    assert report["init_h"] == "int8"
    assert all(p.dtype == torch.float32 for p in decoder.parameters()), "the original decoder is left untouched"
    g, r = features()
    with torch.no_grad():
        reference, approximate = decoder(g, r, captions_in()).logits, quantized(g, r, captions_in()).logits
    error = (reference - approximate).abs().max() / reference.abs().max()
    assert 0 < error < 0.05, f"int8 logits should be close to, not equal to, float32: relative error {error:.4f}"
    g, r = features(seed=1, batch=8)  # the memorised images
    captions = greedy_decode(decoder, g, r, max_len=12)
    assert (captions[:, :3] == captions_in(seed=2, batch=8, length=9)[:, 1:4]).float().mean() > 0.9, "it memorised them"
    assert torch.equal(greedy_decode(quantized, g, r, max_len=12), captions)


def test_quantize_decoder_rejects_an_unknown_dtype():
    with pytest.raises(ValueError, match="dtype"):
        quantize_decoder(tiny_decoder(), dtype=torch.int32)


@pytest.mark.parametrize("kind", KINDS)
def test_magnitude_pruning_reaches_the_sparsity_and_keeps_it_through_fit_and_remove(kind, tmp_path):
    model, vocab, train, dev = tiny_setup(kind)
    prune_magnitude(model.decoder, 0.6)
    assert weight_sparsity(model.decoder) == pytest.approx(0.6, abs=0.01)
    before = copy.deepcopy(model.decoder.state_dict())
    fit(model, vocab, train, dev, TrainConfig(epochs=1, batch_size=16, warmup_steps=1, precision="fp32"), tmp_path,
        verbose=False)
    changed = [k for k in before if k.endswith("_orig") and not torch.equal(before[k], model.decoder.state_dict()[k])]
    assert changed, "fine-tuning should change the surviving weights"
    assert weight_sparsity(model.decoder) >= 0.6 - 0.01, "the masks keep pruned weights at zero while training"
    make_pruning_permanent(model.decoder)
    assert not any(name.endswith(("_orig", "_mask")) for name in model.decoder.state_dict())
    assert weight_sparsity(model.decoder) >= 0.6 - 0.01
    total, nonzero = count_parameters(model.decoder)
    assert nonzero < 0.7 * total
    g, r = features(batch=2)
    assert greedy_decode(model.decoder, g, r, max_len=5).shape[0] == 2  # still a working decoder
    with pytest.raises(ValueError, match="amount"):
        prune_magnitude(model.decoder, 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_hidden_unit_pruning_removes_whole_units_and_shrinks_to_an_identical_smaller_decoder(kind):
    decoder = tiny_decoder(kind)
    prune_hidden_units(decoder, 0.25)
    with pytest.raises(ValueError, match="make_pruning_permanent"):
        shrink_hidden_units(decoder)
    make_pruning_permanent(decoder)
    smaller = shrink_hidden_units(decoder)
    assert smaller.config.hidden_dim == 24 and decoder.config.hidden_dim == 32
    assert count_parameters(smaller)[0] < count_parameters(decoder)[0]
    g, r = features()
    with torch.no_grad():
        torch.testing.assert_close(smaller(g, r, captions_in()).logits, decoder(g, r, captions_in()).logits,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_layers"):
        prune_hidden_units(tiny_decoder("lstm", num_layers=2), 0.5)


def tiny_setup(kind="attention", hidden=32, seed=0):
    torch.manual_seed(seed)
    items = synthetic_corpus(n_train=24, n_dev=6, n_test=0, seed=3)
    vocab = Vocabulary.build([c for item in items["train"] for c in item.captions], min_freq=1)
    generator = torch.Generator().manual_seed(0)
    cached = [(torch.randn(D, generator=generator), torch.randn(N, D, generator=generator)) for _ in range(30)]
    decoder = build_decoder(DecoderConfig(vocab_size=len(vocab), feature_dim=D, kind=kind, embed_dim=16,
                                          hidden_dim=hidden, attention_dim=8, dropout=0.0))
    model = CaptionModel(build_encoder("tiny", pretrained=False), decoder)
    return model, vocab, CaptionDataset(items["train"], vocab, features=cached[:24]), ImageDataset(items["dev"], features=cached[24:])


def a_batch(train):
    return collate_captions([train[i] for i in range(8)])


def test_distillation_loss_is_cross_entropy_at_alpha_zero_and_has_no_kl_between_equal_models():
    teacher, vocab, train, _ = tiny_setup()
    student = CaptionModel(teacher.encoder, build_decoder(DecoderConfig(
        vocab_size=len(vocab), feature_dim=D, kind="attention", embed_dim=8, hidden_dim=16, attention_dim=8, dropout=0.0)))
    batch, config = a_batch(train), TrainConfig()
    cross_entropy = CrossEntropyObjective().loss(student, batch, train, config)
    torch.testing.assert_close(DistillationObjective(teacher, alpha=0.0).loss(student, batch, train, config), cross_entropy)
    distill = DistillationObjective(teacher, alpha=0.7, temperature=3.0)
    assert distill.loss(student, batch, train, config).item() != pytest.approx(cross_entropy.item())
    assert distill.summary()["distill_kl"] > 1e-4
    # a student identical to its teacher: the KL term is zero, the loss is (1 - alpha) CE + attention penalty
    twin = copy.deepcopy(teacher)
    objective = DistillationObjective(teacher, alpha=0.7, temperature=3.0)
    loss = objective.loss(twin, batch, train, config)
    figures = objective.summary()
    assert figures["distill_kl"] == pytest.approx(0.0, abs=1e-6)
    penalty = CrossEntropyObjective().loss(twin, batch, train, config).item() - figures["distill_ce"]
    assert loss.item() == pytest.approx(0.3 * figures["distill_ce"] + penalty, rel=1e-5)
    assert objective.summary() == {"distill_ce": 0.0, "distill_kl": 0.0}, "summary resets the epoch's sums"
    for bad in [dict(alpha=1.5), dict(temperature=0.0)]:
        with pytest.raises(ValueError):
            DistillationObjective(teacher, **bad)


def test_distillation_trains_a_student_with_fit(tmp_path):
    teacher, vocab, train, dev = tiny_setup()
    student = CaptionModel(teacher.encoder, build_decoder(DecoderConfig(
        vocab_size=len(vocab), feature_dim=D, kind="attention", embed_dim=8, hidden_dim=16, attention_dim=8)))
    history = fit(student, vocab, train, dev, TrainConfig(epochs=2, batch_size=16, warmup_steps=1, patience=5,
                                                          precision="fp32"),
                  tmp_path, verbose=False, objective=DistillationObjective(teacher, alpha=0.5))
    assert {"distill_ce", "distill_kl"} <= set(history[-1]) and history[-1]["distill_kl"] > 0
    wrong = CaptionModel(teacher.encoder, build_decoder(DecoderConfig(vocab_size=len(vocab) + 1, feature_dim=D)))
    with pytest.raises(ValueError, match="vocabulary"):
        DistillationObjective(teacher).loss(wrong, a_batch(train), train, TrainConfig())


needs_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None,
    reason="onnxruntime and onnxscript are needed for the ONNX round trip: pip install onnx onnxruntime onnxscript")


@needs_onnxruntime
@pytest.mark.parametrize("kind", ["attention", "gru"])
def test_onnx_round_trip_gives_the_same_captions_as_pytorch(kind, tmp_path):
    from captioning.compression import OnnxDecoder, OnnxEncoder, export_onnx, onnx_variant
    from captioning.decoder import beam_search
    torch.manual_seed(0)
    encoder = build_encoder("tiny", pretrained=False).eval()
    decoder = build_decoder(DecoderConfig(vocab_size=V, feature_dim=encoder.feature_dim, kind=kind, embed_dim=16,
                                          hidden_dim=32, attention_dim=16)).eval()
    model = CaptionModel(encoder, decoder)
    export_onnx(model, tmp_path)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    onnx_encoder, onnx_decoder = OnnxEncoder(tmp_path / "encoder.onnx"), OnnxDecoder(tmp_path)
    with torch.no_grad():
        g, r = encoder(pixels)
    g2, r2 = onnx_encoder(pixels)
    torch.testing.assert_close(g2, g, rtol=1e-4, atol=1e-4)
    for beam in (1, 3):
        assert torch.equal(beam_search(onnx_decoder, g2, r2, beam_size=beam, max_len=10),
                           beam_search(decoder, g, r, beam_size=beam, max_len=10))
    assert onnx_variant("onnx", tmp_path, counted=model).parameters == count_parameters(model)[0]
    with pytest.raises(FileNotFoundError, match="decoder.json"):
        OnnxDecoder(tmp_path / "nowhere")


def test_measure_variant_returns_sane_fields(tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder("tiny", pretrained=False).eval()
    decoder = build_decoder(DecoderConfig(vocab_size=V, feature_dim=encoder.feature_dim, kind="attention",
                                          embed_dim=16, hidden_dim=32, attention_dim=16)).eval()
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(V - 4)])
    pixels = torch.randn(4, 3, 64, 64)
    references = [["w1 w2 w3", "w4 w5"]] * 4
    fp32 = torch_variant("fp32", encoder, decoder, tmp_path)
    int8 = torch_variant("int8", encoder, quantize_decoder(decoder), tmp_path, counted=decoder)
    half = torch_variant("fp16", encoder, decoder, tmp_path, storage=torch.float16)
    features = {}
    rows = [measure_variant(v, vocab, pixels, references, pixels[:2], repeats=2, features=features)
            for v in (fp32, int8, half)]
    assert len(features) == 2, "fp32 and int8 share their encoder's dev features; fp16 reloads its own encoder"
    for row in rows:
        assert row["latency_ms"] == pytest.approx(row["encoder_ms"] + row["decoder_ms"], rel=0.01)
        assert 1 <= row["steps"] <= 20 and row["images"] == 4
        assert row["latency_ms"] > 0 and 0 <= row["dev_cider"] <= 10 and row["threads"] == 1
        assert row["parameters"] == count_parameters(encoder)[0] + count_parameters(decoder)[0] == rows[0]["parameters"]
    assert rows[1]["decoder_mb"] < 0.5 * rows[0]["decoder_mb"], "int8 weights take about a quarter of the bytes"
    assert rows[2]["size_mb"] < 0.6 * rows[0]["size_mb"], "fp16 storage halves the file"
    table = markdown_table(compare_to(rows, "fp32"))
    assert table.count("\n") == 4 and "1.00x" in table
    with pytest.raises(ValueError, match="reference"):
        measure_variant(fp32, vocab, pixels, references[:2], pixels[:1])
    with pytest.raises(ValueError, match="no row"):
        compare_to(rows, "fp64")
