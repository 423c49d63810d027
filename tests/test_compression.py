"""The compression techniques of notebook 09 on every decoder, the Transformer (tied embedding, KV cache) included.

Tolerances, once: a compressed decoder is compared with its float32 original by the largest logit difference relative
to the largest logit. Weights (and, for int8, activations) are rounded to within half a quantisation step — 1/254 of
a tensor's range for int8, 2^-9 relative for bf16, 2^-12 for fp16 — and one step chains several such products (a
dozen in the Transformer). So int8 stays under 10 % (we see 1-6 %), bf16 under 5 % (0.4-3 %) and fp16 storage under
1 %, while a broken conversion (wrong weights, a lost tie, a stale cache) is off by ~100 %. Captions are compared on
a decoder that memorised fixed captions: its logits are peaked, so no near-ties can flip.
"""
import copy
import importlib.util

import pytest
import torch
from torch import nn

from captioning.compression import (
    DistillationObjective, OnnxDecoder, OnnxEncoder, count_parameters, export_onnx, export_onnx_decoder, load_state, make_pruning_permanent,
    prune_magnitude, prune_units, quantization_report, quantize_decoder, quantize_onnx_decoder, quantize_onnx_encoder,
    save_state, shrink_units, state_dimensions, to_bfloat16, unit_norms, weight_sparsity,
)
from captioning.data import CaptionDataset, ImageDataset, collate_captions
from captioning.decoder import DecoderConfig, beam_search, build_decoder, greedy_decode
from captioning.encoder import build_encoder
from captioning.model import CaptionModel
from captioning.synthetic import synthetic_corpus
from captioning.training import CrossEntropyObjective, TrainConfig, fit
from captioning.transformer import TransformerConfig
from captioning.vocabulary import Vocabulary

B, N, D, V = 3, 5, 12, 30
KINDS = ["attention", "lstm", "gru", "transformer"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def decoder_config(kind, vocab_size=V, feature_dim=D, **kwargs):
    if kind == "transformer":
        return TransformerConfig(**{**dict(vocab_size=vocab_size, feature_dim=feature_dim, hidden_dim=32, num_layers=2,
                                           num_heads=4, ff_dim=64, dropout=0.0), **kwargs})
    return DecoderConfig(**{**dict(vocab_size=vocab_size, feature_dim=feature_dim, kind=kind, embed_dim=16, hidden_dim=32,
                                   attention_dim=16, dropout=0.0), **kwargs})


def tiny_decoder(kind="attention", seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_decoder(decoder_config(kind, **kwargs)).eval()


def features(seed=0, batch=B, regions=N):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, D, generator=generator), torch.randn(batch, regions, D, generator=generator)


def captions_in(seed=0, batch=B, length=7):
    ids = torch.randint(4, V, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1
    return ids


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
    decoder.eval()
    assert torch.equal(greedy_decode(decoder, g, r, max_len=12)[:, :8], ids[:, 1:]), "it memorised the captions"
    return decoder


def relative_error(reference, approximate):
    return float((reference.float() - approximate.float()).abs().max() / reference.abs().max())


@torch.no_grad()
def logits_of(decoder, dtype=torch.float32):
    "Teacher-forced logits (B, T, V) through `step`, the interface every decoding uses (a quantised decoder need not train)."
    g, r = features()
    state, logits = decoder.init_state(g.to(dtype), r.to(dtype)), []
    for tokens in captions_in().T:
        step_logits, state, _ = decoder.step(tokens, state)
        logits.append(step_logits)
    return torch.stack(logits, 1)


def is_tied(decoder):
    return decoder.output.weight is decoder.embedding.weight


# --- int8 and half precision -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_int8_decoder_gives_nearly_the_same_logits_and_the_same_captions(kind):
    decoder = memorising(tiny_decoder(kind))
    quantized = quantize_decoder(decoder)
    report = quantization_report(quantized)
    recurrent = {"attention": "cell", "lstm": "rnn", "gru": "rnn", "transformer": "blocks.0.feed_forward.0"}[kind]
    assert report[recurrent] == "int8" and report["output"] == "int8" and report["embedding"] == "float32"
    assert all(p.dtype == torch.float32 for p in decoder.parameters()), "the original decoder is left untouched"
    if kind == "transformer": assert is_tied(decoder), "the original keeps its tie (the int8 output layer is a copy)"
    error = relative_error(logits_of(decoder), logits_of(quantized))
    assert 0 < error < 0.10, f"int8 logits should be close to, not equal to, float32: relative error {error:.4f}"
    g, r = features(seed=1, batch=8)  # the memorised images
    assert torch.equal(greedy_decode(quantized, g, r, max_len=12), greedy_decode(decoder, g, r, max_len=12))


def test_quantize_decoder_rejects_an_unknown_dtype():
    with pytest.raises(ValueError, match="dtype"):
        quantize_decoder(tiny_decoder(), dtype=torch.int32)


@pytest.mark.parametrize("kind", KINDS)
def test_fp16_storage_and_bf16_compute_keep_the_logits_and_the_captions(kind, tmp_path):
    decoder = memorising(tiny_decoder(kind))
    fp32_file, fp16_file = save_state(decoder, tmp_path / "fp32"), save_state(decoder, tmp_path / "fp16", torch.float16)
    assert fp16_file.stat().st_size < 0.55 * fp32_file.stat().st_size, "fp16 storage halves the file"
    stored = load_state(tiny_decoder(kind, seed=1), fp16_file)
    assert next(stored.parameters()).dtype == torch.float32, "stored in fp16, run in fp32"
    assert relative_error(logits_of(decoder), logits_of(stored)) < 0.01
    half = to_bfloat16(decoder)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert relative_error(logits_of(decoder), logits_of(half, torch.bfloat16)) < 0.05
    g, r = features(seed=1, batch=8)
    expected = greedy_decode(decoder, g, r, max_len=12)
    assert torch.equal(greedy_decode(stored, g, r, max_len=12), expected)
    assert torch.equal(greedy_decode(half, g.bfloat16(), r.bfloat16(), max_len=12), expected)
    if kind == "transformer":  # the tie survives both the fp16 file and the bf16 copy; float32 features work too
        assert is_tied(stored) and is_tied(half)
        assert torch.equal(greedy_decode(half, g, r, max_len=12), expected)


# --- pruning ---------------------------------------------------------------------------------------------------------

def tiny_setup(kind="attention", seed=0):
    "A tiny model of `kind` on 24 synthetic training images with random features, and 6 dev images."
    torch.manual_seed(seed)
    items = synthetic_corpus(n_train=24, n_dev=6, n_test=0, seed=3)
    vocab = Vocabulary.build([c for item in items["train"] for c in item.captions], min_freq=1)
    generator = torch.Generator().manual_seed(0)
    cached = [(torch.randn(D, generator=generator), torch.randn(N, D, generator=generator)) for _ in range(30)]
    decoder = build_decoder(decoder_config(kind, vocab_size=len(vocab), attention_dim=8) if kind != "transformer"
                            else decoder_config(kind, vocab_size=len(vocab)))
    model = CaptionModel(build_encoder("tiny", pretrained=False), decoder, vocab)
    return model, vocab, CaptionDataset(items["train"], vocab, features=cached[:24]), ImageDataset(items["dev"], features=cached[24:])


FINE_TUNE = TrainConfig(epochs=1, batch_size=16, warmup_steps=1, precision="fp32")


@pytest.mark.parametrize("kind", KINDS)
def test_magnitude_pruning_reaches_the_sparsity_and_keeps_it_through_fit_and_remove(kind, tmp_path):
    model, vocab, train, dev = tiny_setup(kind)
    prune_magnitude(model.decoder, 0.6)
    assert weight_sparsity(model.decoder) == pytest.approx(0.6, abs=0.01)
    before = copy.deepcopy(model.decoder.state_dict())
    fit(model, vocab, train, dev, FINE_TUNE, tmp_path, verbose=False)
    originals = [k for k in before if k.endswith(".original")]
    assert originals and any(not torch.equal(before[k], model.decoder.state_dict()[k]) for k in originals), \
        "fine-tuning should change the surviving weights"
    assert weight_sparsity(model.decoder) >= 0.6 - 0.01, "the masks keep pruned weights at zero while training"
    masked = logits_of(model.decoder.eval())
    make_pruning_permanent(model.decoder)
    assert not any("parametrizations" in name for name in model.decoder.state_dict())
    torch.testing.assert_close(logits_of(model.decoder), masked, rtol=0, atol=1e-6)  # folding the masks changes nothing
    assert weight_sparsity(model.decoder) >= 0.6 - 0.01
    total, nonzero = count_parameters(model.decoder)
    assert nonzero < 0.7 * total
    if kind == "transformer":
        assert is_tied(model.decoder), "the tied output layer is not pruned, and stays the embedding"
        assert model.decoder.embedding.weight.count_nonzero() == model.decoder.embedding.weight.numel()
    with pytest.raises(ValueError, match="amount"):
        prune_magnitude(model.decoder, 1.0)


def test_pruning_keeps_the_transformer_tie_and_refuses_a_tied_weight():
    decoder = tiny_decoder("transformer")
    prune_magnitude(decoder, 0.5)
    assert is_tied(decoder)
    make_pruning_permanent(decoder)
    assert is_tied(decoder)
    declared = decoder.prunable_weights
    decoder.prunable_weights = lambda: declared() + [(decoder.output, "weight")]  # a decoder that got its declaration wrong
    with pytest.raises(ValueError, match=r"output\.weight.*tied|embedding\.weight.*tied"):
        prune_magnitude(decoder, 0.5)


def test_count_parameters_counts_a_tied_weight_once():
    decoder = tiny_decoder("transformer")
    assert count_parameters(decoder)[0] == sum(p.numel() for p in decoder.parameters())
    untied = sum(p.numel() for m in decoder.modules() for p in m.parameters(recurse=False))
    assert untied == count_parameters(decoder)[0] + V * 32


@pytest.mark.parametrize("kind", KINDS)
def test_unit_pruning_removes_whole_units_and_shrinks_to_an_identical_smaller_decoder(kind, tmp_path):
    model, vocab, train, dev = tiny_setup(kind)
    decoder = model.decoder
    units = decoder.prunable_units()
    field = units.config_field
    assert field == ("ff_dim" if kind == "transformer" else "hidden_dim")
    size = getattr(decoder.config, field)
    prune_units(decoder, 0.25)
    assert (unit_norms(decoder) == 0).sum(1).tolist() == [size // 4] * len(units.groups), "as many units in every group"
    fit(model, vocab, train, dev, FINE_TUNE, tmp_path, verbose=False)  # a fine-tune keeps the pruned units at zero
    assert (unit_norms(decoder) == 0).sum(1).tolist() == [size // 4] * len(units.groups)
    with pytest.raises(ValueError, match="make_pruning_permanent"):
        shrink_units(decoder)
    make_pruning_permanent(decoder.eval())
    smaller = shrink_units(decoder)
    assert getattr(smaller.config, field) == size - size // 4 and getattr(decoder.config, field) == size
    assert count_parameters(smaller)[0] < count_parameters(decoder)[0]
    torch.testing.assert_close(logits_of(smaller), logits_of(decoder), rtol=1e-5, atol=1e-5)
    if kind == "transformer": assert is_tied(decoder) and is_tied(smaller)


def test_unit_pruning_refuses_what_a_decoder_does_not_declare():
    with pytest.raises(ValueError, match="num_layers"):
        prune_units(tiny_decoder("lstm", num_layers=2), 0.5)
    with pytest.raises(ValueError, match="amount"):
        prune_units(tiny_decoder("gru"), 1.0)


# --- distillation ----------------------------------------------------------------------------------------------------

def a_batch(train):
    return collate_captions([train[i] for i in range(8)])


@pytest.mark.parametrize("kind", ["attention", "transformer"])
def test_distillation_loss_is_cross_entropy_at_alpha_zero_and_has_no_kl_between_equal_models(kind):
    teacher, vocab, train, _ = tiny_setup(kind)
    teacher.eval()
    student = CaptionModel(teacher.encoder, build_decoder(decoder_config(kind, vocab_size=len(vocab), hidden_dim=16,
                                                                          **({"num_heads": 2} if kind == "transformer" else {}))))
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


@pytest.mark.parametrize("kind", ["attention", "transformer"])
def test_distillation_trains_a_student_with_fit(kind, tmp_path):
    teacher, vocab, train, dev = tiny_setup(kind)
    student = CaptionModel(teacher.encoder, build_decoder(decoder_config(kind, vocab_size=len(vocab), hidden_dim=16,
                                                                          **({"num_heads": 2} if kind == "transformer" else {}))))
    history = fit(student, vocab, train, dev, TrainConfig(epochs=2, batch_size=16, warmup_steps=1, patience=5,
                                                          precision="fp32"),
                  tmp_path, verbose=False, objective=DistillationObjective(teacher, alpha=0.5))
    assert {"distill_ce", "distill_kl"} <= set(history[-1]) and history[-1]["distill_kl"] > 0
    wrong = CaptionModel(teacher.encoder, build_decoder(decoder_config(kind, vocab_size=len(vocab) + 1)))
    with pytest.raises(ValueError, match="vocabulary"):
        DistillationObjective(teacher).loss(wrong, a_batch(train), train, TrainConfig())


# --- ONNX ------------------------------------------------------------------------------------------------------------

needs_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None,
    reason="onnxruntime and onnxscript are needed for the ONNX round trip: pip install onnx onnxruntime onnxscript")


def tiny_model(kind, seed=0):
    torch.manual_seed(seed)
    encoder = build_encoder("tiny", pretrained=False).eval()
    return CaptionModel(encoder, build_decoder(decoder_config(kind, feature_dim=encoder.feature_dim))).eval()


@needs_onnxruntime
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_round_trip_gives_the_same_captions_as_pytorch(kind, tmp_path):
    model = tiny_model(kind)
    encoder, decoder = model.encoder, model.decoder
    export_onnx(model, tmp_path)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    onnx_encoder, onnx_decoder = OnnxEncoder(tmp_path / "encoder.onnx"), OnnxDecoder(tmp_path)
    with torch.no_grad():
        g, r = encoder(pixels)
    g2, r2 = onnx_encoder(pixels)
    torch.testing.assert_close(g2, g, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r2, r, rtol=1e-4, atol=1e-4)
    for beam in (1, 3):  # 12 steps: the Transformer's cache grows far past the 3 positions of the traced example
        assert torch.equal(beam_search(onnx_decoder, g2, r2, beam_size=beam, max_len=12),
                           beam_search(decoder, g, r, beam_size=beam, max_len=12))
    generator = torch.Generator().manual_seed(4)  # 7 regions instead of 16: the graphs leave the number free
    g, r = torch.randn(3, encoder.feature_dim, generator=generator), torch.randn(3, 7, encoder.feature_dim, generator=generator)
    assert torch.equal(beam_search(onnx_decoder, g, r, beam_size=3, max_len=8), beam_search(decoder, g, r, beam_size=3, max_len=8))
    assert not decoder.training and not encoder.training
    with pytest.raises(FileNotFoundError, match="decoder.json"):
        OnnxDecoder(tmp_path / "nowhere")


def test_state_dimensions_find_the_batch_the_regions_and_the_transformer_cache():
    dims = state_dimensions(tiny_decoder("transformer"))
    assert dims["keys"] == dims["values"] == {0: "batch", 3: "steps"}  # (B, L, h, t, d_k): t grows by one per step
    assert dims["cross_keys"] == {0: "batch", 3: "regions"} and dims["position"] == {0: "batch"}
    assert state_dimensions(tiny_decoder("attention"))["regions"] == {0: "batch", 1: "regions"}
    assert state_dimensions(tiny_decoder("gru")) == {"h": {0: "batch"}}


@needs_onnxruntime
@pytest.mark.parametrize("kind", ["attention", "transformer"])
def test_int8_onnx_decoder_is_close_to_float_and_captions_agree(kind, tmp_path):
    decoder = memorising(tiny_decoder(kind))
    export_onnx_decoder(decoder, tmp_path)
    quantize_onnx_decoder(tmp_path)
    int8 = OnnxDecoder(tmp_path, init_file="decoder_init.int8.onnx", step_file="decoder_step.int8.onnx")
    assert (tmp_path / "decoder_step.int8.onnx").stat().st_size < 0.75 * (tmp_path / "decoder_step.onnx").stat().st_size  # tiny: the graph itself weighs
    g, r = features(seed=1, batch=8)  # the memorised images, step by step along the memorised captions
    ids = captions_in(seed=2, batch=8, length=9)
    state, float_state = int8.init_state(g, r), decoder.init_state(g, r)
    errors = []
    for t in range(8):
        logits, state, _ = int8.step(ids[:, t], state)
        with torch.no_grad(): float_logits, float_state, _ = decoder.step(ids[:, t], float_state)
        errors.append(relative_error(float_logits, logits))
    assert 0 < max(errors) < 0.10, f"int8 ONNX logits should be close to, not equal to, float32: {max(errors):.4f}"
    int8_captions, float_captions = (beam_search(d, g, r, beam_size=3, max_len=12) for d in (int8, decoder))
    same = sum(torch.equal(a, b) for a, b in zip(int8_captions, float_captions))
    assert same >= 7, f"only {same} of 8 memorised captions survive int8"


@needs_onnxruntime
def test_static_int8_onnx_encoder_keeps_the_features(tmp_path):
    # Calibrated on the images it is then run on, a static int8 encoder rounds every activation to 1/255 of its range:
    # each image's region features keep their direction (cosine > 0.95; an encoder with wrong weights or scales is
    # at ~0), within a few percent of their norm.
    model = tiny_model("gru")
    export_onnx(model, tmp_path)
    pixels = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    quantize_onnx_encoder(tmp_path, pixels)
    with torch.no_grad():
        _, reference = model.encoder(pixels)
    _, regions = OnnxEncoder(tmp_path / "encoder.int8.onnx")(pixels)
    cosine = nn.functional.cosine_similarity(regions.flatten(1), reference.flatten(1))
    assert cosine.min() > 0.95, f"int8 region features should point where float32 ones do: {cosine.min():.3f}"
    assert not torch.equal(regions, reference)
    assert (tmp_path / "encoder.int8.onnx").stat().st_size < (tmp_path / "encoder.onnx").stat().st_size
