"A smoke test of bench/flickr8k.py on a sliver of the real data: every stage runs, reports and exports."
import importlib.util
import json
from argparse import Namespace
from pathlib import Path

import pytest


def load_bench():
    path = Path(__file__).parent.parent / "bench" / "flickr8k.py"
    spec = importlib.util.spec_from_file_location("bench_flickr8k", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("one_thread")
def test_flickr8k_bench_runs_every_stage(flickr8k_root, tmp_path, capsys):
    bench = load_bench()
    args = Namespace(root=flickr8k_root, output=tmp_path / "bench", encoder="efficientnet_lite0", cache_dir=None,
                     image_size=96, crop=False, models="attention", epochs=1, minutes=None, patience=6, scst_epochs=1, scst_minutes=None,
                     train_images=40, dev_images=8, skip_seed=True, restart=True)
    results = bench.run(args)
    bench.print_table(results)
    table = capsys.readouterr().out
    stages = results["stages"]
    assert [(r["stage"], r["decoding"]) for r in stages] == [("cross-entropy", "beam 3"), ("self-critical", "greedy")]
    assert "CIDEr-D greedy" in stages[0] and "CIDEr-D beam 3" in stages[1]  # the other decoding, beside
    assert stages[1]["recipe_minutes"] > stages[0]["recipe_minutes"] > results["feature_minutes"]
    for stage, beam_size in (("cross-entropy", 3), ("self-critical", 1)):
        config = json.loads((tmp_path / "bench" / "attention" / stage / "export" / "config.json").read_text())
        assert config["generation"]["beam_size"] == beam_size
        assert (config["preprocessing"]["size"], config["preprocessing"]["squash"]) == (96, True)
    assert (tmp_path / "bench" / "export" / "model.safetensors").exists()
    assert "| attention | self-critical | greedy |" in table


def test_stage_settings_follow_the_recipe_unless_a_flag_overrides_them():
    bench = load_bench()
    recipe = bench.RECIPES["attention"]["self-critical"]
    assert bench.stage_settings("attention", "self-critical", None, None) == recipe
    assert bench.stage_settings("attention", "self-critical", 0, 3.0) == {**recipe, "epochs": 0, "max_minutes": 3.0}
    assert bench.RECIPES["attention"]["self-critical"] == recipe  # the recipe itself is not changed
