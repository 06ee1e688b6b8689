"""The run's settings (crowdkernels.engine.config): the train options declared beside the fields, the quick
defaults as a recipe, and the errors that name an option."""
from __future__ import annotations

import dataclasses

import pytest

from crowdkernels.engine import MODEL_DEFAULTS, recipes
from crowdkernels.engine.config import (TrainConfig, TrainError, build_config, cli_options,
                                        run_config)


def test_each_option_is_declared_once_and_sets_a_field():
    opts = cli_options()
    assert len({o.flag for o in opts}) == len(opts) and len({o.order for o in opts}) == len(opts)
    groups = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for o in opts:
        head, _, rest = o.key.partition(".")
        assert head in groups, o.flag
        assert not rest or isinstance(TrainConfig().to_dict()[head], dict), o.flag
    assert [o.order for o in opts] == sorted(o.order for o in opts)


def test_the_quick_defaults_are_the_0_1_0_table():
    assert {k: dict(v) for k, v in MODEL_DEFAULTS.items()} == {
        "hmode": {"lr": 2e-5, "epochs": 200, "lr_step": 100, "crop": 256, "crop_sha": 128, "batch_size": 8},
        "hmode-official": {"lr": 2e-5, "epochs": 200, "lr_step": 100, "crop": 256, "crop_sha": 128, "batch_size": 8},
        "l2sm": {"lr": 1e-4, "epochs": 200, "lr_step": None, "crop": None, "crop_sha": None, "batch_size": 1},
        "spn": {"lr": 1e-4, "epochs": 200, "lr_step": None, "crop": None, "crop_sha": None, "batch_size": 1},
        "csrnet": {"lr": 1e-5, "epochs": 200, "lr_step": None, "crop": 256, "crop_sha": 128, "batch_size": 8},
    }
    for name, recipe in recipes.QUICK.items():
        assert recipe["model"].value == name
        assert all(c.source for c in recipe.values())


@pytest.mark.parametrize("dataset, facts", [("shanghaitech-a", {"crop": 128}),
                                           ("ucf-qnrf", {"max_size": [1920, 1080]}), ("jhu", {})])
def test_the_dataset_facts_of_the_quick_defaults(dataset, facts):
    """The 0.1.0 build_config's hard-coded facts, now read from the datasets' specs."""
    hmode, l2sm = build_config(model="hmode", dataset=dataset), build_config(model="l2sm", dataset=dataset)
    assert hmode.crop == facts.get("crop", 256) and l2sm.crop is None  # a whole-image model keeps whole images
    assert hmode.max_size == l2sm.max_size == facts.get("max_size")
    assert hmode.recipe is None and hmode.batch_size == 8


def test_run_config_names_the_option_at_fault(tmp_path):
    with pytest.raises(TrainError, match=r"^--loss-weights \(criterion_kwargs.weights\): the 'l2sm' loss has no option"):
        run_config(overrides={"model": "l2sm", "criterion_kwargs.weights": [1.0]})
    with pytest.raises(TrainError, match="no run to continue"):
        run_config(out=tmp_path, resume=True)
    config = run_config(root=tmp_path, out=tmp_path / "run", overrides={"resume": True})
    assert config.root == str(tmp_path) and config.out == str(tmp_path / "run") and config.resume is False
