"The export folder: every decoder kind round-trips, older exports still load, and a changed file is caught by its checksum."
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from captioning.data import ImageDataset
from captioning.files import CheckpointError, file_sha256
from captioning.model import (EXPORT_VERSION, GENERATION, CaptionModel, check_generation, evaluate_model,
                              generate_captions)
from captioning.synthetic import synthetic_corpus

from conftest import tiny_caption_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

KINDS = ["lstm", "gru", "attention", "transformer"]


def export(model, folder, **recorded):
    model.generation = recorded.get("generation", {"beam_size": 2, "max_len": 10, "no_repeat_ngram_size": 2})
    model.trained_on = recorded.get("trained_on", {"dataset": "synthetic", "n_train": 20, "seed": 3})
    model.metrics = recorded.get("metrics", {"dev_CIDEr-D": 0.25, "dev_BLEU-4": None})
    model.save_pretrained(folder)
    return folder


def same_weights(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_of_every_decoder_kind(kind, tmp_path, tiny_export):
    model = tiny_caption_model(kind)
    folder = export(model, tmp_path / "export")
    assert {p.name for p in folder.iterdir()} >= {"README.md", "config.json", "model.safetensors", "vocab.json"}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left
    loaded = CaptionModel.from_pretrained(folder)
    assert type(loaded.decoder) is type(model.decoder) and loaded.decoder.config == model.decoder.config
    assert same_weights(loaded, model) and loaded.vocab.itos == model.vocab.itos
    assert (loaded.generation, loaded.trained_on, loaded.metrics) == (model.generation, model.trained_on, model.metrics)
    assert not loaded.training and not any(p.requires_grad for p in loaded.encoder.parameters())
    captions = model.caption(tiny_export.images)
    assert loaded.caption(tiny_export.images) == captions and any(captions)
    assert loaded.caption(tiny_export.images, beam_size=1) == model.caption(tiny_export.images, beam_size=1)
    if kind == "transformer":  # the tied output layer is stored once and tied again on loading
        assert loaded.decoder.output.weight is loaded.decoder.embedding.weight


def test_export_records_what_it_needs_to_rebuild_the_model(tmp_path):
    from captioning.encoder import resized_input
    model = tiny_caption_model("attention")
    model.encoder.preprocessing = resized_input(model.encoder.preprocessing, 96, squash=True)  # trained at 96 px
    config = json.loads((export(model, tmp_path / "export") / "config.json").read_text())
    assert (config["format"], config["version"], config["encoder"]) == ("captioning.export", EXPORT_VERSION, "tiny")
    assert config["decoder"] == model.decoder.config.to_dict() and config["vocab_size"] == len(model.vocab)
    assert set(config["sha256"]) == {"model.safetensors", "vocab.json"}
    assert config["sha256"]["model.safetensors"] == file_sha256(tmp_path / "export" / "model.safetensors")
    loaded = CaptionModel.from_pretrained(tmp_path / "export")
    assert loaded.encoder.preprocessing == model.encoder.preprocessing  # from config.json, not the class default


def test_an_export_of_version_1_still_loads(tmp_path, tiny_export):
    "Version 1: no checksums, and the decoder config carried the Transformer's num_heads/ff_dim for every kind."
    folder = export(tiny_caption_model("lstm"), tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    del config["sha256"]
    config["version"] = 1
    config["decoder"].update(num_heads=8, ff_dim=2048)
    (folder / "config.json").write_text(json.dumps(config))
    loaded = CaptionModel.from_pretrained(folder)
    assert not hasattr(loaded.decoder.config, "num_heads")
    assert loaded.caption(tiny_export.images) == tiny_caption_model("lstm").caption(tiny_export.images, **loaded.generation)
    with pytest.raises(CheckpointError, match="export version 3"):
        (folder / "config.json").write_text(json.dumps({**config, "version": 3}))
        CaptionModel.from_pretrained(folder)


def test_the_checksum_catches_a_changed_weights_or_vocabulary_file(tmp_path):
    folder = export(tiny_caption_model("gru"), tmp_path / "export")
    weights = load_file(str(folder / "model.safetensors"))
    weights["decoder.output.bias"] = weights["decoder.output.bias"] + 1  # a valid file, other weights
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged or was replaced: its SHA-256 differs"):
        CaptionModel.from_pretrained(folder)
    folder = export(tiny_caption_model("gru"), tmp_path / "other")
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab["words"][-2:] = vocab["words"][-1:-3:-1]  # two words swapped: every caption would be wrong
    (folder / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(CheckpointError, match=r"vocab\.json is damaged or was replaced"):
        CaptionModel.from_pretrained(folder)


def test_a_run_folder_or_a_missing_folder_is_named(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="training run folder: use its export/ subfolder"):
        CaptionModel.from_pretrained(tmp_path / "run")
    with pytest.raises(CheckpointError, match="export folder not found"):
        CaptionModel.from_pretrained(tmp_path / "nowhere")


def test_a_name_without_one_slash_is_a_folder_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a typo'd relative folder must not send the user to the hub
    for name in ("nowhere", "runs/a/export"):
        with pytest.raises(CheckpointError, match=f"export folder not found: {name}"):
            CaptionModel.from_pretrained(name)


def test_a_model_without_a_vocabulary_cannot_be_exported_or_caption(tmp_path, tiny_export):
    model = tiny_caption_model()
    model.vocab = None
    with pytest.raises(ValueError, match="vocab"):
        model.save_pretrained(tmp_path / "export")
    with pytest.raises(ValueError, match="vocabulary"):
        model.caption(tiny_export.images)


def test_check_generation_fills_defaults_and_refuses_bad_values():
    assert check_generation({}) == GENERATION
    assert check_generation({"beam_size": 1}) == {**GENERATION, "beam_size": 1}
    for bad, message in (({"beam_size": 0}, "beam_size must be an integer of at least 1"),
                         ({"beam_size": "three"}, "beam_size must be an integer"),
                         ({"max_len": 2.5}, "max_len must be an integer"),
                         ({"beam_size": True}, "beam_size must be an integer"),
                         ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be an integer of at least 0"),
                         ({"beam": 3}, "unknown decoding settings")):
        with pytest.raises(ValueError, match=message):
            check_generation(bad)


def test_caption_restores_the_mode_and_decodes_as_the_model_says(tiny_export):
    model = tiny_caption_model()
    model.train()
    model.generation = {**GENERATION, "beam_size": 1}
    captions = model.caption(tiny_export.images, batch_size=2)  # batches of 2 and 1
    assert model.training and model.decoder.training
    model.eval()
    assert captions == model.caption(tiny_export.images, beam_size=1, max_len=20)
    with pytest.raises(ValueError, match="beam_size"):
        model.caption(tiny_export.images, beam_size=0)


def test_generate_and_evaluate_on_pixels_and_on_features():
    model = tiny_caption_model("attention")
    items = synthetic_corpus(0, 3, 0, seed=4)["dev"]
    from captioning.data import image_transforms
    pixels = ImageDataset(items, image_transforms(model.encoder.preprocessing))
    with torch.no_grad():
        features = [tuple(x[0] for x in model.encoder(pixels[i][0].unsqueeze(0))) for i in range(len(items))]
    on_features = ImageDataset(items, features=features)
    captions = generate_captions(model, pixels, model.vocab, beam_size=2, batch_size=2)
    assert len(captions) == 3 and captions == generate_captions(model, on_features, model.vocab, beam_size=2)
    assert captions == model.caption([item.load() for item in items], beam_size=2)
    metrics, evaluated = evaluate_model(model, model.vocab, on_features, beam_size=2, meteor=False)
    assert evaluated == captions and set(metrics) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}
