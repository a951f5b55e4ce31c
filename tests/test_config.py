"""Config grammar: overrides, presets, one-line errors listing what is valid."""

import pytest

from orchestrator.config import build_settings, parse_overrides, resolve_method_config
from orchestrator.errors import ConfigError


def test_parse_overrides_splits_method_fields_and_types_values():
    settings, method = parse_overrides(["ablation=transfusion_steps", "categories=[a,b]", "trial.workers=2", "method.steps=10", "resume=true"])
    assert settings == {"ablation": "transfusion_steps", "categories": ["a", "b"], "trial.workers": 2, "resume": True}
    assert method == {"steps": 10}


def test_build_settings_applies_nested_keys_over_base():
    s = build_settings({"data.root": "/x", "trial.gpus": 1}, base={"dataset": "mvtec_ad", "trial": {"cpus": 4}})
    assert (s.dataset, s.data.root, s.trial.gpus, s.trial.cpus) == ("mvtec_ad", "/x", 1.0, 4.0)


def test_unknown_settings_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        build_settings({"trial.gpu": 1})
    assert "trial.gpu" in str(err.value) and "trial.gpus" in str(err.value)
    assert "\n" not in str(err.value)


def test_ill_typed_value_is_a_config_error():
    with pytest.raises(ConfigError, match="trial.workers"):
        build_settings({"trial.workers": "many"})


def test_bad_argument_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["transfusion_steps"])


def test_method_config_layers_and_errors():
    paper = resolve_method_config("transfusion", "paper")
    smoke = resolve_method_config("transfusion", "smoke")
    assert paper.image_size != smoke.image_size  # the smoke preset really applies
    overridden = resolve_method_config("transfusion", "smoke", {"epochs": 3}, {"epochs": 4})
    assert overridden.epochs == 4  # later layers win
    with pytest.raises(ConfigError) as err:
        resolve_method_config("transfusion", "smoke", {"no_such_field": 1})
    assert "method.no_such_field" in str(err.value) and "method.epochs" in str(err.value)
    with pytest.raises(ConfigError, match="epochs"):
        resolve_method_config("transfusion", "smoke", {"epochs": "lots"})


@pytest.mark.parametrize("uri, shown", [
    ("postgresql://mlflow:hunter2@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ("https://token@mlflow.example/", "https://***@mlflow.example/"),
    ("s3://bucket/x?access_key=AK&secret_key=SK&region=eu", "s3://bucket/x?access_key=***&secret_key=***&region=eu"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),  # nothing to hide: unchanged
    ("/local/folder", "/local/folder"),
])
def test_credentials_never_leave_a_uri(uri, shown):
    from orchestrator.config import redact_uri

    assert redact_uri(uri) == shown


def test_an_unreachable_tracking_server_names_it_without_credentials():
    from orchestrator.plan import check_tracking_uri

    with pytest.raises(ConfigError, match="is not reachable") as err:
        check_tracking_uri("http://user:hunter2@127.0.0.1:9")
    assert "hunter2" not in str(err.value)
