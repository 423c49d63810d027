"A smoke test of bench/flickr8k.py on a sliver of the real data: every stage runs, reports and exports."
import importlib.util
import json
from argparse import Namespace
from pathlib import Path

import pytest

from captioning.data import ImageDataset, load_flickr8k
from captioning.decoder import decoding_name
from captioning.encoder import extract_features
from captioning.model import CaptionModel, evaluate_model


def load_bench():
    path = Path(__file__).parent.parent / "bench" / "flickr8k.py"
    spec = importlib.util.spec_from_file_location("bench_flickr8k", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("one_thread")
def test_flickr8k_bench_runs_every_stage(flickr8k_root, tmp_path, capsys):
    bench = load_bench()
    args = Namespace(root=flickr8k_root, output=tmp_path / "bench", cache_dir=None, image_size=96,
                     recipes="flickr8k-attention", epochs=1, minutes=None, patience=None, scst_epochs=1, scst_minutes=None,
                     train_images=40, dev_images=8, skip_seed=True, restart=True)
    results = bench.run(args)
    bench.print_table(results)
    table = capsys.readouterr().out
    stages = results["stages"]
    assert [r["stage"] for r in stages] == ["cross-entropy", "self-critical"]
    names = ["greedy", "beam 3", "greedy, no repeated 2-grams"]
    for row in stages:  # the reported decoding is the one with the highest dev CIDEr-D; the others' are beside it
        assert list(row["by_decoding"]) == names and row["decoding"] in names
        assert row["by_decoding"][row["decoding"]] == {"CIDEr-D": row["CIDEr-D"], "BLEU-4": row["BLEU-4"],
                                                       "repeated_bigram_rate": row["repeated_bigram_rate"]}
        for other in set(names) - {row["decoding"]}:
            assert row["CIDEr-D"] >= row[f"CIDEr-D {other}"] == row["by_decoding"][other]["CIDEr-D"]
        assert row["by_decoding"]["greedy, no repeated 2-grams"]["repeated_bigram_rate"] == 0.0
    assert stages[1]["recipe_minutes"] > stages[0]["recipe_minutes"] > results["feature_minutes"]["flickr8k-attention"]
    items = load_flickr8k(flickr8k_root, splits=["dev"])["dev"][:8]  # the bench's dev images, read as `captioning evaluate` reads them
    for row in stages:  # the export records the reported decoding, and decoding it again gives the reported figures
        folder = tmp_path / "bench" / "flickr8k-attention" / row["stage"] / "export"
        config = json.loads((folder / "config.json").read_text())
        assert decoding_name(**config["generation"]) == row["decoding"]
        assert (config["preprocessing"]["size"], config["preprocessing"]["squash"]) == (96, True)
        model = CaptionModel.from_pretrained(folder)
        dev_set = ImageDataset(items, features=extract_features(model.encoder, items, tmp_path / "bench" / "feature_cache"))
        metrics, _ = evaluate_model(model, model.vocab, dev_set, meteor=False, **config["generation"])
        assert metrics["CIDEr-D"] == pytest.approx(row["CIDEr-D"], abs=1e-9)
    caches = sorted(p.name.split("-")[2:-1] for p in (tmp_path / "bench" / "feature_cache").iterdir())
    assert caches == [["40img"], ["40img", "mirrored"], ["8img"]]  # the training images twice: plain and mirrored
    assert (tmp_path / "bench" / "export" / "model.safetensors").exists()
    assert f"| flickr8k-attention | self-critical | {stages[1]['decoding']} |" in table
    assert bench.self_critical_gains(results)[0] in table


def test_self_critical_gains_compare_the_same_decoding_and_the_reported_ones():
    bench = load_bench()
    def row(stage, decoding, greedy, beam, rates):
        by = {"greedy": {"CIDEr-D": greedy, "repeated_bigram_rate": rates[0]},
              "beam 3": {"CIDEr-D": beam, "repeated_bigram_rate": rates[1]}}
        return {"recipe": "flickr8k-transformer", "stage": stage, "decoding": decoding, **by[decoding], "by_decoding": by}
    results = {"stages": [row("cross-entropy", "beam 3", 0.40, 0.50, (0.10, 0.05)),
                          row("self-critical", "greedy", 0.48, 0.45, (0.08, 0.02))]}
    [line] = bench.self_critical_gains(results)
    assert line == ("flickr8k-transformer, self-critical against cross-entropy, dev CIDEr-D: "
                    "greedy 0.400 -> 0.480 (+20.0 %), repeated bigrams 0.100 -> 0.080; "
                    "beam 3 0.500 -> 0.450 (-10.0 %), repeated bigrams 0.050 -> 0.020; "
                    "reported (beam 3 -> greedy) 0.500 -> 0.480 (-4.0 %)")
    assert bench.self_critical_gains({"stages": results["stages"][:1]}) == []  # no self-critical stage, no line


def test_budgets_from_the_command_line_change_only_the_budgets():
    bench = load_bench()
    from captioning.recipes import recipe
    quick = Namespace(epochs=2, minutes=3.0, scst_epochs=None, scst_minutes=1.5)
    settings = bench.with_budgets(recipe("flickr8k-attention"), quick)
    expected = recipe("flickr8k-attention")
    expected["cross_entropy"].update(epochs=2, max_minutes=3.0)
    expected["self_critical"]["train"]["max_minutes"] = 1.5
    assert settings == expected
    off = bench.with_budgets(recipe("flickr8k-attention"), Namespace(epochs=None, minutes=None, scst_epochs=0, scst_minutes=None))
    assert off["self_critical"] is None and off["cross_entropy"] == recipe("flickr8k-attention")["cross_entropy"]
