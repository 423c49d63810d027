"The `captioning` command: data, train (recipes), evaluate (the model's own data by default) and caption."
import json

import pytest
import torch

from captioning.cli import build_parser, main, recipe_name, settings_from_args

from conftest import TINY_TRAIN

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py: two threads crawl on two shared cores


def test_data_command_on_synthetic(tmp_path, capsys):
    assert main(["data", "--n-train", "20", "--grid", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "vocabulary:" in out and (tmp_path / "g.png").exists()


def test_data_command_reports_a_missing_folder(tmp_path, capsys):
    assert main(["data", "--dataset", "flickr8k", "--root", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_train_prints_metrics_and_samples_and_exports(tiny_run):
    log = tiny_run.log.read_text()
    assert "recipe synthetic-attention: synthetic, 12 training / 4 dev images" in log  # the default recipe
    assert "dev metrics (beam 3, 4 images" in log and "CIDEr-D" in log and "sample captions" in log
    assert (tiny_run.run / "export" / "model.safetensors").exists()
    settings = json.loads((tiny_run.run / "run.json").read_text())
    assert settings["recipe"] == "synthetic-attention" and settings["data"]["n_train"] == 12
    config = json.loads((tiny_run.run / "export" / "config.json").read_text())
    assert config["trained_on"].items() >= {"dataset": "synthetic", "recipe": "synthetic-attention", "train_images": 12,
                                            "n_train": 12, "n_dev": 4, "seed": 0}.items()  # what `evaluate` reads back
    assert config["generation"]["beam_size"] == 3 and set(config["metrics"]) >= {"dev_BLEU-4", "dev_CIDEr-D"}


def test_evaluate_and_caption_an_exported_model(tiny_run, tmp_path, capsys):
    from captioning.synthetic import synthetic_corpus
    run, cache = tiny_run.copy(tmp_path)
    evaluate = ["evaluate", str(run), "--no-meteor", "--split", "test", "--cache-dir", str(cache)]
    assert main(evaluate) == 0  # no data flags: the data the model was trained on (trained_on)
    out = capsys.readouterr().out
    assert "synthetic test (4 images, beam 3;" in out and "BLEU-4" in out  # the export's decoding, beam 3
    # evaluate decodes as the export says (a self-critical export says greedy) unless --beam-size is given
    config_path = run / "export" / "config.json"
    config = json.loads(config_path.read_text())

    def rewrite(**generation):  # the export's decoding, changed as the bench may change it (checksums stay valid)
        config_path.write_text(json.dumps({**config, "generation": {**config["generation"], **generation}}))
    rewrite(beam_size=1, no_repeat_ngram_size=2)  # n-gram blocking, recorded by the export (the bench may choose it)
    assert main(evaluate) == 0
    assert "greedy, no repeated 2-grams;" in capsys.readouterr().out
    assert main([*evaluate, "--beam-size", "2", "--no-repeat-ngram-size", "0"]) == 0  # flags override the export
    assert "test (4 images, beam 2;" in capsys.readouterr().out
    for bad, message in ((["--no-repeat-ngram-size", "-1"], "argument --no-repeat-ngram-size: must be an integer of at least 0, got -1"),
                         (["--beam-size", "0"], "argument --beam-size: must be an integer of at least 1, got 0")):
        with pytest.raises(SystemExit) as exit:
            main([*evaluate, *bad])
        assert exit.value.code == 2 and message in capsys.readouterr().err
    synthetic_corpus(0, 0, 1, seed=3)["test"][0].load().save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"garbage")
    assert main(["caption", str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), "--model", str(run)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(str(tmp_path / "a.png") + "\t") and "b.jpg" in captured.err


def test_evaluate_reports_a_missing_model(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nothing"), "--no-meteor"]) == 2
    assert "export folder not found" in capsys.readouterr().err


def test_caption_without_a_model_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/synthetic-attention here
    assert main(["caption", "x.png"]) == 2
    assert "captioning train" in capsys.readouterr().err


def test_recipes_are_chosen_by_name_or_by_dataset_and_decoder():
    parse = lambda *flags: build_parser().parse_args(["train", *flags])
    assert recipe_name(parse()) == "synthetic-attention"
    assert recipe_name(parse("--decoder", "gru")) == "synthetic-gru"
    assert recipe_name(parse("--dataset", "flickr8k", "--decoder", "transformer")) == "flickr8k-transformer"
    assert recipe_name(parse("--dataset", "karpathy")) == "flickr8k-attention"  # photos of any source
    assert recipe_name(parse("--recipe", "synthetic-lstm", "--decoder", "gru")) == "synthetic-lstm"
    settings = settings_from_args(parse("--recipe", "synthetic-lstm", "--decoder", "gru", "--epochs", "2"))
    assert settings["decoder"] == {"kind": "gru"}  # another kind: its own default sizes, not the recipe's
    assert settings["cross_entropy"]["epochs"] == 2 and settings["data"]["dataset"] == "synthetic"
    assert settings_from_args(parse("--self-critical-epochs", "0"))["self_critical"] is None
    flickr = settings_from_args(parse("--dataset", "flickr8k", "--self-critical-epochs", "0"))
    assert flickr["self_critical"] is None and flickr["data"]["min_freq"] == 5


def test_train_a_transformer_then_self_critical(tiny_run, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["train", "--n-train", "8", "--n-dev", "4", "--cache-dir", str(cache), "--decoder", "transformer",
                 "--epochs", "1", "--no-meteor", "--warmup-steps", "2", "--image-size", "64", "--squash",
                 "--self-critical-epochs", "1", "--self-critical-batch-size", "8", "--output", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "recipe synthetic-transformer" in out and "stage: self-critical" in out and "starting weights: dev CIDEr-D" in out
    history = json.loads((tmp_path / "run" / "self-critical" / "history.json").read_text())
    assert len(history) == 1 and "sample_reward" in history[0]
    config = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert config["decoder"]["kind"] == "transformer"
    assert (config["preprocessing"]["size"], config["preprocessing"]["squash"]) == (64, True)


def _exported_weights(run_dir) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "export" / "model.safetensors"))


def test_the_same_command_trains_the_same_weights(tiny_run, tmp_path):
    "--seed fixes the decoder's initial weights as well as the data and the batches: two runs export equal weights."
    assert main(tiny_run.args(tmp_path / "again", tiny_run.cache)) == 0
    a, b = (_exported_weights(run) for run in (tiny_run.run, tmp_path / "again"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mirror_trains_on_the_mirrored_images_too(tiny_run, tmp_path):
    "--mirror extracts a second, mirrored cache of the training images, and training reads it: the weights change."
    _, cache = tiny_run.copy(tmp_path)
    assert not list(cache.glob("*mirrored*"))
    assert main(tiny_run.args(tmp_path / "mirror", cache, "--mirror")) == 0
    assert [p.name.split("-")[2] for p in cache.glob("*mirrored*")] == ["12img"]  # training images only
    a, b = (_exported_weights(run) for run in (tiny_run.run, tmp_path / "mirror"))
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_help_lists_every_command_and_its_options(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0
    for command in ("train", "evaluate", "caption", "data"):
        assert f"\n  {command} " in out
    for option in ("--recipe", "--epochs", "--beam-size", "--restart", "--split", "--no-repeat-ngram-size", "--grid"):
        assert option in out
    assert TINY_TRAIN[0] in out  # --n-train
