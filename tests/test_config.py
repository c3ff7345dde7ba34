import pytest

from harness.config import apply_overrides, build_experiment, load_experiment
from harness.errors import ConfigError

BASE = {
    "name": "x",
    "data": {"source": "digits_seg", "image_size": 32},
    "model": {"name": "unet", "width": 4},
    "kd": {"method": "response", "temperature": 3.0, "alpha": 0.5},
    "teacher": "experiments/teachers/unet16_digits.yaml",
}


def test_overrides_set_dotted_keys_and_keep_the_rest():
    cfg = build_experiment(apply_overrides(BASE, {"model.width": 8, "train.lr": 0.1}), "t")
    assert cfg.model.width == 8 and cfg.train.lr == 0.1 and cfg.kd.temperature == 3.0


def test_switching_kd_method_drops_the_old_methods_fields_but_keeps_shared_weights():
    cfg = build_experiment(apply_overrides(BASE, {"kd.method": "none"}), "t")
    assert cfg.kd.method == "none" and cfg.kd.alpha == 0.5 and not hasattr(cfg.kd, "temperature")


def test_hash_ignores_name_and_device_but_not_hyperparameters():
    a = build_experiment(BASE, "t")
    b = build_experiment({**BASE, "name": "other", "train": {"device": "cpu"}}, "t")
    c = build_experiment(apply_overrides(BASE, {"kd.temperature": 4.0}), "t")
    assert a.hash() == b.hash() != c.hash()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model.widht": 3}, "model.widht: unknown key"),
        ({"kd.method": "telepathy"}, "kd: unknown choice 'telepathy'"),
        ({"model.width": 0}, "model.width: Input should be greater than or equal to 1"),
        ({"train.epochs": "many"}, "train.epochs: Input should be a valid integer"),
        ({"teacher": None}, "needs a teacher"),
    ],
)
def test_bad_values_name_file_and_key(override, message):
    with pytest.raises(ConfigError) as err:
        build_experiment(apply_overrides(BASE, override), "exp.yaml")
    assert str(err.value).startswith("exp.yaml: ") and message in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_experiment(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(bad)
