"Recipes: every one builds valid configurations and runs through the command's checks; the defaults have one home."
from dataclasses import MISSING, fields

import pytest

import captioning.recipes
from captioning.cli import build_parser, check_settings, settings_from_args, stage_configs
from captioning.decoder import DECODERS, DecoderConfig
from captioning.model import check_generation  # noqa: F401  (imports every decoder module: the registry is complete)
from captioning.recipes import DEFAULTS, RECIPES, recipe, recipe_names
from captioning.self_critical import SelfCriticalConfig, self_critical_config
from captioning.training import TrainConfig
from captioning.transformer import TransformerConfig

NAMES = sorted(RECIPES)


@pytest.mark.parametrize("name", NAMES)
def test_every_recipe_builds_valid_configurations(name):
    r = recipe(name)
    assert set(r) >= {"description", "data", "decoder", "cross_entropy", "self_critical", "generation"}
    assert r["data"]["dataset"] in ("synthetic", "flickr8k") and name.startswith(r["data"]["dataset"])
    kind = r["decoder"]["kind"]
    config = DECODERS[kind].config_class(vocab_size=100, feature_dim=1280, **r["decoder"])
    assert isinstance(config, DecoderConfig) and config.kind == kind
    assert DecoderConfig.from_dict(config.to_dict()) == config
    cross_entropy = TrainConfig(**r["cross_entropy"])
    if r["self_critical"] is not None:
        stage = self_critical_config(cross_entropy, **r["self_critical"]["train"])
        assert stage.schedule == "constant" and stage.label_smoothing == 0.0 and stage.lr == r["self_critical"]["train"]["lr"]
        SelfCriticalConfig(**r["self_critical"].get("sampling", {}))
    assert check_generation(r["generation"])["beam_size"] >= 1


@pytest.mark.parametrize("name", NAMES)
def test_every_recipe_passes_the_commands_checks(name):
    args = build_parser().parse_args(["train", "--recipe", name])
    settings = settings_from_args(args)
    assert settings["recipe"] == name and settings["data"]["seed"] == 0
    check_settings(settings)
    decoder, stages = stage_configs(settings, vocab_size=100, feature_dim=1280)
    assert decoder.kind == recipe(name)["decoder"]["kind"]
    assert [stage for stage, _, _ in stages] == ["cross-entropy"] + (["self-critical"] if recipe(name)["self_critical"] else [])
    assert all(isinstance(config, TrainConfig) for _, config, _ in stages)


@pytest.mark.parametrize("config_class, defaults", [
    (DecoderConfig, DEFAULTS["decoder"]), (TransformerConfig, DEFAULTS["transformer"]),
    (TrainConfig, DEFAULTS["train"]), (SelfCriticalConfig, DEFAULTS["self_critical"])],
    ids=["DecoderConfig", "TransformerConfig", "TrainConfig", "SelfCriticalConfig"])
def test_the_dataclass_defaults_are_the_recipes_defaults(config_class, defaults):
    "One home for each recommended value: captioning.recipes.DEFAULTS; the dataclasses read their defaults from it."
    field_defaults = {f.name: f.default for f in fields(config_class) if f.default is not MISSING}
    assert set(defaults) <= set(field_defaults), f"DEFAULTS names no field of {config_class.__name__}: {set(defaults) - set(field_defaults)}"
    assert {name: field_defaults[name] for name in defaults} == defaults


def test_the_self_critical_stage_defaults_are_the_recipes_defaults():
    stage = self_critical_config(TrainConfig())
    assert {name: getattr(stage, name) for name in DEFAULTS["self_critical_train"]} == DEFAULTS["self_critical_train"]


def test_recipe_resolves_references_and_returns_copies():
    lstm = recipe("synthetic-lstm")
    assert RECIPES["synthetic-lstm"]["data"] == "synthetic-attention"  # a reference to another recipe's part ...
    assert lstm["data"] == RECIPES["synthetic-attention"]["data"]  # ... resolved
    assert lstm["cross_entropy"] == RECIPES["synthetic-attention"]["cross_entropy"]
    lstm["data"]["n_train"] = 1
    lstm["cross_entropy"]["epochs"] = 99
    assert RECIPES["synthetic-attention"]["data"]["n_train"] != 1 and recipe("synthetic-lstm")["data"]["n_train"] != 1
    own = recipe("synthetic-attention")
    own["decoder"]["hidden_dim"] = 7
    assert RECIPES["synthetic-attention"]["decoder"]["hidden_dim"] != 7
    assert all(not isinstance(recipe(name)[part], str) for name in NAMES
               for part in ("data", "decoder", "cross_entropy", "self_critical", "generation"))
    with pytest.raises(ValueError, match="unknown recipe 'nope': choose one of flickr8k-attention"):
        recipe("nope")


def test_reference_chains_resolve_and_loops_are_refused(monkeypatch):
    recipes = {**RECIPES,
               "a": {**RECIPES["synthetic-attention"], "data": "b"},
               "b": {**RECIPES["synthetic-attention"], "data": "synthetic-lstm"},  # a chain: a -> b -> lstm -> attention
               "loop1": {**RECIPES["synthetic-attention"], "decoder": "loop2"},
               "loop2": {**RECIPES["synthetic-attention"], "decoder": "loop1"},
               "dangling": {**RECIPES["synthetic-attention"], "generation": "no-such-recipe"}}
    monkeypatch.setattr(captioning.recipes, "RECIPES", recipes)
    assert recipe("a")["data"] == RECIPES["synthetic-attention"]["data"]
    with pytest.raises(ValueError, match="decoder refers to .*loops"):
        recipe("loop1")
    with pytest.raises(ValueError, match="'no-such-recipe', which is not a recipe"):
        recipe("dangling")


def test_recipe_names_by_dataset():
    assert recipe_names() == NAMES
    assert recipe_names("synthetic") == [n for n in NAMES if n.startswith("synthetic-")]
    assert recipe_names("flickr8k") == [n for n in NAMES if n.startswith("flickr8k-")]
    assert {"flickr8k-attention", "flickr8k-transformer"} <= set(recipe_names("flickr8k"))
