"""Multi-process training: `fit` under torchrun with 2 Gloo processes on the CPU, compared with one process."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from captioning.distributed import (ShardedBatches, TorchrunEnv, TorchrunProcesses, all_gather_objects, barrier,
                                    broadcast_object, broadcast_tensors, init_distributed, is_main, processes_for_job,
                                    rank, rank_slice, rank_zero_first, sum_across_ranks, torchrun_env, torchrun_session,
                                    world_size)
from captioning.files import CheckpointError
from captioning.training import EpochBatches, SingleProcess

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py: two threads crawl on two shared cores

# Run by torchrun in 2 processes, and imported by the tests to train the same model in one process.
SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path
    import torch
    from captioning.data import CaptionDataset, ImageDataset
    from captioning.decoder import DecoderConfig, build_decoder
    from captioning.distributed import processes_for_job, rank, torchrun_session
    from captioning.encoder import build_encoder
    from captioning.model import CaptionModel
    from captioning.synthetic import synthetic_corpus
    from captioning.training import TrainConfig, fit
    from captioning.vocabulary import Vocabulary


    class Crash(Exception):
        pass


    def setup(dropout=0.0):
        torch.manual_seed(rank())  # different initial weights on each rank: DDP must make them equal
        items = synthetic_corpus(n_train=16, n_dev=4, n_test=0, seed=2)
        g = torch.Generator().manual_seed(0)
        features = [(torch.randn(16, generator=g), torch.randn(4, 16, generator=g)) for _ in range(20)]
        vocab = Vocabulary.build([c for i in items["train"] for c in i.captions], min_freq=1)
        decoder = build_decoder(DecoderConfig(vocab_size=len(vocab), feature_dim=16, kind="attention", embed_dim=16,
                                              hidden_dim=24, attention_dim=8, dropout=dropout))
        model = CaptionModel(build_encoder("tiny", pretrained=False), decoder, vocab)
        return (model, vocab, CaptionDataset(items["train"], vocab, features=features[:16]),
                ImageDataset(items["dev"], features=features[16:]))


    def config(batch_size, precision="fp32", **kwargs):
        return TrainConfig(**{**dict(epochs=2, batch_size=batch_size, accumulate=2, warmup_steps=2, patience=10,
                                     attention_penalty=0.0, precision=precision), **kwargs})


    def train(out, batch_size, precision="fp32"):
        "2 epochs; saves this rank's weights after the last epoch (before fit reloads the best ones)."
        out.mkdir(parents=True, exist_ok=True)
        model, vocab, train_set, dev_set = setup()
        last = {}
        fit(model, vocab, train_set, dev_set, config(batch_size, precision), out / f"run{rank()}", verbose=False,
            callbacks=[lambda history: last.update({k: v.clone() for k, v in model.state_dict().items()})],
            processes=processes_for_job())
        torch.save(last, out / f"weights{rank()}.pt")


    def crash_and_resume(out, batch_size):
        "With dropout: one uninterrupted run, and one killed after epoch 1 then resumed with fresh weights."
        model, vocab, train_set, dev_set = setup(dropout=0.3)
        fit(model, vocab, train_set, dev_set, config(batch_size), out / "straight", verbose=False, processes=processes_for_job())
        model, vocab, train_set, dev_set = setup(dropout=0.3)
        def crash(history):
            if len(history) == 1: raise Crash()  # on every rank, after the checkpoint of epoch 1
        try: fit(model, vocab, train_set, dev_set, config(batch_size), out / "resumed", verbose=False, callbacks=[crash],
                 processes=processes_for_job())
        except Crash: pass
        torch.manual_seed(99 + rank())
        model, vocab, train_set, dev_set = setup(dropout=0.3)
        fit(model, vocab, train_set, dev_set, config(batch_size), out / "resumed", verbose=False, processes=processes_for_job())


    def fit_without_processes(out):
        "In a process group, fit must be told how to talk to the other processes: without it, it refuses to start."
        model, vocab, train_set, dev_set = setup()
        try: fit(model, vocab, train_set, dev_set, config(8), out / f"refused{rank()}", verbose=False)
        except ValueError as e: (out / f"refused{rank()}.txt").write_text(str(e))


    if __name__ == "__main__":
        out = Path(sys.argv[1])
        with torchrun_session("cpu"):
            train(out / "fp32", 8)
            train(out / "bf16", 8, "bf16")
            crash_and_resume(out / "resume", 8)
            fit_without_processes(out)
''')


def run_torchrun(args, cwd, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
                            capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "The 2-process runs (torchrun) and the same script imported here for 1-process references."
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "train_tiny.py").write_text(SCRIPT)
    run_torchrun([str(tmp / "train_tiny.py"), str(tmp / "ddp")], cwd=tmp)
    spec = importlib.util.spec_from_file_location("train_tiny", tmp / "train_tiny.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        script.train(tmp / "single" / "fp32", 16)
        script.train(tmp / "single" / "bf16", 16, "bf16")
    finally:
        torch.set_num_threads(threads)
    return tmp, script


def weights(folder, r=0):
    return torch.load(Path(folder) / f"weights{r}.pt")


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 1e-2)])
def test_two_processes_train_like_one_with_the_global_batch(runs, precision, tolerance):
    tmp, _ = runs
    replica0, replica1 = weights(tmp / "ddp" / precision, 0), weights(tmp / "ddp" / precision, 1)
    single = weights(tmp / "single" / precision)
    assert replica0.keys() == single.keys() and not any(k.startswith("module.") for k in replica0)
    assert all(torch.equal(replica0[k], replica1[k]) for k in replica0), "replicas must hold identical weights"
    gap = max((replica0[k] - single[k]).abs().max().item() for k in single)
    print(f"{precision}: largest difference from one process {gap:.2e}")
    assert gap < tolerance


def test_only_rank_zero_writes_and_the_history_is_global(runs):
    tmp, _ = runs
    ddp, single = tmp / "ddp" / "fp32", tmp / "single" / "fp32"
    assert sorted(p.name for p in ddp.iterdir()) == ["run0", "weights0.pt", "weights1.pt"]  # no run1: rank 1 wrote nothing
    assert sorted(p.name for p in (ddp / "run0").iterdir()) == [".lock", "best.pt", "checkpoint.pt", "history.json"]
    h2, h1 = (json.loads((d / "run0" / "history.json").read_text()) for d in (ddp, single))
    assert [round(h["train_loss"], 4) for h in h2] == [round(h["train_loss"], 4) for h in h1]  # a global token mean
    checkpoint = torch.load(ddp / "run0" / "checkpoint.pt", weights_only=True)  # every rank's RNG state as plain data
    assert checkpoint["state"]["world_size"] == 2 and len(checkpoint["state"]["rng_per_rank"]) == 2
    assert not any(k.startswith("module.") for k in checkpoint["model"])


def test_resume_under_ddp_is_exact(runs):
    tmp, _ = runs
    straight, resumed = (torch.load(tmp / "ddp" / "resume" / name / "checkpoint.pt", weights_only=True)
                         for name in ("straight", "resumed"))
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert [h["train_loss"] for h in straight["state"]["history"]] == [h["train_loss"] for h in resumed["state"]["history"]]


def test_a_checkpoint_from_two_processes_is_refused_by_one(runs, tmp_path):
    tmp, script = runs
    model, vocab, train_set, dev_set = script.setup(dropout=0.3)
    with pytest.raises(CheckpointError, match="written by 2 processes"):
        script.fit(model, vocab, train_set, dev_set, script.config(8), tmp / "ddp" / "resume" / "straight", verbose=False)


def test_fit_in_a_process_group_needs_its_processes(runs):
    tmp, _ = runs
    for r in (0, 1):
        assert "pass processes=TorchrunProcesses()" in (tmp / "ddp" / f"refused{r}.txt").read_text()
        assert not (tmp / "ddp" / f"refused{r}").exists()  # refused before it took the folder


def test_train_command_under_torchrun(tmp_path):
    common = ["--n-train", "12", "--n-dev", "4", "--cache-dir", str(tmp_path / "cache")]
    result = run_torchrun(["-m", "captioning.cli", "train", *common, "--epochs", "1", "--no-meteor", "--warmup-steps", "2",
                           "--beam-size", "1", "--output", str(tmp_path / "run")], cwd=tmp_path)
    assert "x 2 processes" in result.stdout
    assert result.stdout.count("exported to") == 1 and result.stdout.count("epoch  1:") == 1  # rank 0 reports, once
    assert len(list((tmp_path / "cache").iterdir())) == 2  # train and dev features, extracted once
    from safetensors.torch import load_file
    from captioning.model import CaptionModel
    assert not any(k.startswith("module.") for k in load_file(str(tmp_path / "run" / "export" / "model.safetensors")))
    CaptionModel.from_pretrained(tmp_path / "run" / "export")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "best.pt", "checkpoint.pt", "export",
                                                                    "history.json", "run.json"]


# Single-process behaviour of the helpers: every one of them is a no-op.

def test_torchrun_env_is_read_and_checked():
    assert torchrun_env({}) is None
    assert torchrun_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == TorchrunEnv(3, 1, 4)
    with pytest.raises(ValueError, match="WORLD_SIZE not set"):
        torchrun_env({"RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="RANK 4"):
        torchrun_env({"RANK": "4", "LOCAL_RANK": "0", "WORLD_SIZE": "4"})


def test_helpers_do_nothing_in_one_process(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"): monkeypatch.delenv(name, raising=False)
    assert init_distributed("cpu") == torch.device("cpu")
    with torchrun_session("cpu") as device:
        assert device.type == "cpu" and (rank(), world_size(), is_main()) == (0, 1, True)
    monkeypatch.setenv("RANK", "0"); monkeypatch.setenv("LOCAL_RANK", "0"); monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("cpu") == torch.device("cpu") and world_size() == 1  # a job of one: no process group
    barrier()
    assert broadcast_object([1, 2]) == [1, 2] and all_gather_objects("x") == ["x"] and sum_across_ranks(2, 3) == [2.0, 3.0]
    t = torch.ones(2); broadcast_tensors([t]); assert torch.equal(t, torch.ones(2))
    assert rank_zero_first(lambda: 7) == 7
    assert type(processes_for_job()) is SingleProcess  # fit's default: one process, every method trivial
    with pytest.raises(ValueError, match="needs a process group"):
        TorchrunProcesses()


def test_shards_of_every_global_batch_cover_it_in_order():
    batches = list(EpochBatches(range(23), 6, seed=0, epoch=1, lengths=[i % 5 for i in range(23)]))
    for world in (1, 2, 3):
        shards = [list(ShardedBatches(batches, r, world)) for r in range(world)]
        assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
        assert [sum(parts, []) for parts in zip(*shards)] == [b for b in batches if len(b) >= world]
        assert all(abs(len(a) - len(b)) <= 1 for parts in zip(*shards) for a in parts for b in parts)
    assert list(ShardedBatches([[1, 2, 3], [4]], 1, 2)) == [[2, 3]]  # a batch of 1 cannot feed 2 ranks: dropped
    with pytest.raises(ValueError, match="rank 2"):
        rank_slice(5, 2, 2)
