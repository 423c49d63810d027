"""Issue #16: what went wrong with run folders, exports and data files, one test per failure, each reproduced here.

Most tests copy one tiny `captioning train` run (conftest.py's `tiny_run`, trained once per session) and run the
command in-process with `captioning.cli.main`; a subprocess only where another process is the point."""
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioning.cli import main
from captioning.data import DatasetFormatError, load_flickr8k, write_fake_flickr8k
from captioning.files import CheckpointError, FolderLock, StorageError
from captioning.model import CaptionModel
from captioning.training import TrainConfig, TrainingFailed, fit

from conftest import TINY_TRAIN

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py: two threads crawl on two shared cores


def one_line(text: str) -> str:
    "The one line of `text` (a message must not spill a traceback or a second line)."
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def snapshot(folder: Path) -> dict:
    "Every file under `folder` (but the lock file, whose text names its last holder) and its bytes."
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def temporaries(*folders: Path) -> list[Path]:
    "Temporary files and folders that an interrupted write would leave behind."
    return [p for folder in folders if folder.exists() for p in folder.rglob(".*") if ".tmp" in p.name]


def tiny_fit_setup(seed=0):
    "A tiny attention model on random features: `fit` in a fraction of a second."
    from captioning.data import CaptionDataset, ImageDataset
    from captioning.decoder import DecoderConfig, build_decoder
    from captioning.encoder import build_encoder
    from captioning.synthetic import synthetic_corpus
    from captioning.vocabulary import Vocabulary
    torch.manual_seed(seed)
    items = synthetic_corpus(n_train=16, n_dev=4, n_test=0, seed=2)
    g = torch.Generator().manual_seed(0)
    features = [(torch.randn(16, generator=g), torch.randn(4, 16, generator=g)) for _ in range(20)]
    vocab = Vocabulary.build([c for i in items["train"] for c in i.captions], min_freq=1)
    decoder = build_decoder(DecoderConfig(len(vocab), 16, kind="attention", embed_dim=16, hidden_dim=24, attention_dim=8))
    model = CaptionModel(build_encoder("tiny", pretrained=False), decoder, vocab)
    return model, vocab, CaptionDataset(items["train"], vocab, features=features[:16]), ImageDataset(items["dev"], features=features[16:])


FIT = TrainConfig(epochs=1, batch_size=8, warmup_steps=1, precision="fp32")


def tiny_fit(run_dir, config=FIT, **kwargs):
    model, vocab, train, dev = tiny_fit_setup()
    return fit(model, vocab, train, dev, config, run_dir, progress=False, verbose=False, **kwargs)


# (1) A hostile checkpoint.pt must not run code when a run resumes from it.

class Hostile:
    "Unpickling this creates the file `marker`: a stand-in for any code a malicious pickle could run."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (open, (self.marker, "w"))


def write_hostile(path: Path, marker: Path) -> None:
    torch.save({"format": "captioning.checkpoint", "version": 2, "model": {}, "payload": Hostile(marker)}, path)
    copy = path.with_name("proof.pt")  # the file is really hostile: loading it the old way runs its code
    shutil.copy(path, copy)
    torch.load(copy, weights_only=False)
    assert marker.exists()
    marker.unlink(); copy.unlink()


def test_1_a_hostile_checkpoint_is_refused_by_the_command_without_running_it(tiny_run, tmp_path, capsys):
    run, cache = tiny_run.copy(tmp_path)
    marker = tmp_path / "pwned"
    write_hostile(run / "checkpoint.pt", marker)
    assert main(tiny_run.args(run, cache)) == 2
    line = one_line(capsys.readouterr().err)
    assert "refusing to load checkpoint" in line and str(run / "checkpoint.pt") in line and "--restart" in line
    assert not marker.exists()


@pytest.mark.parametrize("name", ["checkpoint.pt", "best.pt"])
def test_1_a_hostile_checkpoint_is_refused_by_fit_without_running_it(name, tmp_path):
    tiny_fit(tmp_path / "run")  # a finished run: resuming it loads checkpoint.pt, then best.pt
    marker = tmp_path / "pwned"
    write_hostile(tmp_path / "run" / name, marker)
    with pytest.raises(CheckpointError, match=rf"refusing to load .*{name}") as refused:
        tiny_fit(tmp_path / "run")
    assert "\n" not in str(refused.value) and not marker.exists()


# (2) A run folder holds one run: other data is refused, --restart starts afresh, a longer budget resumes.

@pytest.mark.parametrize("flag, value, change", [("--n-train", "13", "--n-train 12 -> 13"),
                                                 ("--image-size", "64", "--image-size None -> 64"),
                                                 ("--min-freq", "2", "--min-freq 1 -> 2")])
def test_2_changing_a_data_flag_of_a_run_is_refused_before_any_work(flag, value, change, tiny_run, tmp_path, capsys):
    run, cache = tiny_run.copy(tmp_path)
    before, cached = snapshot(run), sorted(p.name for p in cache.iterdir())
    assert main(tiny_run.args(run, cache, flag, value)) == 2
    line = one_line(capsys.readouterr().err)
    assert change in line and "--restart" in line
    assert snapshot(run) == before and sorted(p.name for p in cache.iterdir()) == cached  # nothing written, nothing extracted


def test_2_restart_trains_afresh_and_a_longer_budget_resumes(tiny_run, tmp_path, capsys):
    run, cache = tiny_run.copy(tmp_path)
    first = json.loads((run / "history.json").read_text())
    assert main(tiny_run.args(run, cache, "--epochs", "2")) == 0  # only the budget changed: the same run goes on
    assert "resumed at epoch 1" in capsys.readouterr().out
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 2 and history[0] == first[0]
    assert json.loads((run / "run.json").read_text())["cross_entropy"]["epochs"] == 2
    assert main(tiny_run.args(run, cache, "--min-freq", "10", "--restart")) == 0
    assert "resumed" not in capsys.readouterr().out
    assert len(json.loads((run / "history.json").read_text())) == 1  # epoch 1 of a new run
    assert json.loads((run / "run.json").read_text())["data"]["min_freq"] == 10
    vocab = json.loads((run / "export" / "vocab.json").read_text())
    assert vocab["min_freq"] == 10 and len(vocab["words"]) < len(json.loads((tiny_run.run / "export" / "vocab.json").read_text())["words"])


# (3) Two trainings into one folder: the second is refused while the first holds it; a killed holder does not block.

HOLD_LOCK = "import sys, time; from captioning.files import FolderLock; FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)"


def test_3_a_folder_in_use_is_refused_naming_its_holder_and_a_killed_holder_does_not_block(tiny_run, tmp_path, capsys):
    run, cache = tiny_run.copy(tmp_path)
    before = snapshot(run)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(tiny_run.args(run, cache)) == 2
        line = one_line(capsys.readouterr().err)
        assert "in use by another process" in line and f"process {holder.pid} on " in line
        assert snapshot(run) == before
    finally:
        holder.kill()  # SIGKILL: no chance to clean up; its .lock file stays behind
        holder.wait()
    assert (run / ".lock").exists()
    assert main(tiny_run.args(run, cache)) == 0  # the finished run is resumed (nothing left to train) and exported again
    with FolderLock(run):  # and the lock is free again afterwards
        pass


# (4) Impossible values are refused before any work; a diverging run fails and exports nothing.

@pytest.mark.parametrize("flag, value", [("--patience", "0"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1")])
def test_4_an_impossible_training_value_is_refused_before_any_work(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["train", *TINY_TRAIN, flag, value, "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "run")])
    assert refused.value.code == 2 and f"argument {flag}: must be" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_4_a_diverging_run_fails_and_writes_no_export(tiny_run, tmp_path, capsys):
    _, cache = tiny_run.copy(tmp_path)
    run = tmp_path / "diverging"
    assert main(tiny_run.args(run, cache, "--lr", "1e30", "--batch-size", "8")) == 1
    line = one_line(capsys.readouterr().err)
    assert "training diverged" in line and "Lower the learning rate" in line
    assert not (run / "export").exists() and not (run / "checkpoint.pt").exists()
    with pytest.raises(TrainingFailed, match="the loss became (nan|inf)"):
        tiny_fit(tmp_path / "fit", TrainConfig(epochs=2, batch_size=4, warmup_steps=0, lr=1e30, precision="fp32"))


# (5) A feature cache re-extracts an image whose file changed under the same name, and only that one.

def test_5_a_changed_image_file_is_extracted_again_and_the_others_are_not(tmp_path, monkeypatch):
    import numpy as np
    import captioning.encoder
    from captioning.encoder import build_encoder, extract_features
    corpus = load_flickr8k(write_fake_flickr8k(tmp_path / "f8k", n_images=6))
    items = [item for split in corpus.values() for item in split]
    encoder = build_encoder("tiny", pretrained=False)
    encoded, original = [], captioning.encoder._encoded_batches
    monkeypatch.setattr(captioning.encoder, "_encoded_batches",
                        lambda encoder, images, *args: (encoded.extend(i.image_id for i in images), original(encoder, images, *args))[1])
    first = extract_features(encoder, items, tmp_path / "cache", bf16=False, verbose=False)
    before = np.array(first.global_features), np.array(first.region_features)
    assert encoded == [i.image_id for i in items]
    changed = items[2]
    Image.new("RGB", (64, 48), "white").save(changed.path)  # another picture under the same name
    stat = changed.path.stat()
    os.utime(changed.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    encoded.clear()
    store = extract_features(encoder, items, tmp_path / "cache", bf16=False, verbose=False)
    assert encoded == [changed.image_id]  # only the changed file
    fresh = extract_features(encoder, [changed], tmp_path / "fresh", bf16=False, verbose=False)
    assert np.allclose(store.global_features[2], fresh.global_features[0], atol=1e-5)
    assert not np.allclose(store.global_features[2], before[0][2], atol=1e-3)
    others = [k for k in range(len(items)) if k != 2]
    assert np.array_equal(np.array(store.global_features)[others], before[0][others])
    assert np.array_equal(np.array(store.region_features)[others], before[1][others])
    encoded.clear()
    extract_features(encoder, items, tmp_path / "cache", bf16=False, verbose=False)
    assert encoded == []  # the cache now knows the new file


# (6) A full disk: one line saying so, no temporary files left.

class _FillingFile(io.RawIOBase):
    "A raw file on a disk with `disk.room - disk.used` bytes left: a write past them fails with ENOSPC, as write(2) does."

    def __init__(self, raw, path, disk):
        self.raw, self.path, self.disk = raw, str(path), disk

    def writable(self): return True
    def seekable(self): return self.raw.seekable()
    def seek(self, *args): return self.raw.seek(*args)
    def tell(self): return self.raw.tell()
    def fileno(self): return self.raw.fileno()

    def write(self, data):
        left = self.disk.room - self.disk.used
        if left <= 0:
            self.disk.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        written = self.raw.write(bytes(memoryview(data)[:left]))  # what fits: a short write, as the OS does
        self.disk.used += written
        return written

    def close(self):
        if not self.closed: self.raw.close()
        super().close()


class FullDisk:
    """A disk filling up under the files the package writes (atomic writes in captioning.files, feature arrays in
    captioning.encoder): files whose names match `pattern` share `room` bytes, written through a BufferedWriter, so
    that a write or a flush past them fails with ENOSPC as on a real full disk. Other files are written normally."""

    def __init__(self, monkeypatch, pattern: str = "*", room: int = 0):
        import captioning.encoder
        import captioning.files
        self.pattern, self.room, self.used, self.failures, self.names = pattern, room, 0, 0, {}
        disk = self

        class TempfileModule:  # captioning.files' `tempfile`: mkstemp tells us the name of each temporary file
            def __getattr__(self, name): return getattr(tempfile, name)

            def mkstemp(self, *args, **kwargs):
                fd, path = tempfile.mkstemp(*args, **kwargs)
                disk.names[fd] = path
                return fd, path

        class OsModule:  # captioning.files' `os`: a temporary file opened for writing lives on this disk
            def __getattr__(self, name): return getattr(os, name)

            def fdopen(self, fd, mode="r", *args, **kwargs):
                path = disk.names.pop(fd, None)
                if path is None or "w" not in mode: return os.fdopen(fd, mode, *args, **kwargs)
                return disk.file(io.FileIO(fd, "wb", closefd=True), path)

        def open_for_encoder(path, mode="r", *args, **kwargs):  # captioning.encoder's `open`: the .npy arrays
            if "w" not in mode: return open(path, mode, *args, **kwargs)
            return disk.file(io.FileIO(path, "wb"), path)

        monkeypatch.setattr(captioning.files, "tempfile", TempfileModule())
        monkeypatch.setattr(captioning.files, "os", OsModule())
        monkeypatch.setattr(captioning.encoder, "open", open_for_encoder, raising=False)

    def file(self, raw, path):
        if not fnmatch(Path(path).name, self.pattern): return io.BufferedWriter(raw)
        return io.BufferedWriter(_FillingFile(raw, path, self))


def assert_disk_full_message(error: BaseException, path_part: str) -> None:
    assert isinstance(error, StorageError), f"{type(error).__name__}: {error}"
    assert "no space left on the device" in str(error) and path_part in str(error) and "\n" not in str(error)



@pytest.mark.parametrize("what, room", [
    pytest.param("features", 0),
    pytest.param("features", 20_000),
    ("checkpoint", 0),
    pytest.param("checkpoint", 64_000),
    ("history", 0),
    ("export", 0),
    ("export", 64_000)])
def test_6_a_full_disk_gives_one_line_and_leaves_no_temporary_files(what, room, tmp_path, monkeypatch):
    "`room`: the bytes that still fit (0: the disk is full from the start; else it fills part way through the file)."
    from captioning.encoder import build_encoder, extract_features
    from captioning.synthetic import synthetic_corpus
    pattern = {"features": "*.npy", "checkpoint": ".checkpoint.pt.*", "history": ".history.json.*",
               "export": ".model.safetensors.*"}[what]
    disk = FullDisk(monkeypatch, pattern, room)
    with pytest.raises(Exception) as failed:
        if what == "features":
            items = synthetic_corpus(24, 0, 0, seed=1)["train"]
            extract_features(build_encoder("tiny", pretrained=False), items, tmp_path / "cache", batch_size=4, verbose=False)
        elif what == "export":
            model, *_ = tiny_fit_setup()
            model.save_pretrained(tmp_path / "export")
        else:
            tiny_fit(tmp_path / "run")
    assert disk.failures
    assert_disk_full_message(failed.value, {"features": "cache", "export": "model.safetensors"}.get(what, what))
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("what, room", [
    pytest.param("features", 0),
    ("features", 4096),  # the .npy header is written, then the first block fills the disk: nothing is left buffered
    pytest.param("checkpoint", 4096),
    ("history", 0),  # history.json is smaller than 4 kB
    ("export", 4096)])
def test_6_a_full_disk_stops_the_command_with_one_line(what, room, tiny_run, tmp_path, monkeypatch, capsys):
    run, cache = tiny_run.copy(tmp_path)
    if what == "features": shutil.rmtree(cache)  # extraction starts afresh
    extra = ["--epochs", "2"] if what in ("checkpoint", "history") else []  # one more epoch writes both
    pattern = {"features": "*.npy", "checkpoint": ".checkpoint.pt.*", "history": ".history.json.*", "export": ".model.safetensors.*"}
    disk = FullDisk(monkeypatch, pattern[what], room)
    assert main(tiny_run.args(run, cache, *extra)) == 2
    assert disk.failures
    line = one_line(capsys.readouterr().err)
    assert line.startswith("captioning train: error: ") and "no space left on the device" in line
    assert temporaries(run, cache) == []


def test_6_a_failed_export_leaves_the_previous_export_loadable(tiny_run, tmp_path, monkeypatch):
    run, cache = tiny_run.copy(tmp_path)
    FullDisk(monkeypatch, ".model.safetensors.*", room=0)
    assert main(tiny_run.args(run, cache)) == 2  # resumes the finished run, then fails to export it again
    monkeypatch.undo()
    CaptionModel.from_pretrained(run / "export")  # "files written earlier are intact", says the message


def test_6_a_temporary_file_left_by_a_killed_write_is_removed_by_the_next_fit(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    left = run / ".checkpoint.pt.k1ll3d.tmp"
    left.write_bytes(b"half a checkpoint")
    tiny_fit(run)
    assert not left.exists() and temporaries(run) == []
    assert sorted(p.name for p in run.iterdir()) == [".lock", "best.pt", "checkpoint.pt", "history.json"]


# (7) Damaged files: one clear error that names the file.

def _truncate(path: Path): path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _corrupt(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))


def _edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


DAMAGES = {  # what is done to an export -> the file the error must name, and what it must say
    "truncated weights": (lambda f: _truncate(f / "model.safetensors"), "model.safetensors", "SHA-256 differs"),
    "truncated weights, no checksum": (lambda f: (_truncate(f / "model.safetensors"), _edit_config(f, lambda c: c.pop("sha256"))),
                                       "model.safetensors", "damaged (truncated or corrupt)"),
    "corrupted weights": (lambda f: _corrupt(f / "model.safetensors"), "model.safetensors", "SHA-256 differs"),
    "config without decoder": (lambda f: _edit_config(f, lambda c: c.pop("decoder")), "config.json", "lacks 'decoder'"),
    "beam size 'three'": (lambda f: _edit_config(f, lambda c: c["generation"].update(beam_size="three")), "config.json",
                          "generation: beam_size must be an integer"),
    "invalid JSON": (lambda f: (f / "config.json").write_text('{"format": "captioning.export", '), "config.json", "not valid JSON"),
    "config not UTF-8": (lambda f: (f / "config.json").write_bytes(b'{"format": "caf\xe9"}'), "config.json", "not UTF-8"),
    "missing vocabulary": (lambda f: (f / "vocab.json").unlink(), "vocab.json", "missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_7_a_damaged_export_gives_one_error_naming_the_file(damage, tiny_export, tmp_path, capsys):
    folder = tmp_path / "export"
    shutil.copytree(tiny_export.folder, folder)
    do, name, says = DAMAGES[damage]
    do(folder)
    with pytest.raises(CheckpointError) as refused:
        CaptionModel.from_pretrained(folder)
    message = str(refused.value)
    assert name in message and says in message and "\n" not in message
    tiny_export.images[0].save(tmp_path / "a.png")
    assert main(["caption", "--model", str(folder), str(tmp_path / "a.png")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("captioning caption: error: ") and name in line


def test_7_a_truncated_best_or_a_checkpoint_without_its_record_is_named(tmp_path):
    tiny_fit(tmp_path / "run")
    shutil.copytree(tmp_path / "run", tmp_path / "other")
    _truncate(tmp_path / "run" / "best.pt")
    with pytest.raises(CheckpointError, match=r"best weights .*best\.pt is damaged \(truncated or corrupt\)"):
        tiny_fit(tmp_path / "run")
    _drop_record(tmp_path / "other" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"other.checkpoint\.pt is a checkpoint of another version or incomplete"):
        tiny_fit(tmp_path / "other")


def _drop_record(path: Path):
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["record"]
    torch.save(checkpoint, path)


@pytest.mark.parametrize("name, damage, says", [("best.pt", _truncate, "is damaged (truncated or corrupt)"),
                                                ("checkpoint.pt", _drop_record, "another version or incomplete")],
                         ids=["truncated best.pt", "checkpoint without its record"])
def test_7_a_damaged_checkpoint_stops_the_command_with_one_line(name, damage, says, tiny_run, tmp_path, capsys):
    run, cache = tiny_run.copy(tmp_path)
    damage(run / name)
    assert main(tiny_run.args(run, cache)) == 2
    line = one_line(capsys.readouterr().err)
    assert str(run / name) in line and says in line


def test_7_caption_skips_decompression_bombs_and_folders_and_captions_the_rest(tiny_export, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # the good images have 128 x 128 = 16,384 pixels
    good = [tmp_path / "good1.png", tmp_path / "good2.png"]
    for path, image in zip(good, tiny_export.images): image.save(path)
    Image.new("L", (300, 300)).save(tmp_path / "bomb.png")  # 90,000 pixels: over the limit (Pillow warns)
    Image.new("L", (400, 400)).save(tmp_path / "bigger_bomb.png")  # 160,000: over twice the limit (Pillow refuses)
    (tmp_path / "a_folder").mkdir()
    paths = [good[0], tmp_path / "bomb.png", tmp_path / "a_folder", tmp_path / "bigger_bomb.png", good[1]]
    assert main(["caption", "--model", str(tiny_export.folder), *map(str, paths)]) == 1
    captured = capsys.readouterr()
    assert [line.split("\t")[0] for line in captured.out.splitlines()] == [str(p) for p in good]
    errors = [line for line in captured.err.splitlines() if ": error: " in line]
    assert len(errors) == 3
    assert str(tmp_path / "bomb.png") in errors[0] and "decompression bomb" in errors[0]
    assert "is a folder" in errors[1]
    assert str(tmp_path / "bigger_bomb.png") in errors[2] and "decompression bomb" in errors[2]


def test_7_a_token_file_that_is_not_utf8_is_named_and_a_byte_order_mark_is_harmless(tmp_path, capsys):
    root = write_fake_flickr8k(tmp_path / "latin1", n_images=6)
    token_file = root / "Flickr8k.token.txt"
    text = token_file.read_text().replace("A red picture number 1", "A red café picture")
    token_file.write_bytes(text.encode("latin-1"))
    with pytest.raises(DatasetFormatError, match=r"Flickr8k\.token\.txt is not UTF-8 text"):
        load_flickr8k(root)
    assert main(["data", "--dataset", "flickr8k", "--root", str(root), "--grid", str(tmp_path / "g.png")]) == 2
    assert str(token_file) in one_line(capsys.readouterr().err)
    root = write_fake_flickr8k(tmp_path / "bom", n_images=6)
    token_file = root / "Flickr8k.token.txt"
    token_file.write_bytes("\ufeff".encode("utf-8") + token_file.read_bytes())  # as Windows editors save UTF-8
    first = load_flickr8k(root)["train"][0]
    assert first.image_id == "1000_fake.jpg" and first.captions[0] == "A red picture number 0 ." and len(first.captions) == 5


# (8) Bad flags: exit 2 before any work, with a message in the flag's terms.

@pytest.mark.parametrize("command, flag, value", [
    ("caption", "--batch-size", "0"), ("caption", "--batch-size", "-1"), ("train", "--beam-size", "0"),
    ("train", "--self-critical-epochs", "-1"), ("train", "--self-critical-batch-size", "0"), ("train", "--epochs", "0"),
    ("train", "--seed", "-1"), ("train", "--image-size", "0"), ("train", "--fine-tune-blocks", "100")])
def test_8_a_bad_flag_is_refused_before_any_work_in_its_own_terms(command, flag, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default runs/ folder would be here
    args = ["caption", "image.png", flag, value] if command == "caption" else \
        ["train", *TINY_TRAIN, flag, value, "--output", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    try:
        code = main(args)
    except SystemExit as e:  # argparse refuses what its types refuse
        code = e.code
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse prints its usage first
    assert code == 2 and last.startswith(f"captioning {command}: error: ") and flag in last and value in last, last
    assert list(tmp_path.iterdir()) == []  # no run folder, no cache, no runs/


# (9) A newcomer: told what a synthetic model knows, a quiet log when redirected, and a --help that lists the options.

def test_9_captioning_with_a_synthetic_model_says_what_it_knows(tiny_run, tiny_export, tmp_path, capsys):
    tiny_export.images[0].save(tmp_path / "photo.png")
    assert main(["caption", "--model", str(tiny_run.run), str(tmp_path / "photo.png")]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{tmp_path / 'photo.png'}\t")
    assert "trained on the synthetic shapes" in one_line(captured.err) and "not photos" in captured.err


def test_9_a_redirected_training_log_has_no_progress_bars(tiny_run):
    "conftest's tiny_run trains with stdout and stderr redirected to a file, as `captioning train > log 2>&1` does."
    log = tiny_run.log.read_text()
    assert "epoch  1: loss" in log and "exported to" in log
    assert "%|" not in log and "\r" not in log and len(log) < 4000, log


def test_9_help_lists_each_commands_options(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    sections = {line.split()[0]: line for line in out.split("options of each command")[1].splitlines() if line.startswith("  ") and line.split()}
    assert {"train", "evaluate", "caption", "data"} <= set(sections)
    for option in ("--epochs", "--beam-size", "--recipe", "--restart", "--output", "--split", "--batch-size", "--grid"):
        assert option in out, option
