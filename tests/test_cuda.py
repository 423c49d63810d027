"""The GPU path: fp16 with the gradient scaler, bf16, resume, decoding, `--device cuda`, and NCCL DDP on two GPUs.

Every test carries the `cuda` marker and is skipped, with the reason, on a machine without a GPU (this repository's
CI machine has none). `bash bench/gpu_check.sh` runs this module and a short Flickr8k training on one GPU.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from captioning.data import CaptionDataset, ImageDataset
from captioning.decoder import DecoderConfig, build_decoder
from captioning.encoder import build_encoder
from captioning.model import CaptionModel, generate_captions
from captioning.synthetic import synthetic_corpus
from captioning.training import TrainConfig, fit
from captioning.vocabulary import Vocabulary

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]


def setup(kind="attention", device="cuda", seed=0):
    "A small attention (or Transformer) model on `device`, with random cached features for 16 train and 4 dev images."
    items = synthetic_corpus(n_train=16, n_dev=4, n_test=0, seed=2)
    g = torch.Generator().manual_seed(0)
    features = [(torch.randn(16, generator=g), torch.randn(4, 16, generator=g)) for _ in range(20)]
    vocab = Vocabulary.build([c for i in items["train"] for c in i.captions], min_freq=1)
    torch.manual_seed(seed)
    sizes = dict(hidden_dim=16, num_layers=1, num_heads=2, ff_dim=32) if kind == "transformer" else \
        dict(embed_dim=16, hidden_dim=24, attention_dim=8)
    config = DecoderConfig.from_dict(dict(vocab_size=len(vocab), feature_dim=16, kind=kind, dropout=0.3, **sizes))
    model = CaptionModel(build_encoder("tiny", pretrained=False), build_decoder(config), vocab).to(device)
    return (model, vocab, CaptionDataset(items["train"], vocab, features=features[:16]),
            ImageDataset(items["dev"], features=features[16:]))


def config(precision="fp32", epochs=2):
    return TrainConfig(epochs=epochs, batch_size=8, warmup_steps=2, patience=10, precision=precision)


@pytest.mark.parametrize("kind", ["attention", "transformer"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_training_steps_in_half_precision_on_the_gpu(tmp_path, kind, precision):
    model, vocab, train_set, dev_set = setup(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = fit(model, vocab, train_set, dev_set, config(precision), tmp_path, verbose=False)
    assert next(model.parameters()).device.type == "cuda"
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history), history
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "no weight moved: the scaler skipped every step, or nothing trained"


def test_fp16_uses_the_gradient_scaler_and_bf16_does_not(tmp_path, monkeypatch):
    scalers = []
    original = torch.amp.GradScaler.__init__
    def spy(self, *args, **kwargs):
        scalers.append(args or kwargs)
        original(self, *args, **kwargs)
    monkeypatch.setattr(torch.amp.GradScaler, "__init__", spy)
    for precision in ("bf16", "fp16"):
        model, vocab, train_set, dev_set = setup()
        fit(model, vocab, train_set, dev_set, config(precision, epochs=1), tmp_path / precision, verbose=False)
    assert len(scalers) == 1, f"expected one GradScaler (fp16's), got {len(scalers)}"


def test_resume_on_the_gpu_continues_the_uninterrupted_run(tmp_path):
    torch.backends.cudnn.deterministic = True
    model, vocab, train_set, dev_set = setup()
    fit(model, vocab, train_set, dev_set, config(), tmp_path / "straight", verbose=False)
    straight = model.state_dict()

    class Crash(Exception): pass
    def crash(history):
        if len(history) == 1: raise Crash()
    model, vocab, train_set, dev_set = setup()
    with pytest.raises(Crash):
        fit(model, vocab, train_set, dev_set, config(), tmp_path / "resumed", callbacks=[crash], verbose=False)
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert "cuda" in saved["rng"], "the checkpoint must hold the CUDA RNG state (dropout masks on the GPU)"
    model, vocab, train_set, dev_set = setup(seed=99)  # different initial weights: the checkpoint must replace them
    fit(model, vocab, train_set, dev_set, config(), tmp_path / "resumed", verbose=False)
    resumed = model.state_dict()
    gap = max((straight[k].float() - resumed[k].float()).abs().max().item() for k in straight)
    assert gap < 1e-5, f"resumed weights differ from the uninterrupted run's by {gap:.2e}"


@pytest.mark.parametrize("kind", ["attention", "transformer"])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_decoding_on_the_gpu_equals_the_cpu(kind, beam_size):
    model, vocab, _, dev_set = setup(kind, device="cpu")
    with torch.no_grad():  # larger weights: captions that vary with the image rather than one repeated word
        for p in model.decoder.parameters(): p.normal_(0, 0.5)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 on both sides
    on_cpu = generate_captions(model, dev_set, vocab, beam_size=beam_size, max_len=12)
    on_gpu = generate_captions(model.to("cuda"), dev_set, vocab, beam_size=beam_size, max_len=12)
    assert len(set(on_cpu)) > 1, on_cpu  # the comparison means something only if the captions differ
    assert on_gpu == on_cpu


def test_the_command_trains_and_captions_on_the_gpu(tmp_path):
    from captioning.cli import main
    from conftest import TINY_TRAIN
    run = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "--device", "cuda", "--cache-dir", str(tmp_path / "cache"),
                 "--output", str(run)]) == 0
    model = CaptionModel.from_pretrained(run / "export")
    assert model.decoder.output.weight.device.type == "cpu"  # exports load on the CPU unless asked
    images = [item.load() for item in synthetic_corpus(0, 0, 2, seed=9)["test"]]
    assert main(["caption", "--model", str(run / "export"), "--device", "cuda", *[str(_save(im, tmp_path / f"{i}.png")) for i, im in enumerate(images)]]) == 0


def _save(image, path: Path) -> Path:
    image.save(path)
    return path


DDP_SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path
    import torch
    from captioning.distributed import local_rank, processes_for_job, rank, torchrun_session
    sys.path.insert(0, sys.argv[2])
    from test_cuda import config, setup
    from captioning.training import fit

    out = Path(sys.argv[1])
    with torchrun_session("cuda") as device:
        assert device == torch.device("cuda", local_rank()), device
        assert torch.distributed.get_backend() == "nccl"
        model, vocab, train_set, dev_set = setup(device=device, seed=rank())  # different weights: DDP must equalise them
        fit(model, vocab, train_set, dev_set, config(), out / "run", verbose=False, processes=processes_for_job())
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out / f"weights{rank()}.pt")
''')


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two-process NCCL DDP needs two GPUs")
def test_two_processes_on_two_gpus_train_identical_replicas_over_nccl(tmp_path):
    script = tmp_path / "ddp_cuda.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(tmp_path), str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    replica0, replica1 = (torch.load(tmp_path / f"weights{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(replica0[k], replica1[k]) for k in replica0), "replicas must hold identical weights"
