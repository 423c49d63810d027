import json
from captioning.cli import main


def test_data_command_on_synthetic(tmp_path, capsys):
    assert main(["data", "--n-train", "20", "--grid", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "vocabulary:" in out and (tmp_path / "g.png").exists()


def test_data_command_reports_a_missing_folder(tmp_path, capsys):
    assert main(["data", "--dataset", "flickr8k", "--root", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_train_evaluate_caption_end_to_end(tmp_path, capsys):
    from captioning.synthetic import synthetic_corpus
    common = ["--n-train", "40", "--n-dev", "10", "--cache-dir", str(tmp_path / "cache")]
    assert main(["train", *common, "--epochs", "1", "--no-meteor", "--warmup-steps", "2",
                 "--output", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "CIDEr-D" in out and (tmp_path / "run" / "export" / "model.safetensors").exists()
    assert main(["evaluate", str(tmp_path / "run"), *common, "--no-meteor", "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "BLEU-4" in out and "beam 3;" in out  # the export records the training run's --beam-size, 3
    # evaluate decodes as the export says (a self-critical export says greedy) unless --beam-size is given
    config_path = tmp_path / "run" / "export" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "generation": {**config["generation"], "beam_size": 1}}))
    assert main(["evaluate", str(tmp_path / "run"), *common, "--no-meteor", "--split", "test"]) == 0
    assert "test (" in (out := capsys.readouterr().out) and "greedy;" in out
    assert main(["evaluate", str(tmp_path / "run"), *common, "--no-meteor", "--split", "test", "--beam-size", "2"]) == 0
    assert "beam 2;" in capsys.readouterr().out
    # n-gram blocking, recorded by the export (the bench may choose it) or given, is used and named
    config_path.write_text(json.dumps({**config, "generation": {**config["generation"], "beam_size": 1, "no_repeat_ngram_size": 2}}))
    assert main(["evaluate", str(tmp_path / "run"), *common, "--no-meteor", "--split", "test"]) == 0
    assert "greedy, no repeated 2-grams;" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "run"), *common, "--no-meteor", "--split", "test", "--no-repeat-ngram-size", "0"]) == 0
    assert "greedy;" in capsys.readouterr().out
    for bad, message in ((["--no-repeat-ngram-size", "-1"], "must be 0 (off) or more, got -1"),
                         (["--beam-size", "0"], "beam size must be at least 1, got 0")):
        assert main(["evaluate", str(tmp_path / "run"), *common, "--no-meteor", "--split", "test", *bad]) == 2
        assert message in capsys.readouterr().err
    synthetic_corpus(0, 0, 1, seed=3)["test"][0].load().save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"garbage")
    assert main(["caption", str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), "--model", str(tmp_path / "run")]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(str(tmp_path / "a.png") + "\t") and "b.jpg" in captured.err


def test_evaluate_reports_a_missing_model(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nothing"), "--no-meteor"]) == 2
    assert "export folder not found" in capsys.readouterr().err


def test_train_a_transformer_then_self_critical(tmp_path, capsys):
    common = ["--n-train", "30", "--n-dev", "8", "--cache-dir", str(tmp_path / "cache")]
    assert main(["train", *common, "--decoder", "transformer", "--epochs", "1", "--no-meteor", "--warmup-steps", "2",
                 "--image-size", "96", "--squash", "--self-critical-epochs", "1", "--self-critical-batch-size", "8", "--output", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "starting weights: dev CIDEr-D" in out and "CIDEr-D" in out
    history = json.loads((tmp_path / "run" / "self-critical" / "history.json").read_text())
    assert len(history) == 1 and "sample_reward" in history[0]
    config = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert config["decoder"]["kind"] == "transformer"
    assert (config["preprocessing"]["size"], config["preprocessing"]["squash"]) == (96, True)


def _tiny_train_args(tmp_path) -> list[str]:
    "A one-epoch synthetic run of 40 images with a shared feature cache: seconds, not minutes."
    return ["--n-train", "40", "--n-dev", "10", "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
            "--fine-tune-epochs", "0", "--no-meteor", "--warmup-steps", "2"]


def _exported_weights(run_dir) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "export" / "model.safetensors"))


def test_the_same_command_trains_the_same_weights(tmp_path):
    "--seed fixes the decoder's initial weights as well as the data and the batches: two runs export equal weights."
    import torch
    for run in ("a", "b"):
        assert main(["train", *_tiny_train_args(tmp_path), "--output", str(tmp_path / run)]) == 0
    a, b = (_exported_weights(tmp_path / run) for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mirror_trains_on_the_mirrored_images_too(tmp_path):
    "--mirror extracts a second, mirrored cache of the training images, and training reads it: the weights change."
    import torch
    common = _tiny_train_args(tmp_path)
    assert main(["train", *common, "--output", str(tmp_path / "plain")]) == 0
    assert not list((tmp_path / "cache").glob("*mirrored*"))
    assert main(["train", *common, "--mirror", "--output", str(tmp_path / "mirror")]) == 0
    assert [p.name.split("-")[2] for p in (tmp_path / "cache").glob("*mirrored*")] == ["40img"]  # training images only
    a, b = (_exported_weights(tmp_path / run) for run in ("plain", "mirror"))
    assert not all(torch.equal(a[k], b[k]) for k in a)
