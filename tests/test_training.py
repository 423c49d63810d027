import json

import pytest
import torch

from captioning.data import CaptionDataset, ImageDataset
from captioning.decoder import DecoderConfig, DecoderOutput, build_decoder
from captioning.encoder import build_encoder
from captioning.synthetic import synthetic_corpus
from captioning.training import (CaptionModel, CheckpointError, TrainConfig, atomic_save, caption_loss, export_model,
                                 fit, generate_captions, load_exported)
from captioning.vocabulary import PAD_ID, Vocabulary


def setup(seed=0, kind="attention"):
    torch.manual_seed(seed)
    items = synthetic_corpus(n_train=24, n_dev=6, n_test=0, seed=2)
    rng = torch.Generator().manual_seed(0)
    features = [(torch.randn(16, generator=rng), torch.randn(4, 16, generator=rng)) for _ in range(30)]
    vocab = Vocabulary.build([c for i in items["train"] for c in i.captions], min_freq=1)
    decoder = build_decoder(DecoderConfig(vocab_size=len(vocab), feature_dim=16, kind=kind, embed_dim=16,
                                          hidden_dim=24, attention_dim=8, dropout=0.3))
    model = CaptionModel(build_encoder("tiny", pretrained=False), decoder)
    return model, vocab, CaptionDataset(items["train"], vocab, features=features[:24]), ImageDataset(items["dev"], features=features[24:])


CONFIG = TrainConfig(epochs=3, batch_size=8, warmup_steps=3, patience=10, precision="fp32")


class Crash(Exception):
    pass


def crash_after(n):
    def callback(history):
        if len(history) == n: raise Crash()
    return callback


def test_loss_ignores_padding():
    targets = torch.tensor([[5, 2, PAD_ID]])
    logits = torch.zeros(1, 3, 9)
    base = caption_loss(DecoderOutput(logits, None), targets)
    logits[0, 2] = torch.randn(9) * 50
    assert torch.equal(caption_loss(DecoderOutput(logits, None), targets), base)


def test_resume_after_crash_is_identical(tmp_path):
    model, vocab, train, dev = setup()
    fit(model, vocab, train, dev, CONFIG, tmp_path / "a", progress=False)
    model, vocab, train, dev = setup()
    with pytest.raises(Crash):
        fit(model, vocab, train, dev, CONFIG, tmp_path / "b", callbacks=[crash_after(1)], progress=False)
    model, vocab, train, dev = setup(seed=99)
    fit(model, vocab, train, dev, CONFIG, tmp_path / "b", progress=False)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["state"]["history"][-1]["train_loss"] == b["state"]["history"][-1]["train_loss"]


def test_checkpoint_for_another_model_or_config_is_refused(tmp_path):
    model, vocab, train, dev = setup()
    fit(model, vocab, train, dev, TrainConfig(**{**CONFIG.to_dict(), "epochs": 1}), tmp_path, progress=False)
    other, *_ = setup(kind="gru")
    with pytest.raises(CheckpointError, match="different model"):
        fit(other, vocab, train, dev, CONFIG, tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="lr"):
        fit(model, vocab, train, dev, TrainConfig(**{**CONFIG.to_dict(), "lr": 0.1}), tmp_path, progress=False)


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path):
    path = atomic_save({"step": 1}, tmp_path / "checkpoint.pt")

    class Unpicklable:
        def __reduce__(self): raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_export_round_trip_and_mismatch(tmp_path):
    model, vocab, train, dev = setup()
    fit(model, vocab, train, dev, TrainConfig(**{**CONFIG.to_dict(), "epochs": 1}), tmp_path / "run", progress=False)
    folder = export_model(model, vocab, tmp_path / "export")
    loaded, loaded_vocab, config = load_exported(folder)
    assert generate_captions(loaded, dev, loaded_vocab) == generate_captions(model, dev, vocab)
    assert config["decoder"]["kind"] == "attention"
    with pytest.raises(CheckpointError, match="training run folder"):
        load_exported(tmp_path / "run")
    data = json.loads((folder / "vocab.json").read_text())
    data["words"] = data["words"][:-1]
    (folder / "vocab.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="expects"):
        load_exported(folder)


def test_export_keeps_the_input_size_the_model_was_trained_at(tmp_path):
    from captioning.encoder import resized_input
    model, vocab, train, dev = setup()
    model.encoder.preprocessing = resized_input(model.encoder.preprocessing, 96, squash=True)
    folder = export_model(model, vocab, tmp_path / "export")
    loaded, _, _ = load_exported(folder)
    assert loaded.encoder.preprocessing == model.encoder.preprocessing
    assert build_encoder("tiny", pretrained=False).preprocessing != model.encoder.preprocessing  # from config.json
    config = json.loads((folder / "config.json").read_text())
    config["preprocessing"]["colour"] = "sepia"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="bad preprocessing"):
        load_exported(folder)


def test_a_custom_objective_chooses_examples_and_loss_and_reports_figures(tmp_path):
    from captioning.training import CrossEntropyObjective

    class FirstPairsOnly(CrossEntropyObjective):
        "Cross-entropy on the first 8 pairs only, counting the captions it saw."
        def __init__(self): self.seen = []
        def indices(self, train_set, epoch, config): return list(range(8))
        def loss(self, model, batch, train_set, config):
            self.seen += batch.image_indices.tolist()
            return super().loss(model, batch, train_set, config)
        def summary(self): return {"captions_seen": len(self.seen)}

    model, vocab, train, dev = setup()
    objective = FirstPairsOnly()
    history = fit(model, vocab, train, dev, CONFIG, tmp_path, progress=False, objective=objective)
    first_images = {train.pairs[i][0] for i in range(8)}
    assert set(objective.seen) <= first_images and len(objective.seen) == 8 * CONFIG.epochs
    assert [h["captions_seen"] for h in history] == [8, 16, 24]


def test_score_start_keeps_the_starting_weights_unless_training_beats_them(tmp_path):
    model, vocab, train, dev = setup()
    fit(model, vocab, train, dev, CONFIG, tmp_path / "ce", progress=False)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = TrainConfig(epochs=1, batch_size=8, warmup_steps=1, lr=1e-12, precision="fp32")  # training changes nothing
    history = fit(model, vocab, train, dev, frozen, tmp_path / "again", progress=False, score_start=True)
    assert history[0]["improved"] is False  # equal to the start is not better than the start
    assert torch.load(tmp_path / "again" / "best.pt", weights_only=True)["epoch"] == -1
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())
