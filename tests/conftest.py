import shutil
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from captioning.data import find_flickr8k

# The smallest `captioning train` run that goes through every stage: 12 synthetic training images (60 captions,
# one step), 4 dev images, one epoch of the default recipe (synthetic-attention), no METEOR (it starts a Java VM).
TINY_TRAIN = ["--n-train", "12", "--n-dev", "4", "--epochs", "1", "--warmup-steps", "2", "--no-meteor"]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (tests/test_cuda.py; skipped with the reason without one)")


@pytest.fixture(scope="session")
def flickr8k_root():
    "The real Flickr8k folder, or skip: set CAPTIONING_FLICKR8K or put it at ../shared/data/flickr8k."
    root = find_flickr8k()
    if root is None:
        pytest.skip("real Flickr8k not found: set CAPTIONING_FLICKR8K or place it at ../shared/data/flickr8k")
    return root


@contextmanager
def torch_threads(n: int):
    "Run the block with `n` intra-op threads, then restore the number."
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try: yield
    finally: torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread than two, and the tests share the machine (modules opt in with `pytestmark`):
    on two busy cores a tiny `fit` took 6-10 s with two threads and 0.2 s with one; a tiny `captioning train` 4-6 s and 1 s."""
    with torch_threads(1):
        yield


@dataclass
class TinyRun:
    "A finished tiny training run: its run folder, its feature cache, the log of the command, and its arguments."
    run: Path
    cache: Path
    log: Path

    def args(self, run: Path, cache: Path, *extra: str) -> list[str]:
        "`captioning train` arguments that resume (or re-run) this run in folder `run` with feature cache `cache`."
        return ["train", *TINY_TRAIN, "--cache-dir", str(cache), "--output", str(run), *extra]

    def copy(self, folder: Path) -> tuple[Path, Path]:
        "Copies of the run folder and the feature cache under `folder`: (run, cache)."
        run, cache = folder / "run", folder / "cache"
        shutil.copytree(self.run, run)
        shutil.copytree(self.cache, cache)
        return run, cache


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """`captioning train` with TINY_TRAIN, trained once per session with stdout and stderr redirected to a file,
    as a newcomer's `captioning train > log 2>&1` would: tests copy the run folder rather than train again."""
    from captioning.cli import main
    base = tmp_path_factory.mktemp("tiny_run")
    run = TinyRun(base / "run", base / "cache", base / "train.log")
    with open(run.log, "w") as log, redirect_stdout(log), redirect_stderr(log), torch_threads(1):
        code = main(run.args(run.run, run.cache))
    assert code == 0, run.log.read_text()
    return run


@dataclass
class TinyExport:
    "An exported model with the random 'tiny' encoder and a small LSTM decoder: loads in a fraction of a second."
    folder: Path
    model: "torch.nn.Module"
    images: list  # PIL images to caption


def tiny_caption_model(kind: str = "lstm", seed: int = 0, n_train: int = 20):
    "A CaptionModel with the 'tiny' encoder and a small decoder of `kind`, its vocabulary from synthetic captions."
    from captioning.decoder import DECODERS, build_decoder
    from captioning.encoder import build_encoder
    from captioning.model import CaptionModel
    from captioning.synthetic import synthetic_corpus
    from captioning.vocabulary import Vocabulary
    items = synthetic_corpus(n_train=n_train, n_dev=0, n_test=0, seed=5)["train"]
    vocab = Vocabulary.build([c for item in items for c in item.captions], min_freq=1)
    torch.manual_seed(seed)
    encoder = build_encoder("tiny", pretrained=False)
    sizes = dict(hidden_dim=16, num_layers=1, num_heads=2, ff_dim=32) if kind == "transformer" else \
        dict(embed_dim=12, hidden_dim=16, attention_dim=8)
    config = DECODERS[kind].config_class(vocab_size=len(vocab), feature_dim=encoder.feature_dim, kind=kind, **sizes)
    model = CaptionModel(encoder, build_decoder(config), vocab)
    with torch.no_grad():  # larger output weights: varied captions rather than one repeated word
        model.decoder.output.bias.normal_(0, 1.0)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> TinyExport:
    "A tiny model trained on nothing, exported as `captioning train` exports: decoding, data and metrics recorded."
    from captioning.synthetic import synthetic_corpus
    with torch_threads(1):
        model = tiny_caption_model()
    model.generation = {"beam_size": 2, "max_len": 12, "no_repeat_ngram_size": 0}
    model.trained_on = {"dataset": "synthetic", "recipe": "synthetic-lstm", "train_images": 20, "n_train": 20, "n_dev": 4, "seed": 0}
    model.metrics = {"dev_CIDEr-D": 0.123}
    folder = tmp_path_factory.mktemp("tiny_export") / "export"
    model.save_pretrained(folder)
    images = [item.load() for item in synthetic_corpus(0, 0, 3, seed=9)["test"]]
    return TinyExport(folder, model, images)
