"""Configs are data: defaults, recipes, dotted overrides and clear errors."""

import re
from pathlib import Path

import pytest

from latent_vae.config import (
    CONFIG_DIR,
    QUICKSTART,
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    quickstart_overrides,
)

RECIPES = sorted(CONFIG_DIR.glob("*.yaml"))


def test_the_quickstart_recipe_is_the_defaults_plus_the_quickstart_model():
    quickstart = config_to_dict(load_config(CONFIG_DIR / "quickstart.yaml"))
    assert quickstart == config_to_dict(load_config(None, list(QUICKSTART)))
    defaults = config_to_dict(Config())
    changed = {f"{section}.{key}" for section in defaults for key in defaults[section]
               if defaults[section][key] != quickstart[section][key]}
    assert changed == {entry.split("=")[0] for entry in QUICKSTART}


def test_overrides_naming_a_model_replace_the_quickstarts_model_lines():
    kl = load_config(None, quickstart_overrides(["model.preset=kl-f8"]))
    assert (kl.model.preset, kl.model.init, kl.regularizer.kind, kl.train.max_steps) == ("kl-f8", "default", "kl", 400)
    tuned = load_config(None, quickstart_overrides(["model.pretrained=some/vae"]))
    assert (tuned.model.init, tuned.regularizer.kind) == ("default", "kl")
    assert load_config(None, quickstart_overrides(["data.path=photos"])).model.preset == "tiny-taesd-f4"


def test_a_model_and_its_settings_that_disagree_name_every_fix():
    with pytest.raises(ConfigError) as err:
        load_config(None, [*QUICKSTART, "model.preset=kl-f8"])
    assert str(err.value) == ("model.preset=kl-f8 is a KL model but regularizer.kind=none and "
                              "model.init=lowpass (AutoencoderTiny presets only); "
                              "set regularizer.kind=kl model.init=default")
    with pytest.raises(ConfigError, match="set model.init=default"):
        load_config(None, ["model.init=lowpass", "model.pretrained=some/vae"])


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_documents_its_sources(recipe: Path):
    config = load_config(recipe)
    assert isinstance(config, Config)
    assert recipe.read_text().lstrip().startswith("#"), "a recipe starts with a comment saying where its numbers come from"


def test_recipe_by_name_and_dotted_overrides():
    config = load_config("kl-f8", ["data.path=/images", "data.resolution=128", "train.batch_size=4",
                                   "train.adam_betas=[0.9, 0.99]", "model.config.latent_channels=8"])
    assert config.model.preset == "kl-f8"
    assert (config.data.path, config.data.resolution, config.train.batch_size) == ("/images", 128, 4)
    assert config.train.adam_betas == [0.9, 0.99]
    assert config.model.config == {"latent_channels": 8}


def test_unknown_key_suggests_the_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.batchsize'.*did you mean 'train.batch_size'"):
        load_config(None, ["train.batchsize=4"])
    with pytest.raises(ConfigError, match=r"'reconstruction.perceptual_wieght'.*'reconstruction.perceptual_weight'"):
        load_config(None, ["reconstruction.perceptual_wieght=0"])


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"'train.max_step' in .*bad.yaml.*'train.max_steps'"):
        load_config(recipe)


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"invalid value for 'train.batch_size'.*expected int"):
        load_config(None, ["train.batch_size=eight"])


def test_invalid_choice_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"gan.norm='batch'.*group, sync_batch, none"):
        load_config(None, ["gan.norm=batch"])


def test_override_without_equals_sign_is_explained():
    with pytest.raises(ConfigError, match=r"must look like section.key=value"):
        load_config(None, ["train.batch_size"])


def test_yaml_is_loaded_safely(tmp_path):
    recipe = tmp_path / "evil.yaml"
    recipe.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="could not determine a constructor|ConstructorError"):
        load_config(recipe)


@pytest.mark.parametrize("override", [
    "train.learning_rate=.inf", "train.learning_rate=.nan", "train.learning_rate=-1e-4", "train.weight_decay=-0.1",
    "train.weight_decay=.nan", "train.disc_lr_ratio=-1", "train.seed=-3", "train.seed=9223372036854775808",
    "train.max_grad_norm=.inf",
    "train.adam_betas=[.nan, 0.9]", "train.ema_decay=.nan", "train.time_limit_minutes=-5",
    "export.scaling_factor=.inf", "export.scaling_factor=0", "reconstruction.pixel_weight=.nan",
    "reconstruction.logvar_init=.inf", "gan.weight=-0.5", "gan.adaptive_weight_max=0", "gan.lecam_decay=1.5",
    "regularizer.kl.weight=.inf", "regularizer.kl.cycle_ratio=.nan", "regularizer.vq.beta=-0.25",
    "regularizer.vq.ema_decay=1.0", "data.resize=-1", "data.prefetch_factor=0",
])
def test_non_finite_or_negative_hyper_parameters_are_refused_at_load(override):
    """One ConfigError naming the key, before torch or numpy sees the value."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [override])
