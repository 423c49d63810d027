import json

import pytest
import torch
from PIL import Image

from captioning.data import (CaptionDataset, DatasetFormatError, DatasetUnavailable, ImageDataset, ImageLoadError,
                             ImagePreprocessing, collate_captions, image_transforms, load_corpus, load_flickr8k,
                             load_hf, load_image, write_fake_flickr8k)
from captioning.synthetic import synthetic_corpus
from captioning.vocabulary import PAD_ID, Vocabulary

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py: two threads crawl on two shared cores


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "I;16"])
def test_load_image_converts_modes_to_rgb(tmp_path, mode):
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    Image.new(mode, (6, 5)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (6, 5)


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "ok.jpg").read_bytes()[:300])
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")


def test_fake_flickr8k_and_malformed_line(tmp_path):
    root = write_fake_flickr8k(tmp_path / "f8k", n_images=9)
    corpus = load_flickr8k(root)
    assert {s: len(v) for s, v in corpus.items()} == {"train": 3, "dev": 3, "test": 3}
    with open(root / "Flickr8k.token.txt", "a") as f:
        f.write("no tab on this line\n")
    with pytest.raises(DatasetFormatError, match=r"Flickr8k.token.txt:46"):
        load_flickr8k(root)


def test_synthetic_is_deterministic_and_varied():
    a, b = synthetic_corpus(30, 5, 5, seed=1), synthetic_corpus(30, 5, 5, seed=1)
    assert [i.captions for i in a["train"]] == [i.captions for i in b["train"]]
    assert a["train"][3].load().tobytes() == b["train"][3].load().tobytes()
    assert len({i.captions[0] for i in a["train"]}) > 20


def test_training_and_evaluation_views_and_collate():
    corpus = synthetic_corpus(10, 4, 0)
    vocab = Vocabulary.build([c for i in corpus["train"] for c in i.captions], min_freq=1)
    prep = ImagePreprocessing(size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    train = CaptionDataset(corpus["train"], vocab, image_transforms(prep, train=True))
    assert len(train) == 50
    batch = collate_captions([train[i] for i in range(6)])
    rows = getattr(batch, "input_rows", None)  # each caption's row of the inputs (images may be stacked once each)
    rows = torch.arange(6) if rows is None else rows
    assert batch.inputs[rows].shape == (6, 3, 64, 64) and batch.image_indices.tolist() == [0] * 5 + [1]
    assert batch.captions.shape[0] == 6 and batch.lengths.max() == batch.captions.shape[1]
    for row, length in zip(batch.captions, batch.lengths):
        assert (row[length:] == PAD_ID).all() and (row[:length] != PAD_ID).all()
    dev = ImageDataset(corpus["dev"], image_transforms(prep))
    assert len(dev) == 4 and len(dev.references[0]) == 5
    x, index = dev[2]
    assert torch.equal(x, dev[2][0]) and index == 2  # evaluation transforms are deterministic


def test_hf_imagefolder_offline_and_hub_error(tmp_path, monkeypatch):
    folder = tmp_path / "train"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for k in range(3):
            Image.new("RGB", (8, 8), (k * 80, 0, 0)).save(folder / f"{k}.png")
            f.write(json.dumps({"file_name": f"{k}.png", "caption": [f"picture {k}", "a red square"]}) + "\n")
    corpus = load_hf("imagefolder", data_dir=tmp_path)
    assert len(corpus["train"]) == 3 and corpus["train"][0].load().size == (8, 8)
    import captioning.data
    monkeypatch.setattr(captioning.data, "hub_unreachable_reason", lambda: "cannot connect to huggingface.co (simulated)")
    with pytest.raises(DatasetUnavailable, match=r"nlphuji/flickr30k.*simulated.*synthetic"):
        load_hf("nlphuji/flickr30k")


def test_hub_unreachable_reason_is_quick_and_says_why(monkeypatch):
    import time
    from huggingface_hub import constants
    from captioning.data import hub_unreachable_reason
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1")  # nothing listens on port 443 here
    start = time.perf_counter()
    reason = hub_unreachable_reason(timeout=2.0)
    assert reason.startswith("cannot connect to 127.0.0.1") and time.perf_counter() - start < 5
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_unreachable_reason() is None  # offline mode reads the local cache: nothing to connect to


def test_load_corpus_names_what_it_loads_and_points_to_the_synthetic_world(tmp_path):
    root = write_fake_flickr8k(tmp_path / "f8k", n_images=6)
    assert [len(v) for v in load_corpus("flickr8k", root).values()] == [2, 2, 2]
    with pytest.raises(ValueError, match="synthetic_corpus"):
        load_corpus("synthetic")
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        load_corpus("coco")


def test_default_corpus_is_flickr8k_when_found_else_the_synthetic_shapes(tmp_path, monkeypatch, capsys):
    from captioning.data import FLICKR8K_ENV
    from captioning.synthetic import default_corpus
    monkeypatch.delenv(FLICKR8K_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # no shared/data/flickr8k above this folder
    name, corpus = default_corpus(n_train=5, n_dev=2, n_test=1)
    assert name == "synthetic" and [len(v) for v in corpus.values()] == [5, 2, 1]
    assert "synthetic shapes" in capsys.readouterr().out
    monkeypatch.setenv(FLICKR8K_ENV, str(write_fake_flickr8k(tmp_path / "f8k", n_images=6)))
    name, corpus = default_corpus(verbose=False)
    assert name == "flickr8k" and corpus["train"][0].path.parent == tmp_path / "f8k" / "Images"


def test_real_flickr8k_counts(flickr8k_root):
    corpus = load_corpus("flickr8k", flickr8k_root, splits=["train", "dev"])
    assert len(corpus["train"]) == 6000
    assert sum(len(item.captions) for item in corpus["train"]) == 30000
    assert len(corpus["dev"]) == 1000
    assert load_image(corpus["dev"][0].path).size == (224, 224)
