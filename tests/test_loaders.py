"Dataset loaders on files built here: a Flickr8k `captions.txt` CSV, a Karpathy split JSON, and a Hugging Face hub dataset offline."
import csv
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from captioning.data import (CaptionedImage, DatasetFormatError, ImageLoadError, load_corpus, load_flickr8k_csv,
                             load_karpathy)

# ---------------------------------------------------------------------------------------------- Flickr8k CSV

# 10 images, 2-3 captions each, written the way Kaggle's Flickr8k `captions.txt` writes them: quoted when a caption
# holds a comma, with a quote inside a caption doubled
CSV_CAPTIONS = {
    f"{1000 + k}_{'abcdefghij'[k]}.jpg": [f"A dog, number {k}, runs on the grass .", f"Dog {k} runs .",
                                          *([f'A "big" dog {k} , with a red ball .'] if k % 3 == 0 else [])]
    for k in range(10)}
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}


def write_csv_dataset(root: Path, captions=CSV_CAPTIONS, header=("image", "caption")) -> Path:
    "`root/Images/*.jpg` and `root/captions.txt`, one row per (image, caption), rows grouped by image as on Kaggle."
    (root / "Images").mkdir(parents=True)
    for k, name in enumerate(captions):
        Image.new("RGB", (8, 6), (25 * k, 0, 0)).save(root / "Images" / name)
    with open(root / "captions.txt", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows((name, caption) for name, caps in captions.items() for caption in caps)
    return root


def md5_split(names, n_dev, n_test):
    "The documented hash split: order the names by the MD5 of the name, dev is the first n_dev, test the next n_test."
    ordered = sorted(names, key=lambda n: hashlib.md5(n.encode()).hexdigest())
    return {"train": sorted(ordered[n_dev + n_test:]), "dev": sorted(ordered[:n_dev]),
            "test": sorted(ordered[n_dev:n_dev + n_test])}


def test_csv_reads_quoted_captions_and_hash_splits_without_split_files(tmp_path):
    root = write_csv_dataset(tmp_path / "f8k")
    text = (root / "captions.txt").read_text()
    assert '"A dog, number 0, runs on the grass ."' in text and '""big""' in text  # the file really is quoted CSV
    corpus = load_flickr8k_csv(root)
    # 10 images cannot hold 1000 + 1000 held-out images: a fifth of them go to each of dev and test
    assert {split: [item.image_id for item in items] for split, items in corpus.items()} == md5_split(CSV_CAPTIONS, 2, 2)
    items = {item.image_id: item for items in corpus.values() for item in items}
    assert len(items) == 10
    for name, captions in CSV_CAPTIONS.items():  # every caption, commas and quotes intact, in file order
        assert items[name].captions == captions and items[name].path == root / "Images" / name
    assert items["1000_a.jpg"].captions[2] == 'A "big" dog 0 , with a red ball .'
    assert items["1003_d.jpg"].load().getpixel((0, 0))[0] in range(70, 80)  # its own image (red 75), decoded
    assert {s: [i.image_id for i in v] for s, v in load_flickr8k_csv(root, n_dev=3, n_test=1).items()} == \
        md5_split(CSV_CAPTIONS, 3, 1)


def test_csv_hash_split_does_not_depend_on_row_order(tmp_path):
    forward = write_csv_dataset(tmp_path / "a")
    backward = write_csv_dataset(tmp_path / "b", dict(reversed(CSV_CAPTIONS.items())))
    ids = lambda corpus: {s: [i.image_id for i in v] for s, v in corpus.items()}
    assert ids(load_flickr8k_csv(forward, n_dev=3, n_test=3)) == ids(load_flickr8k_csv(backward, n_dev=3, n_test=3))


def test_csv_uses_the_official_split_files_when_present(tmp_path):
    root = write_csv_dataset(tmp_path / "f8k")
    names = list(CSV_CAPTIONS)
    # a split unlike the hash split, listed out of name order, with blank lines and a trailing space
    official = {"train": names[4:][::-1], "dev": [names[0], names[3]], "test": [names[2], names[1]]}
    assert official != md5_split(names, 2, 2)
    for split, file in SPLIT_FILES.items():
        (root / file).write_text("\n".join(official[split]) + " \n\n")
    corpus = load_flickr8k_csv(root)
    assert {s: [i.image_id for i in v] for s, v in corpus.items()} == official  # in the files' order
    assert corpus["dev"][1].captions == CSV_CAPTIONS[names[3]]
    (root / SPLIT_FILES["test"]).unlink()  # only the lists that exist are used: no hash-split test set appears
    assert {s: len(v) for s, v in load_flickr8k_csv(root).items()} == {"train": 6, "dev": 2}


def test_csv_split_file_errors_name_the_list_and_line(tmp_path):
    root = write_csv_dataset(tmp_path / "f8k")
    names = list(CSV_CAPTIONS)
    (root / SPLIT_FILES["train"]).write_text("\n".join(names[:5]) + "\n")
    (root / SPLIT_FILES["dev"]).write_text(f"{names[5]}\nnot_in_captions.jpg\n")
    with pytest.raises(DatasetFormatError, match=r"Flickr_8k\.devImages\.txt:2: image not_in_captions\.jpg has no captions"):
        load_flickr8k_csv(root)
    (root / SPLIT_FILES["dev"]).write_text(f"{names[5]}\n")
    (root / "Images" / names[3]).unlink()
    with pytest.raises(ImageLoadError, match=rf"Flickr_8k\.trainImages\.txt:4: image file not found: .*{names[3]}"):
        load_flickr8k_csv(root)


@pytest.mark.parametrize("bad_content, line, message", [
    ("filename,text\na.jpg,A dog .\n", 1, r"expected the header 'image,caption'"),
    ("", 1, r"expected the header 'image,caption'"),
    ('image,caption\na.jpg,A dog .\nb.jpg,"A cat , sitting .",extra\n', 3, r"expected 2 columns"),
    ("image,caption\na.jpg,A dog .\n\nb.jpg\n", 4, r"expected 2 columns"),
    ('image,caption\na.jpg,A dog .\na.jpg,A dog runs .\nb.jpg," "\n', 4, r"empty caption"),
    ("image,caption\na.jpg,A dog .\nb.jpg,\n", 3, r"empty caption"),
    ("image,caption\n,A dog .\n", 2, r"expected 2 columns"),
])
def test_csv_format_errors_name_the_file_and_line(tmp_path, bad_content, line, message):
    (tmp_path / "Images").mkdir()
    (tmp_path / "captions.txt").write_text(bad_content, encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=rf"captions\.txt:{line}: {message}") as error:
        load_flickr8k_csv(tmp_path)
    assert str(tmp_path / "captions.txt") in str(error.value)


def test_csv_missing_file_and_load_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions.txt"):
        load_flickr8k_csv(tmp_path)
    root = write_csv_dataset(tmp_path / "f8k")
    assert {s: len(v) for s, v in load_corpus("flickr8k_csv", root, n_dev=1, n_test=1).items()} == \
        {"train": 8, "dev": 1, "test": 1}

# ---------------------------------------------------------------------------------------------- Karpathy JSON


def karpathy_entry(filename, split, sentences, filepath=None, **extra):
    entry = {"filename": filename, "split": split, "sentences": sentences, "imgid": 0, "sentids": [], **extra}
    if filepath is not None: entry["filepath"] = filepath
    return entry


def raw(text): return {"raw": text, "tokens": text.lower().strip(" .").split(), "imgid": 0, "sentid": 0}
def tokens_only(text): return {"tokens": text.split(), "imgid": 0, "sentid": 0}


def write_karpathy(tmp_path, entries) -> tuple[Path, Path]:
    "A `dataset_flickr8k.json`-style file, and every image it names under `images/<filepath>/<filename>`."
    images_root = tmp_path / "images"
    for k, entry in enumerate(entries):
        path = images_root / entry.get("filepath", "") / entry["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (5, 4), (0, 30 * k, 0)).save(path)
    json_path = tmp_path / "dataset_flickr8k.json"
    json_path.write_text(json.dumps({"dataset": "flickr8k", "images": entries}), encoding="utf-8")
    return json_path, images_root


KARPATHY_ENTRIES = [
    karpathy_entry("t1.jpg", "train", [raw("A dog runs ."), raw("A brown dog, running fast!")]),
    karpathy_entry("r1.jpg", "restval", [raw("Two kids play ."), tokens_only("two children playing")],
                   filepath="val2014"),
    karpathy_entry("v1.jpg", "val", [tokens_only("a man rides a bike"), raw("A man on a bike .")]),
    karpathy_entry("t2.jpg", "train", [raw("A cat sleeps .")], filepath="train2014"),
    karpathy_entry("e1.jpg", "test", [raw("A red car .")], filepath="val2014"),
    karpathy_entry("r2.jpg", "restval", [raw("A bird flies .")]),
]


def test_karpathy_splits_filepaths_and_sentences(tmp_path):
    json_path, images_root = write_karpathy(tmp_path, KARPATHY_ENTRIES)
    corpus = load_karpathy(json_path, images_root)
    # restval joins train (in file order); val is the dev split
    assert {s: [i.image_id for i in v] for s, v in corpus.items()} == \
        {"train": ["t1.jpg", "r1.jpg", "t2.jpg", "r2.jpg"], "dev": ["v1.jpg"], "test": ["e1.jpg"]}
    items = {i.image_id: i for v in corpus.values() for i in v}
    assert items["t1.jpg"].captions == ["A dog runs .", "A brown dog, running fast!"]  # `raw` wins over `tokens`
    assert items["r1.jpg"].captions == ["Two kids play .", "two children playing"]  # tokens-only: joined by spaces
    assert items["v1.jpg"].captions == ["a man rides a bike", "A man on a bike ."]
    assert items["r1.jpg"].path == images_root / "val2014" / "r1.jpg"  # images_root / filepath / filename
    assert items["t2.jpg"].path == images_root / "train2014" / "t2.jpg"
    assert items["t1.jpg"].path == images_root / "t1.jpg"  # no filepath: directly under images_root
    red, green, blue = items["e1.jpg"].load().getpixel((0, 0))  # the fifth entry's own image (JPEG: about 0, 120, 0)
    assert red < 5 and abs(green - 120) < 5 and blue < 5


def test_karpathy_leaves_out_empty_splits_and_load_corpus_finds_images_beside_the_json(tmp_path):
    entries = [karpathy_entry("a.jpg", "restval", [raw("A dog .")]), karpathy_entry("b.jpg", "val", [raw("A cat .")])]
    json_path, images_root = write_karpathy(tmp_path, entries)
    assert {s: len(v) for s, v in load_karpathy(json_path, images_root).items()} == {"train": 1, "dev": 1}
    images_root.rename(tmp_path / "Images")  # load_corpus's default images_root: `Images` beside the JSON
    assert [i.path for i in load_corpus("karpathy", json_path)["dev"]] == [tmp_path / "Images" / "b.jpg"]


@pytest.mark.parametrize("content, message", [
    ('{"images": [', r"dataset_flickr8k\.json: not valid JSON"),
    ('[{"filename": "a.jpg"}]', r"dataset_flickr8k\.json: expected an object with an 'images' list"),
    ('{"annotations": []}', r"dataset_flickr8k\.json: expected an object with an 'images' list"),
])
def test_karpathy_malformed_file(tmp_path, content, message):
    json_path = tmp_path / "dataset_flickr8k.json"
    json_path.write_text(content)
    with pytest.raises(DatasetFormatError, match=message):
        load_karpathy(json_path, tmp_path)


@pytest.mark.parametrize("bad_entry, message", [
    ({"filename": "x.jpg", "split": "train"}, r"images\[2\]: needs 'filename', 'split' and 'sentences'"),
    ({"split": "train", "sentences": [raw("A dog .")]}, r"images\[2\]: needs 'filename', 'split' and 'sentences'"),
    ("x.jpg", r"images\[2\]: needs 'filename', 'split' and 'sentences'"),
    ({"filename": "x.jpg", "split": "valid", "sentences": [raw("A dog .")]}, r"images\[2\]: unknown split 'valid'"),
    ({"filename": "x.jpg", "split": "train", "sentences": [raw("A dog ."), {"raw": "  ", "tokens": []}]},
     r"images\[2\] \(x\.jpg\): empty caption"),
    ({"filename": "x.jpg", "split": "test", "sentences": [tokens_only("")]}, r"images\[2\] \(x\.jpg\): empty caption"),
])
def test_karpathy_malformed_entry_names_the_file_and_entry(tmp_path, bad_entry, message):
    json_path, images_root = write_karpathy(tmp_path, KARPATHY_ENTRIES[:2])
    Image.new("RGB", (4, 4)).save(images_root / "x.jpg")
    data = json.loads(json_path.read_text())
    data["images"].append(bad_entry)
    json_path.write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match=message) as error:
        load_karpathy(json_path, images_root)
    assert str(json_path) in str(error.value)


def test_karpathy_missing_image_and_missing_file(tmp_path):
    json_path, images_root = write_karpathy(tmp_path, KARPATHY_ENTRIES)
    (images_root / "val2014" / "e1.jpg").unlink()
    with pytest.raises(ImageLoadError, match=r"images\[4\]: image file not found: .*val2014/e1\.jpg"):
        load_karpathy(json_path, images_root)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_karpathy(tmp_path / "nowhere.json", images_root)

# ---------------------------------------------------------------------------------------------- Hugging Face hub, offline

# With HF_HUB_OFFLINE=1, datasets 5.x resolves a hub name without asking huggingface_hub for any file:
# dataset_module_factory raises OfflineModeIsEnabled at once and falls back to CachedDatasetModuleFactory, which reads
# only the Arrow files that an earlier (online) load_dataset prepared under $HF_DATASETS_CACHE/<user>___<name>/. The
# repository's files in the hub cache ($HF_HOME/hub/datasets--<user>--<name>/snapshots/<commit>/) are not read.
# So the test lays out both, as one online load leaves them, and checks that a repository only in the hub cache fails.
REPO, COMMIT = "someuser/tiny-captions", "3f5c7d1e9a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d"
SNAPSHOT_ONLY_REPO = "someuser/downloaded-only"
# (image_id, value of the `split` column, captions): one hub split ("train") holding rows of three splits, mixed up,
# as datasets like nlphuji/flickr30k ship them
HUB_ROWS = [("img-0", "train", ["A dog runs .", "A brown dog"]), ("img-1", "val", ["A cat , sitting ."]),
            ("img-2", "test", ["Two kids play .", "Children playing", "Kids"]), ("img-3", "train", ["A red car ."]),
            ("img-4", "val", ["A bird flies ."]), ("img-5", "train", ["A man rides a bike ."])]


def hub_image(k: int) -> Image.Image: return Image.new("RGB", (6 + k, 5), (40 * k, 10, 200))


def write_hub_snapshot(hf_home: Path, repo: str, commit: str, parquet: bytes) -> Path:
    "The files of a dataset repository in the Hugging Face cache as huggingface_hub writes them; returns the snapshot."
    repo_dir = hf_home / "hub" / f"datasets--{repo.replace('/', '--')}"
    blob = repo_dir / "blobs" / hashlib.sha256(parquet).hexdigest()  # an LFS file's blob is named by its SHA-256
    blob.parent.mkdir(parents=True)
    blob.write_bytes(parquet)
    snapshot = repo_dir / "snapshots" / commit
    (snapshot / "data").mkdir(parents=True)
    os.symlink(os.path.relpath(blob, snapshot / "data"), snapshot / "data" / "train-00000-of-00001.parquet")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def prepare_dataset_cache(monkeypatch, snapshot: Path, repo: str, commit: str, datasets_cache: Path) -> Path:
    """What the first, online `load_dataset(repo)` leaves in `datasets`' cache: Arrow files and dataset_info.json,
    written by datasets' own Parquet builder from the snapshot's data files (there is no hub to ask for them here)."""
    import datasets
    import datasets.load

    name = repo.split("/")[1]

    def hub_module(path, **kwargs):  # HubDatasetModuleFactory's result, with the data files read from the snapshot
        assert path == repo
        module = datasets.load.LocalDatasetModuleFactory(str(snapshot)).get_module()
        return dataclasses.replace(module, hash=commit, builder_kwargs={"base_path": str(snapshot), "dataset_name": name})

    with monkeypatch.context() as patch:
        patch.setattr(datasets.load, "dataset_module_factory", hub_module)
        datasets.load_dataset(repo, cache_dir=str(datasets_cache))
    # online the builder is also given repo_id, which names its folder <user>___<name>; with repo_id it insists on
    # hf:// data-file URLs, which cannot be resolved offline, so here the folder it wrote is given that name instead
    written = datasets_cache / name
    assert sorted(p.name for p in (written / "default" / "0.0.0" / commit).iterdir()) == \
        ["dataset_info.json", f"{name}-train.arrow"]
    target = datasets_cache / repo.replace("/", "___")
    written.rename(target)
    return target


# Runs in a fresh interpreter, so that huggingface_hub and datasets read HF_HOME and HF_HUB_OFFLINE at import time
OFFLINE_LOAD = textwrap.dedent("""
    import json, sys
    from huggingface_hub import constants, hf_hub_download
    import datasets.config
    from captioning.data import DatasetUnavailable, load_hf
    print(json.dumps({"hub_offline": constants.HF_HUB_OFFLINE, "datasets_offline": datasets.config.HF_HUB_OFFLINE,
                      "datasets_cache": str(datasets.config.HF_DATASETS_CACHE)}))
    # the snapshot is where the hub client finds a repository's files offline
    print(json.dumps({"hub_file": hf_hub_download(sys.argv[1], "data/train-00000-of-00001.parquet", repo_type="dataset")}))
    corpus = load_hf(sys.argv[1], split_column="split", id_column="image_id")
    print(json.dumps({"corpus": {split: [[item.image_id, item.captions, list(item.load().size),
                                          list(item.load().getpixel((0, 0)))] for item in items]
                                 for split, items in corpus.items()}}))
    try:
        load_hf(sys.argv[2], split_column="split", id_column="image_id")
        print(json.dumps({"snapshot_only": "loaded"}))
    except DatasetUnavailable as error:
        print(json.dumps({"snapshot_only": str(error)}))
""")


def test_load_hf_reads_a_cached_hub_dataset_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    hf_home = tmp_path / "hf"
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.List(datasets.Value("string")),
                                  "split": datasets.Value("string"), "image_id": datasets.Value("string")})
    table = datasets.Dataset.from_dict(
        {"image": [hub_image(k) for k in range(len(HUB_ROWS))], "caption": [r[2] for r in HUB_ROWS],
         "split": [r[1] for r in HUB_ROWS], "image_id": [r[0] for r in HUB_ROWS]}, features=features)
    table.to_parquet(str(tmp_path / "train.parquet"))  # as push_to_hub writes it: PNG bytes and the features inside
    parquet = (tmp_path / "train.parquet").read_bytes()
    snapshot = write_hub_snapshot(hf_home, REPO, COMMIT, parquet)
    write_hub_snapshot(hf_home, SNAPSHOT_ONLY_REPO, "0" * 40, parquet)  # fetched with huggingface_hub, never loaded
    prepare_dataset_cache(monkeypatch, snapshot, REPO, COMMIT, hf_home / "datasets")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", OFFLINE_LOAD, REPO, SNAPSHOT_ONLY_REPO], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"): out.update(json.loads(line))
    assert out["hub_offline"] is True and out["datasets_offline"] is True
    assert out["datasets_cache"] == str(hf_home / "datasets")
    assert Path(out["hub_file"]) == snapshot / "data" / "train-00000-of-00001.parquet"

    # split_column regroups the one hub split by the `split` column; `val` is renamed dev; ids from id_column
    expected = {}
    for k, (image_id, split, captions) in enumerate(HUB_ROWS):
        image = hub_image(k)
        expected.setdefault({"val": "dev"}.get(split, split), []).append(
            [image_id, captions, list(image.size), list(image.getpixel((0, 0)))])
    assert out["corpus"] == expected
    assert list(out["corpus"]) == ["test", "train", "dev"]  # the split values in sorted order: test, train, val

    # datasets reads only its own Arrow cache offline: a repository that is only in the hub cache is unavailable,
    # and load_hf says so with its advice instead of failing with datasets' ConnectionError
    message = out["snapshot_only"]
    assert message.startswith(f"could not load the Hugging Face dataset '{SNAPSHOT_ONLY_REPO}'")
    assert "OfflineModeIsEnabled" in message and "HF_HUB_OFFLINE=1" in message and "synthetic" in message


def test_load_hf_items_are_captioned_images(tmp_path):
    "In-process, the imagefolder builder with a `split` column: the same regrouping, on PIL images from the files."
    pytest.importorskip("datasets")
    from captioning.data import load_hf
    folder = tmp_path / "train"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for k, (image_id, split, captions) in enumerate(HUB_ROWS):
            hub_image(k).save(folder / f"{image_id}.png")
            f.write(json.dumps({"file_name": f"{image_id}.png", "caption": captions, "split": split,
                                "image_id": image_id}) + "\n")
    corpus = load_hf("imagefolder", data_dir=tmp_path, split_column="split", id_column="image_id",
                     split_names={"val": "validation"})
    assert sorted(corpus) == ["test", "train", "validation"]  # split_names replaces the default mapping
    assert [i.image_id for i in corpus["train"]] == ["img-0", "img-3", "img-5"]
    item = corpus["test"][0]
    assert isinstance(item, CaptionedImage) and item.captions == HUB_ROWS[2][2] and item.path is None
    assert item.load().size == (8, 5) and item.load().getpixel((0, 0)) == (80, 10, 200)
    without_ids = load_hf("imagefolder", data_dir=tmp_path, split_column="split")
    assert [i.image_id for i in without_ids["dev"]] == ["imagefolder:val-000000", "imagefolder:val-000001"]
