"The training loop: exact resume, checkpoints that refuse what does not belong, validated settings, and a loss that stops on NaN."
import json
import math
import random

import numpy as np
import pytest
import torch

from captioning.data import CaptionDataset, ImageDataset
from captioning.decoder import DecoderConfig, DecoderOutput, build_decoder
from captioning.encoder import build_encoder
from captioning.files import CheckpointError, atomic_save, load_torch_file
from captioning.model import CaptionModel, generate_captions
from captioning.synthetic import synthetic_corpus
from captioning.training import (RESUMABLE_CHANGES, CrossEntropyObjective, EpochBatches, TrainConfig, TrainingFailed,
                                 caption_loss, curriculum_indices, fit, make_optimizer, make_scheduler,
                                 record_differences, rng_state, set_rng_state, training_record)
from captioning.vocabulary import PAD_ID, Vocabulary

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def setup(seed=0, kind="attention"):
    torch.manual_seed(seed)
    items = synthetic_corpus(n_train=24, n_dev=6, n_test=0, seed=2)
    rng = torch.Generator().manual_seed(0)
    features = [(torch.randn(16, generator=rng), torch.randn(4, 16, generator=rng)) for _ in range(30)]
    vocab = Vocabulary.build([c for i in items["train"] for c in i.captions], min_freq=1)
    decoder = build_decoder(DecoderConfig(vocab_size=len(vocab), feature_dim=16, kind=kind, embed_dim=16,
                                          hidden_dim=24, attention_dim=8, dropout=0.3))
    model = CaptionModel(build_encoder("tiny", pretrained=False), decoder, vocab)
    return model, vocab, CaptionDataset(items["train"], vocab, features=features[:24]), ImageDataset(items["dev"], features=features[24:])


CONFIG = TrainConfig(epochs=3, batch_size=8, warmup_steps=3, patience=10, precision="fp32")


def with_(config: TrainConfig, **changes) -> TrainConfig:
    return TrainConfig(**{**config.to_dict(), **changes})


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
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)  # tensors and plain data only
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["state"]["history"][-1]["train_loss"] == b["state"]["history"][-1]["train_loss"]
    assert json.loads((tmp_path / "b" / "history.json").read_text()) == b["state"]["history"]


def test_checkpoint_for_another_model_or_config_is_refused(tmp_path):
    model, vocab, train, dev = setup()
    fit(model, vocab, train, dev, with_(CONFIG, epochs=1), tmp_path, progress=False)
    other, *_ = setup(kind="gru")
    with pytest.raises(CheckpointError, match="different decoder"):
        fit(other, vocab, train, dev, CONFIG, tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"lr 0\.002 -> 0\.1"):
        fit(model, vocab, train, dev, with_(CONFIG, lr=0.1), tmp_path, progress=False)
    _, _, fewer, _ = setup()
    fewer.images = fewer.images[:-1]  # one training image less: another run's data
    with pytest.raises(CheckpointError, match="training images or captions"):
        fit(model, vocab, fewer, dev, CONFIG, tmp_path, progress=False)
    history = fit(model, vocab, train, dev, with_(CONFIG, epochs=2, patience=5), tmp_path, progress=False)
    assert len(history) == 2  # a longer budget is not another run: it resumes


def test_training_record_and_its_differences_in_words():
    model, vocab, train, dev = setup()
    record = training_record(model, vocab, train, dev, CrossEntropyObjective(), CONFIG)
    json.dumps(record)  # plain data
    for name in RESUMABLE_CHANGES:
        assert name not in record["config"]
    changed = training_record(model, vocab, train, dev, CrossEntropyObjective(), with_(CONFIG, epochs=9, patience=1))
    assert record_differences(record, changed) == []
    other, *_ = setup(kind="lstm")
    changed = training_record(other, vocab, train, dev, CrossEntropyObjective(), with_(CONFIG, label_smoothing=0.1))
    assert record_differences(record, changed) == ["decoder", "label_smoothing 0.0 -> 0.1"]


def test_rng_state_is_plain_data_that_restores_every_generator(tmp_path):
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    draws = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(5); np.random.seed(5); torch.manual_seed(5)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path):
    path = atomic_save({"step": 1}, tmp_path / "checkpoint.pt")

    class Unpicklable:
        def __reduce__(self): raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert load_torch_file(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_export_round_trip_and_mismatch(tmp_path):
    model, vocab, train, dev = setup()
    fit(model, vocab, train, dev, with_(CONFIG, epochs=1), tmp_path / "run", progress=False)
    model.save_pretrained(tmp_path / "export")
    folder = tmp_path / "export"
    loaded = CaptionModel.from_pretrained(folder)
    assert generate_captions(loaded, dev, loaded.vocab) == generate_captions(model, dev, vocab)
    assert json.loads((folder / "config.json").read_text())["decoder"]["kind"] == "attention"
    with pytest.raises(CheckpointError, match="training run folder"):
        CaptionModel.from_pretrained(tmp_path / "run")
    data = json.loads((folder / "vocab.json").read_text())
    data["words"] = data["words"][:-1]
    (folder / "vocab.json").write_text(json.dumps(data))
    config = json.loads((folder / "config.json").read_text())
    config["sha256"].pop("vocab.json")  # past the checksum: the sizes must still be checked
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="expects"):
        CaptionModel.from_pretrained(folder)


def test_export_keeps_the_input_size_the_model_was_trained_at(tmp_path):
    from captioning.encoder import resized_input
    model, vocab, train, dev = setup()
    model.encoder.preprocessing = resized_input(model.encoder.preprocessing, 96, squash=True)
    folder = tmp_path / "export"
    model.save_pretrained(folder)
    loaded = CaptionModel.from_pretrained(folder)
    assert loaded.encoder.preprocessing == model.encoder.preprocessing
    assert build_encoder("tiny", pretrained=False).preprocessing != model.encoder.preprocessing  # from config.json
    config = json.loads((folder / "config.json").read_text())
    config["preprocessing"]["colour"] = "sepia"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json.*colour"):
        CaptionModel.from_pretrained(folder)


def test_a_custom_objective_chooses_examples_and_loss_and_reports_figures(tmp_path):
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


def test_a_diverging_loss_stops_the_run(tmp_path, capsys):
    model, vocab, train, dev = setup()
    with pytest.raises(TrainingFailed, match="training diverged. Lower the learning rate"):
        fit(model, vocab, train, dev, with_(CONFIG, lr=1e30, warmup_steps=0), tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()  # no epoch finished: nothing to resume
    fit(setup()[0], vocab, train, dev, with_(CONFIG, epochs=1), tmp_path / "quiet", verbose=False)
    assert capsys.readouterr() == ("", "")  # verbose=False: no lines, no progress bars


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(batch_size=0), dict(patience=0), dict(accumulate=0),
                                 dict(lr=0.0), dict(lr=-1e-3), dict(lr=math.nan), dict(lr=math.inf), dict(grad_clip=math.nan),
                                 dict(encoder_lr=-1.0), dict(weight_decay=math.nan), dict(label_smoothing=1.0),
                                 dict(schedule="linear"), dict(precision="fp8"), dict(max_minutes=0), dict(seed=-1),
                                 dict(warmup_steps=-1), dict(epochs=True), dict(eval_beam_size=0), dict(epochs=2.5)],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_train_config_refuses_impossible_settings(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        TrainConfig(**bad)


def test_train_config_round_trips_and_refuses_unknown_fields():
    assert TrainConfig.from_dict(json.loads(json.dumps(CONFIG.to_dict()))) == CONFIG
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_epoch_batches_depend_on_seed_and_epoch_only():
    lengths = [i % 7 + 2 for i in range(50)]
    a = list(EpochBatches(range(50), 8, seed=1, epoch=2, lengths=lengths))
    assert a == list(EpochBatches(range(50), 8, seed=1, epoch=2, lengths=lengths))  # a resumed run sees the same batches
    assert a != list(EpochBatches(range(50), 8, seed=1, epoch=3, lengths=lengths))
    assert sorted(i for batch in a for i in batch) == list(range(50)) and len(a) == len(EpochBatches(range(50), 8, 1, 2))
    plain = list(EpochBatches(range(50), 8, seed=1, epoch=2))
    spread = lambda batches: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread(a) < spread(plain)  # bucketing puts similar lengths together


def test_curriculum_starts_with_the_shortest_captions():
    _, _, train, _ = setup()
    lengths = [len(ids) for _, ids in train.pairs]
    first = curriculum_indices(train, 0, curriculum_epochs=2)
    assert len(first) == len(train) // 3 and max(lengths[i] for i in first) <= sorted(lengths)[len(first)]
    assert curriculum_indices(train, 2, curriculum_epochs=2) == list(range(len(train)))


def test_optimizer_groups_and_schedules():
    model, *_ = setup()
    assert [g["name"] for g in make_optimizer(model, CONFIG).param_groups] == ["decoder"]  # the encoder is frozen
    model.encoder.unfreeze_last(1)
    optimizer = make_optimizer(model, with_(CONFIG, encoder_lr=1e-5))
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("decoder", CONFIG.lr), ("encoder", 1e-5)]
    scheduler = make_scheduler(optimizer, with_(CONFIG, warmup_steps=4), total_steps=100)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step(); scheduler.step()
    assert rates[:4] == pytest.approx([CONFIG.lr * k / 4 for k in range(1, 5)]) and rates[-1] < CONFIG.lr * 0.01
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))  # cosine decay never rises
    constant = make_scheduler(optimizer, with_(CONFIG, schedule="constant", warmup_steps=0), total_steps=10)
    assert isinstance(constant, torch.optim.lr_scheduler.LambdaLR) and constant.lr_lambdas[0](9) == 1.0
    plateau = make_scheduler(optimizer, with_(CONFIG, schedule="plateau"), total_steps=10)
    assert isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau)
