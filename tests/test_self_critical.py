"Self-critical training: the reward is the evaluation's CIDEr-D, the baselines and the loss have the right signs, and fit runs it."
import json

import numpy as np
import pytest
import torch

from captioning.data import CaptionDataset, ImageDataset, collate_captions
from captioning.decoder import DecoderConfig, build_decoder, greedy_decode, sample_decode
from captioning.encoder import build_encoder
from captioning.metrics import CiderD, cider_d
from captioning.self_critical import (CiderReward, SelfCriticalConfig, SelfCriticalObjective, mean_of_others,
                                      policy_gradient_loss, self_critical_config)
from captioning.model import CaptionModel
from captioning.recipes import DEFAULTS
from captioning.synthetic import synthetic_corpus
from captioning.training import TrainConfig, fit
from captioning.vocabulary import END_ID, PAD_ID, START_ID, UNK_ID, Vocabulary, tokenize


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def setup(seed=0, n_train=12, n_dev=4, dropout=0.3):
    "A tiny attention model on random features, with a synthetic training set whose vocabulary has `<unk>` words."
    torch.manual_seed(seed)
    items = synthetic_corpus(n_train=n_train, n_dev=n_dev, n_test=0, seed=7)
    rng = torch.Generator().manual_seed(0)
    features = [(torch.randn(16, generator=rng), torch.randn(4, 16, generator=rng)) for _ in range(n_train + n_dev)]
    vocab = Vocabulary.build([c for i in items["train"] for c in i.captions], min_freq=2)
    decoder = build_decoder(DecoderConfig(vocab_size=len(vocab), feature_dim=16, kind="attention", embed_dim=16,
                                          hidden_dim=24, attention_dim=8, dropout=dropout))
    model = CaptionModel(build_encoder("tiny", pretrained=False), decoder, vocab)
    train = CaptionDataset(items["train"], vocab, features=features[:n_train])
    return model, vocab, train, ImageDataset(items["dev"], features=features[n_train:])


def noisy_captions(train, n, seed=0, max_len=14):
    "Training captions (ids after <start>) with a third of the words replaced at random, some cut before <end>."
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((n, max_len), PAD_ID)
    for k, row in enumerate(torch.randint(len(train.pairs), (n,), generator=g).tolist()):
        caption = train.pairs[row][1][1:max_len + 1].clone()
        noise = torch.rand(len(caption), generator=g) < 0.3
        caption[noise] = torch.randint(UNK_ID, len(train.vocab), (int(noise.sum()),), generator=g)
        ids[k, :len(caption)] = caption
    return ids


class LengthReward(CiderReward):
    "A stand-in reward: the number of words, so that samples of different lengths get different rewards."
    def score(self, captions, image_indices):
        return np.array([float(len(c)) for c in captions])


def sequence_log_probs(model, inputs, ids):
    "log p(ids) (C,) under teacher forcing in eval mode: <end> included, padding excluded."
    model.eval()
    start = torch.full((len(ids), 1), START_ID)
    logits = model(inputs, torch.cat([start, ids[:, :-1]], 1)).logits  # (C, L, V)
    token_log_probs = logits.float().log_softmax(-1).gather(2, ids.unsqueeze(2)).squeeze(2)
    return token_log_probs.masked_fill(ids == PAD_ID, 0.0).sum(1)


def test_reward_equals_evaluation_cider():
    _, vocab, train, _ = setup(n_train=30)
    reward = CiderReward.from_dataset(train)
    references = [item.captions for item in train.images]
    ids = noisy_captions(train, 300)
    images = torch.randint(len(references), (300,), generator=torch.Generator().manual_seed(1))
    texts = vocab.decode_batch(ids)
    assert any("<unk>" in t for t in texts), "the check must cover unknown words"
    assert reward.tokens(ids) == [tokenize(t) for t in texts]
    got = reward(ids, images)
    assert np.abs(got - CiderD(references).score(texts, images.numpy())).max() < 1e-9
    assert got.max() > 0.5, "some captions must score, or the comparison is empty"
    one_each = ids[:len(references)]  # one caption per image: the corpus CIDEr-D of fit's validation
    assert abs(reward(one_each, range(len(references))).mean() - cider_d(vocab.decode_batch(one_each), references)) < 1e-9


def test_reward_equals_pycocoevalcap_per_image():
    coco_cider = pytest.importorskip("pycocoevalcap.cider.cider")
    _, vocab, train, _ = setup(n_train=20)
    references = [item.captions for item in train.images]
    ids = noisy_captions(train, len(references), seed=3)
    gts = {i: [" ".join(tokenize(r)) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(tokenize(t))] for i, t in enumerate(vocab.decode_batch(ids))}
    _, coco = coco_cider.Cider().compute_score(gts, res)
    assert np.abs(CiderReward.from_dataset(train)(ids, range(len(references))) - np.asarray(coco)).max() < 1e-9


def test_reward_of_captions_without_any_match_is_zero():
    _, vocab, train, _ = setup()
    reward = CiderReward.from_dataset(train)
    ids = torch.tensor([[UNK_ID, UNK_ID, END_ID], [END_ID, PAD_ID, PAD_ID]])  # "<unk> <unk>" and the empty caption
    assert reward(ids, [0, 1]).tolist() == [0.0, 0.0]
    assert reward(torch.zeros(0, 3, dtype=torch.long), []).shape == (0,)
    with pytest.raises(ValueError, match="vocabulary's range"): reward(torch.tensor([[len(vocab)]]), [0])
    with pytest.raises(ValueError, match="image indices"): reward(ids, [0])


def test_references_without_a_word_are_refused_or_score_zero():
    "Punctuation-only references: the reward must say so when built, or score every caption 0 — not crash mid-training."
    _, vocab, _, _ = setup()
    ids = torch.tensor([[UNK_ID, END_ID], [END_ID, PAD_ID]])
    try:
        reward = CiderReward([["!"], ["..."]], vocab)
    except ValueError as e:
        assert "word" in str(e)
        return
    assert reward(ids, [0, 1]).tolist() == [0.0, 0.0]


def test_mean_baseline_excludes_the_sample_itself():
    rewards = torch.tensor([[9.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    assert mean_of_others(rewards).tolist() == [[0.0, 4.5, 4.5], [2.5, 2.0, 1.5]]
    with pytest.raises(ValueError, match="at least 2 samples"): mean_of_others(torch.ones(3, 1))


def test_objective_loss_is_reinforce_with_the_leave_one_out_baseline():
    "Replaying the objective's samples (same seed) gives exactly -mean((r - mean of others) * log p)."
    model, _, train, _ = setup()
    S = 3
    objective = SelfCriticalObjective(config=SelfCriticalConfig(num_samples=S), reward=LengthReward.from_dataset(train))
    batch = collate_captions([train[i] for i in objective.indices(train, 0, TrainConfig())[:4]])
    torch.manual_seed(11)
    loss = objective.loss(model, batch, train, TrainConfig())
    model.eval()
    torch.manual_seed(11)
    g, r = batch.inputs
    ids, log_probs = sample_decode(model.decoder, g.repeat_interleave(S, 0), r.repeat_interleave(S, 0), 16)
    rewards = torch.tensor([float(len(t)) for t in objective.reward.tokens(ids)]).view(4, S)
    assert rewards.std() > 0
    others = torch.tensor([[torch.cat([row[:k], row[k + 1:]]).mean() for k in range(S)] for row in rewards])
    expected = -((rewards - others).flatten() * log_probs.sum(1)).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    summary = objective.summary()
    assert summary["sample_reward"] == pytest.approx(rewards.mean().item())
    assert summary["baseline_reward"] == pytest.approx(rewards.mean().item())  # the others' means average to the mean
    assert summary["sample_length"] == pytest.approx(rewards.mean().item())
    assert objective.summary() == {}


def test_gradient_step_raises_the_better_sample_and_lowers_the_worse():
    model, _, train, _ = setup(dropout=0.0)
    objective = SelfCriticalObjective(config=SelfCriticalConfig(num_samples=2), reward=LengthReward.from_dataset(train))
    batch = collate_captions([train[0]])
    torch.manual_seed(3)
    ids, _ = sample_decode(model.decoder, *(x.repeat_interleave(2, 0) for x in batch.inputs), 16)
    lengths = [len(t) for t in objective.reward.tokens(ids)]
    assert lengths[0] != lengths[1], "the two samples must differ in reward"
    better, worse = (0, 1) if lengths[0] > lengths[1] else (1, 0)
    inputs = tuple(x.repeat_interleave(2, 0) for x in batch.inputs)
    before = sequence_log_probs(model, inputs, ids).detach()
    torch.manual_seed(3)  # the objective draws the same two samples
    loss = objective.loss(model, batch, train, TrainConfig())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    after = sequence_log_probs(model, inputs, ids).detach()
    assert after[better] > before[better] and after[worse] < before[worse]


def test_greedy_baseline_is_the_reward_of_the_greedy_caption():
    model, _, train, _ = setup()
    objective = SelfCriticalObjective(train, SelfCriticalConfig(baseline="greedy", num_samples=1))
    batch = collate_captions([train[i] for i in objective.indices(train, 0, TrainConfig())])
    model.train()
    objective.loss(model, batch, train, TrainConfig())
    assert model.training, "the objective restores the model's mode"
    model.eval()
    greedy = greedy_decode(model.decoder, *batch.inputs, max_len=16)
    expected = objective.reward(greedy, batch.image_indices).mean()
    assert objective.summary()["baseline_reward"] == pytest.approx(expected)


def test_dropout_flag_decides_the_sampling_mode():
    model, _, train, _ = setup(dropout=0.5)
    batch = collate_captions([train[i] for i in range(0, 20, 5)])

    def loss(dropout, mode):
        model.train(mode)
        torch.manual_seed(5)
        return SelfCriticalObjective(train, SelfCriticalConfig(dropout=dropout)).loss(model, batch, train, TrainConfig())

    assert torch.equal(loss(False, True), loss(False, False)), "dropout off: samples the eval-mode policy"
    assert not torch.equal(loss(True, True), loss(False, True))


def test_indices_take_one_pair_per_image():
    _, _, train, _ = setup()
    indices = SelfCriticalObjective().indices(train, 3, TrainConfig(curriculum_epochs=5))
    assert [train.pairs[i][0] for i in indices] == list(range(len(train.images)))
    assert len(train.pairs) == 5 * len(indices)


def test_fit_records_the_summary(tmp_path):
    model, vocab, train, dev = setup()
    config = self_critical_config(TrainConfig(precision="fp32"), epochs=2, batch_size=4, patience=5)
    objective = SelfCriticalObjective(train, SelfCriticalConfig(num_samples=2, max_len=8))
    history = fit(model, vocab, train, dev, config, tmp_path, progress=False, objective=objective)
    assert len(history) == 2
    for record in history:
        assert {"sample_reward", "baseline_reward", "sample_length", "sample_repeated_bigrams"} <= set(record)
        assert 0 < record["sample_length"] <= 8 and np.isfinite(record["sample_reward"])
    assert json.loads((tmp_path / "history.json").read_text())[-1]["sample_reward"] == history[-1]["sample_reward"]


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="num_samples must be at least 2"): SelfCriticalConfig(num_samples=1)
    with pytest.raises(ValueError, match="unknown baseline"): SelfCriticalConfig(baseline="max")
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        SelfCriticalConfig(num_samples=0, baseline="greedy")
    with pytest.raises(ValueError, match="temperature"): SelfCriticalConfig(temperature=0.0)
    with pytest.raises(ValueError, match="max_len"): SelfCriticalConfig(max_len=0)
    with pytest.raises(ValueError, match="unknown SelfCriticalConfig fields"): SelfCriticalConfig.from_dict({"baselines": "mean"})
    with pytest.raises(ValueError, match="disagree"): policy_gradient_loss(torch.zeros(3, 4), torch.zeros(2))
    _, _, train, _ = setup()
    _, _, other, _ = setup(n_train=8)
    objective = SelfCriticalObjective(reward=CiderReward.from_dataset(other))
    with pytest.raises(ValueError, match="references for 8 images"): objective.reward_for(train)
    with pytest.raises(TypeError, match="must be a CaptionDataset"): SelfCriticalObjective(SelfCriticalConfig())


def test_self_critical_config():
    "The SCST stage's settings come from captioning.recipes; the cross-entropy-only terms are switched off."
    base = TrainConfig(lr=1e-3, encoder_lr=1e-4, label_smoothing=0.1, curriculum_epochs=2, max_len=20)
    config = self_critical_config(base)
    stage = DEFAULTS["self_critical_train"]
    assert (config.lr, config.batch_size, config.epochs, config.patience) == (stage["lr"], stage["batch_size"],
                                                                              stage["epochs"], stage["patience"])
    assert (config.schedule, config.warmup_steps, config.label_smoothing, config.attention_penalty,
            config.curriculum_epochs, config.bucket_by_length, config.max_len) == ("constant", 0, 0.0, 0.0, 0, False, 20)
    assert config.encoder_lr == pytest.approx(1e-4 * stage["lr"] / 1e-3)  # the encoder keeps its ratio to the decoder
    assert TrainConfig.from_dict(config.to_dict()) == config
    changed = self_critical_config(base, lr=3e-4, epochs=2, max_minutes=5.0, precision="fp32")
    assert (changed.lr, changed.epochs, changed.max_minutes, changed.precision, changed.batch_size) == \
        (3e-4, 2, 5.0, "fp32", stage["batch_size"])
    assert changed.encoder_lr == pytest.approx(1e-4 * 3e-4 / 1e-3)
    with pytest.raises(TypeError): self_critical_config(base, learning_rate=1e-5)
    with pytest.raises(ValueError, match="patience"): self_critical_config(base, patience=0)
