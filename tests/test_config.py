from pathlib import Path

import pytest

from recsys_metric.config import Config, config_from_dict, load_config
from recsys_metric.errors import ConfigError


def test_defaults_are_the_documented_ones():
    c = Config()
    assert c.label.like_threshold == 4.0 and c.label.dislike_threshold == 2.0
    assert c.split.method == "temporal"
    assert c.data.max_reject_fraction == 0.01
    assert c.eval.ks == (10, 20, 50)
    assert c.train.loss == "triplet"


def test_every_field_has_a_docstring():
    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            assert field.description, f"{prefix}{name} has no docstring"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")

    for name, field in Config.model_fields.items():
        walk(field.annotation, f"{name}.")


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"train\.epochz: unknown key"):
        config_from_dict({"train": {"epochz": 3}})
    with pytest.raises(ConfigError, match=r"modell: unknown key"):
        config_from_dict({"modell": {}})


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.dim: Input should be a valid integer"):
        config_from_dict({"model": {"dim": "big"}})
    with pytest.raises(ConfigError, match=r"split\.method"):
        config_from_dict({"split": {"method": "random"}})


def test_contradictory_values_are_rejected():
    with pytest.raises(ConfigError, match="dislike_threshold 4.0 must be below like_threshold 3.0"):
        config_from_dict({"label": {"like_threshold": 3, "dislike_threshold": 4}})
    with pytest.raises(ConfigError, match="rating_scale low 5.0 is above high 1.0"):
        config_from_dict({"data": {"rating_scale": [5, 1]}})


def test_yaml_and_toml_files_load_the_same(tmp_path: Path):
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  columns:\n    user_id: uid\n  rating_scale: [0.5, 5]\ntrain:\n  epochs: 7\n")
    t = tmp_path / "c.toml"
    t.write_text('[data]\nrating_scale = [0.5, 5]\n[data.columns]\nuser_id = "uid"\n[train]\nepochs = 7\n')
    a, b = load_config(y), load_config(t)
    assert a == b
    assert a.data.columns.user_id == "uid" and a.data.rating_scale == (0.5, 5.0) and a.train.epochs == 7


def test_config_file_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "c.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="use a .yaml, .yml or .toml file"):
        load_config(bad)
    broken = tmp_path / "c.toml"
    broken.write_text("[train\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(broken)
    listy = tmp_path / "c.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_config_round_trips_through_dict():
    c = config_from_dict({"model": {"dim": 32, "distance": "cosine"}})
    assert config_from_dict(c.to_dict()) == c


def test_auto_negatives_scale_with_the_catalogue_within_bounds():
    train = Config().train
    assert train.negatives == "auto"
    assert [train.negatives_for(n) for n in (50, 1_000, 9_724, 16_980, 100_000)] == [10, 10, 19, 30, 30]
    assert config_from_dict({"train": {"negatives": 7}}).train.negatives_for(100_000) == 7
    with pytest.raises(ConfigError, match=r"train\.negatives"):
        config_from_dict({"train": {"negatives": 0}})
    with pytest.raises(ConfigError, match=r"train\.negatives"):
        config_from_dict({"train": {"negatives": "many"}})


def test_auto_user_balance_follows_the_split_method():
    train = Config().train
    assert train.user_balance == "auto"
    assert train.user_balance_for("user_holdout") == 0.5
    assert train.user_balance_for("temporal") == 0.0
    fixed = config_from_dict({"train": {"user_balance": 0.25}}).train
    assert fixed.user_balance_for("user_holdout") == fixed.user_balance_for("temporal") == 0.25
    with pytest.raises(ValueError, match="split_method must be 'temporal' or 'user_holdout', got 'random'"):
        train.user_balance_for("random")
    with pytest.raises(ConfigError, match=r"train\.user_balance"):
        config_from_dict({"train": {"user_balance": 1.5}})
    assert train.item_centric_weight == "auto"
    assert train.item_centric_weight_for("user_holdout") == 0.5
    assert train.item_centric_weight_for("temporal") == 0.0
    per_user = train.for_split("user_holdout")
    assert (per_user.user_balance, per_user.item_centric_weight) == (0.5, 0.5)
    assert train.for_split() == train.for_split("temporal") != per_user
    assert per_user.for_split("temporal") is per_user, "a resolved config stays as it is"
    with pytest.raises(ConfigError, match=r"train\.item_centric_weight"):
        config_from_dict({"train": {"item_centric_weight": -1}})


def test_auto_lr_tries_the_candidates_and_a_fixed_rate_is_kept():
    train = Config().train
    assert train.lr == "auto" and train.lr_candidates == (0.05, 0.01)
    assert train.first_lr() == 0.05, "auto without validation trains at the first candidate"
    fixed = config_from_dict({"train": {"lr": 0.02}}).train
    assert fixed.lr == fixed.first_lr() == 0.02
    assert config_from_dict({"train": {"lr_candidates": [0.1]}}).train.first_lr() == 0.1
    with pytest.raises(ConfigError, match=r"train\.lr_candidates"):
        config_from_dict({"train": {"lr_candidates": []}})
    with pytest.raises(ConfigError, match=r"train\.lr_candidates\.1: Input should be greater than 0"):
        config_from_dict({"train": {"lr_candidates": [0.05, 0]}})
    with pytest.raises(ConfigError, match=r"train\.lr"):
        config_from_dict({"train": {"lr": 0}})
    with pytest.raises(ConfigError, match=r"lr_candidates \[0\.05, 0\.05\] repeats a rate"):
        config_from_dict({"train": {"lr_candidates": [0.05, 0.05]}})


def test_a_warm_start_caps_the_rate_or_scales_it():
    train = Config().train
    assert train.warm_start_lr_scale == "auto"
    assert train.warm_start_lr(0.05) == 0.015 and train.warm_start_lr(0.01) == 0.01
    scaled = config_from_dict({"train": {"warm_start_lr_scale": 0.3}}).train
    assert scaled.warm_start_lr(0.05) == pytest.approx(0.015)
    assert scaled.warm_start_lr(0.01) == pytest.approx(0.003)
    with pytest.raises(ConfigError, match=r"train\.warm_start_lr_scale"):
        config_from_dict({"train": {"warm_start_lr_scale": 1.5}})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"eval": {"ks": [10]}, "publish": {"gate_k": 20}},
            "publish.gate_k 20 is not one of eval.ks [10]: the gate compares the holdout Recall@gate_k, "
            "so add 20 to eval.ks or set publish.gate_k to one of them",
        ),
        ({"publish": {"gate_k": 100000}}, "publish.gate_k 100000 is not one of eval.ks [10, 20, 50]"),
        ({"eval": {"ks": [0]}}, "eval: ks [0]: cut-offs must be at least 1 (got 0)"),
        ({"eval": {"ks": [20, -5]}}, "eval: ks [20, -5]: cut-offs must be at least 1 (got -5)"),
        ({"eval": {"ks": []}}, "eval: ks is empty: give at least one cut-off"),
        ({"eval": {"max_users": 0}}, "eval.max_users: Input should be greater than or equal to 1"),
        (
            {"train": {"kernel": "numba", "optimizer": "adam"}},
            "train.kernel numba cannot run: train.optimizer adam has no per-triplet update",
        ),
        (
            {"train": {"kernel": "numba"}, "model": {"user_tower": "pooled"}},
            "train.kernel numba cannot run: model.user_tower is 'pooled'",
        ),
        (
            {"train": {"loss": "bpr", "item_centric_weight": 0.5}},
            "train.item_centric_weight 0.5 is a term of the triplet loss, but train.loss is 'bpr'",
        ),
        (
            {"split": {"method": "user_holdout", "cutoff": "2024-01-01"}},
            "split.cutoff is set but split.method is 'user_holdout'",
        ),
        (
            {"data": {"columns": {"user_id": "id", "item_id": "id"}}},
            "data.columns: user_id and item_id are both mapped to the source column 'id'",
        ),
        (
            {"data": {"columns": {"rating": "user_id"}}},
            "data.columns: user_id and rating are both mapped to the source column 'user_id'",
        ),
    ],
)
def test_rules_across_keys_are_checked_when_the_config_loads(raw, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, source="c.yaml")
    text = str(err.value)
    assert text.startswith("invalid config c.yaml: ") and message in text
    assert "\n" not in text


def test_rules_across_keys_accept_what_is_consistent():
    c = config_from_dict({"eval": {"ks": [5, 40]}, "publish": {"gate_k": 40}})
    assert c.publish.gate_k == 40
    config_from_dict({"train": {"loss": "bpr", "item_centric_weight": 0}})
    config_from_dict({"train": {"kernel": "numba", "optimizer": "sgd"}})
    config_from_dict({"split": {"method": "temporal", "cutoff": "2024-01-01"}})


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "c.yaml",
            "train:\n  epochs: [1\neval: 3\n",
            "is not valid YAML: line 3, column 5: expected ',' or ']', but got ':' (while parsing a flow sequence)",
        ),
        ("c.yaml", "train: {epochs: 1\n", "is not valid YAML: line 2, column 1"),
        ("c.yaml", "\tkey: 1\n", "is not valid YAML: line 1, column 1"),
        ("c.toml", "train = [\n", "is not valid TOML"),
        ("c.yaml", b"\xff\xfe\x00garbage", "is not valid YAML"),
    ],
)
def test_a_malformed_file_is_one_line_naming_the_file_and_line(tmp_path: Path, name, text, message):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"config file {path} ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_directory_is_not_a_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(tmp_path)
