"""The sweep plan and the typed results that travel from a trial to MLflow (no Ray, no MLflow)."""

import pytest

from orchestrator.errors import ConfigError
from orchestrator.metrics import Metrics
from orchestrator.plan import plan
from orchestrator.plan import Cluster, resolve_trial_resources
from orchestrator.results import VALIDATION_METRICS, CategoryEvaluation, ModelEvaluation, TrialResult, is_metric, tune_report
from orchestrator.search_space import METRICS as SPACE_METRICS


def test_grid_plan_resolves_every_point_once(cache_dir):
    sweep = plan({"ablation": "transfusion_steps", "data.cache_dir": str(cache_dir)}, {"epochs": 1})
    assert [p.label for p in sweep.points] == ["steps=5", "steps=10", "steps=20", "steps=50"]
    assert [p.config.steps for p in sweep.points] == [5, 10, 20, 50]
    assert all(p.config.epochs == 1 for p in sweep.points) and sweep.default_config.steps == 20
    spec = sweep.spec({"spec": "steps=10 · washer"})
    assert spec.config is sweep.points[1].config and spec.categories == ("washer",) and spec.model_groups == (("washer",),)
    assert sweep.categories == ("washer",) and sweep.per_category_trials
    assert len(sweep.trainings) == 4 and sweep.pipeline_keys == {sweep.model_key("transfusion", p.config, ["washer"], 0).key
                                                                 for p in sweep.points}


def test_condition_plan_and_optuna_plan(cache_dir):
    rows = plan({"ablation": "transfusion_final_mask", "data.cache_dir": str(cache_dir)}, {})
    assert rows.points[0].label == rows.space.default_label and len(rows.points) == 4
    optuna = plan({"ablation": "transfusion_lambda", "data.cache_dir": str(cache_dir)}, {})
    assert optuna.points == () and optuna.specs == ()
    spec = optuna.spec({"disc_weight": 0.5})
    assert spec.config.disc_weight == 0.5 and spec.id == "disc_weight=0.5" and spec.model_groups == (("washer",),)


def test_optuna_takes_a_training_epoch_without_validation(cache_dir):
    """A trial that trains reports each epoch's losses; validation comes every few epochs.
    Ray's own OptunaSearch raised KeyError on the first such report and failed the trial."""
    from orchestrator.ray_backend import param_space

    sweep = plan({"ablation": "transfusion_lambda", "data.cache_dir": str(cache_dir), "num_samples": 2}, {})
    _, search = param_space(sweep)
    search.set_search_properties(sweep.space.metric, sweep.space.mode, param_space(sweep)[0])
    search.suggest("t1")
    search.on_trial_result("t1", {"epoch": 1, "train_loss": 0.5, "training_iteration": 1})  # no metric: skipped
    search.on_trial_result("t1", {sweep.space.metric: 0.9, "training_iteration": 2})
    search.on_trial_complete("t1", {sweep.space.metric: 0.9, "training_iteration": 2})
    (trial,) = search._ot_study.get_trials()
    assert trial.intermediate_values == {2: 0.9} and trial.value == 0.9


def test_objectives_make_a_multi_objective_optuna_search(cache_dir):
    from orchestrator.ray_backend import param_space

    values = {"ablation": "transfusion_lambda", "data.cache_dir": str(cache_dir), "num_samples": 2, "max_concurrent": 1,
              "objectives": ["val_pixel_ap", "latency_ms"]}
    sweep = plan(values, {})
    assert sweep.objectives == (("val_pixel_ap", "max"), ("latency_ms", "min"))
    space, search = param_space(sweep)
    assert search.metric == ["val_pixel_ap", "latency_ms"] and search.mode == ["max", "min"]
    search.set_search_properties(None, None, space)  # what Tune does with TuneConfig(metric=None)
    assert search._ot_study.directions[1].name == "MINIMIZE"
    search.suggest("t1")
    search.on_trial_result("t1", {"epoch": 1, "training_iteration": 1})
    search.on_trial_complete("t1", {"val_pixel_ap": 0.9, "latency_ms": 40.0, "training_iteration": 2})
    assert search._ot_study.get_trials()[0].values == [0.9, 40.0]
    assert plan({**values, "objectives": []}, {}).objectives == (("val_pixel_ap", "max"),)


@pytest.mark.parametrize("values, message", [
    ({"objectives": ["val_pixel_ap", "images_per_second"]}, "add max_concurrent=1"),
    ({"objectives": ["val_aupro", "val_pixel_ap"]}, "must start with transfusion_lambda's selection metric val_pixel_ap"),
    ({"objectives": ["val_pixel_ap", "test_image_auroc"]}, "unknown objective 'test_image_auroc'"),
    ({"objectives": ["val_pixel_ap"]}, "two or more distinct objectives"),
    ({"objectives": ["val_pixel_ap", "val_aupro"], "ablation": "transfusion_steps"}, "is a grid search"),
])
def test_bad_objectives_are_one_line_errors(cache_dir, values, message):
    with pytest.raises(ConfigError, match=message):
        plan({"ablation": "transfusion_lambda", "data.cache_dir": str(cache_dir), **values}, {})


def test_multi_class_plan_sets_the_categories(cache_dir):
    sweep = plan({"ablation": "drdc_gamma", "data.cache_dir": str(cache_dir)}, {})
    assert sweep.default_config.num_categories == len(sweep.categories) and not sweep.per_category_trials
    assert sweep.spec({"gamma": 0.5}).model_groups == (tuple(sweep.categories),)


def test_space_categories_apply_only_to_its_own_dataset(tmp_path, cache_dir):
    root = tmp_path / "mvtec"
    for sub in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (root / "bottle" / sub).mkdir(parents=True)
    sweep = plan({"ablation": "transfusion_steps", "dataset": "mvtec_ad", "data.root": str(root), "data.cache_dir": str(cache_dir)}, {})
    assert sweep.categories == ("bottle",)  # the space's synthetic washer is not applied to MVTec AD


def test_benchmark_plan_runs_each_method_at_its_defaults(cache_dir):
    sweep = plan({"ablation": "benchmark_synthetic", "data.cache_dir": str(cache_dir)}, {"epochs": 1, "steps": 3})
    assert [(p.label, p.method) for p in sweep.points] == [(m, m) for m in sweep.space.methods]
    assert sweep.methods == sweep.space.methods and not sweep.per_category_trials
    for p in sweep.points:
        assert type(p.config).__module__ == f"methods.{p.method}" and p.config.epochs == 1
        spec = sweep.spec({"spec": p.label})
        assert spec.method == p.method and spec.config is p.config
    by_method = {p.method: p for p in sweep.points}
    assert by_method["transfusion"].config.steps == 3  # method.steps reaches the methods that have the field
    assert sweep.spec({"spec": "drdc"}).model_groups == (tuple(sweep.categories),)  # multi-class: one model
    assert sweep.spec({"spec": "transfusion"}).model_groups == tuple((c,) for c in sweep.categories)
    keys = {sweep.model_key(p.method, p.config, [sweep.categories[0]], 0).key for p in sweep.points}
    assert len(keys) == len(sweep.points)


def test_the_pipeline_trains_every_model_known_before_the_trials(cache_dir):
    bench = plan({"ablation": "benchmark_synthetic", "data.cache_dir": str(cache_dir)}, {})
    per_category = [m for m in bench.methods if bench.spec({"spec": m}).model_groups != (tuple(bench.categories),)]
    assert len(bench.trainings) == len(per_category) * len(bench.categories) + (len(bench.methods) - len(per_category))
    assert {(t.method, t.categories) for t in bench.trainings} >= {("transfusion", (c,)) for c in bench.categories}
    # longest expected first, and Tune's trials in the order their models come
    seconds = [t.expected.seconds for t in bench.trainings]
    assert seconds == sorted(seconds, reverse=True)
    assert bench.specs[0].method == bench.trainings[0].method
    # Optuna over inference-only axes, several categories: one default model per category
    lam = plan({"ablation": "transfusion_lambda", "data.cache_dir": str(cache_dir), "categories": ["washer", "brick"]}, {})
    assert sorted((t.categories, t.train_seed) for t in lam.trainings) == [(("brick",), 0), (("washer",), 0)]
    # a grid of one model per trial: each is in the pipeline
    assert len(plan({"ablation": "transfusion_steps", "data.cache_dir": str(cache_dir)}, {}).trainings) == 4
    # trials that sample training fields train as they go; reuse_models=false: each trial trains its own
    asha = plan({"ablation": "transfusion_lambda", "data.cache_dir": str(cache_dir)}, {})
    assert len(asha.trainings) == 1
    assert plan({"ablation": "benchmark_synthetic", "data.cache_dir": str(cache_dir), "reuse_models": False}, {}).trainings == ()


def test_auto_resources_fill_the_cluster(cache_dir):
    settings = plan({"ablation": "transfusion_steps", "data.cache_dir": str(cache_dir)}, {}).settings
    gpus = resolve_trial_resources(settings, Cluster({"CPU": 64.0, "GPU": 8.0}, "the cluster"))
    assert (gpus.gpus, gpus.max_concurrent) == (1.0, 8) and "8 GPU" in gpus.notes[1]
    cpus = resolve_trial_resources(settings, Cluster({"CPU": 4.0}, "a head"))
    assert (cpus.gpus, cpus.max_concurrent) == (0.0, 4)
    workers = plan({"ablation": "transfusion_steps", "data.cache_dir": str(cache_dir), "trial.workers": 2, "trial.gpus": 0.25}, {}).settings
    r = resolve_trial_resources(workers, Cluster({"CPU": 64.0, "GPU": 2.0}, "the cluster"))
    assert (r.gpus, r.max_concurrent, r.per_training) == (0.25, 4, {"CPU": 2.0, "GPU": 0.5})  # 2 GPUs / (2 x 0.25)
    fixed = plan({"ablation": "transfusion_steps", "data.cache_dir": str(cache_dir), "max_concurrent": 3, "trial.gpus": 0}, {}).settings
    r = resolve_trial_resources(fixed, Cluster({"CPU": 64.0, "GPU": 8.0}, "the cluster"))
    assert (r.gpus, r.max_concurrent, r.notes) == (0.0, 3, ())  # explicit numbers win


def test_seeds_repeat_grid_points_with_the_data_split_fixed(cache_dir):
    sweep = plan({"ablation": "transfusion_steps", "data.cache_dir": str(cache_dir), "seed": 4, "seeds": 3}, {})
    assert sweep.training_seeds == (4, 5, 6) and sweep.data.seed == 4
    assert {s.train_seed for s in sweep.specs if s.label == "steps=5"} == {4, 5, 6}
    assert sweep.spec({"spec": "steps=5 · washer · seed 6"}).train_seed == 6
    point = sweep.points[0]
    keys = {sweep.model_key(point.method, point.config, ["washer"], s).key for s in sweep.training_seeds}
    assert len(keys) == 3  # one stored model per training seed
    with pytest.raises(ConfigError, match="seeds=2 repeats grid points"):
        plan({"ablation": "transfusion_lambda", "data.cache_dir": str(cache_dir), "seeds": 2}, {})
    with pytest.raises(ConfigError, match="seeds must be in"):
        plan({"ablation": "transfusion_steps", "data.cache_dir": str(cache_dir), "seeds": 0}, {})


@pytest.mark.parametrize("values, overrides, message", [
    ({"method": "mdps"}, {}, "drop method=mdps"),
    ({}, {"stepz": 3}, "unknown key 'method.stepz': none of"),
])
def test_benchmark_refuses_a_method_or_a_field_no_method_has(cache_dir, values, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        plan({"ablation": "benchmark_synthetic", "data.cache_dir": str(cache_dir), **values}, overrides)
    assert "\n" not in str(err.value)


def test_invalid_method_value_is_one_line(cache_dir):
    with pytest.raises(ConfigError) as err:
        plan({"ablation": "transfusion_steps", "data.cache_dir": str(cache_dir)}, {"batch_size": 0})
    assert "batch_size" in str(err.value) and "\n" not in str(err.value)


def _metrics(x: float) -> Metrics:
    return Metrics(image_auroc=x, pixel_auroc=x / 2, aupro=x / 4, pixel_ap=x / 8)


def test_trial_result_metrics_and_round_trip():
    cats = [CategoryEvaluation("a", _metrics(0.8), _metrics(0.6), 10.0, 5.0, ["/x/a.png"]),
            CategoryEvaluation("b", _metrics(1.0), _metrics(0.4), 30.0, 7.0, [])]
    result = TrialResult([ModelEvaluation(cats[:1], 3.0), ModelEvaluation(cats[1:], 4.0)], ["k1", "k2"], 1)
    m = result.metrics()
    assert m["val_image_auroc"] == pytest.approx(0.9) and m["test_aupro"] == pytest.approx(0.125)
    assert m["test_image_auroc/a"] == 0.6 and m["test_image_auroc/b"] == 0.4
    assert m["images_per_second"] == 20.0 and m["model_train_seconds"] == 7.0 and m["models_trained"] == 1.0
    assert all(is_metric(k) for k in m) and not is_metric("time_total_s") and not is_metric("result")
    assert TrialResult.from_json(result.to_json()) == result
    assert result.sample_maps == ["/x/a.png"]
    assert ModelEvaluation.from_json(result.models[0].to_json()) == result.models[0]
    report = tune_report(result)
    assert report["model_keys"] == "k1,k2" and TrialResult.from_json(report["result"]) == result
    assert ModelEvaluation(cats, 0.0).validation() == {k: pytest.approx(v) for k, v in
                                                      {"val_image_auroc": 0.9, "val_pixel_auroc": 0.45, "val_aupro": 0.225, "val_pixel_ap": 0.1125}.items()}


def test_metric_names_have_one_definition():
    assert SPACE_METRICS == VALIDATION_METRICS == ("val_image_auroc", "val_pixel_auroc", "val_aupro", "val_pixel_ap")


@pytest.mark.slow
def test_a_trial_larger_than_the_cluster_stops_before_mlflow(tmp_path, cache_dir, capsys, ray_shutdown):
    """On the embedded (fixed-size) Ray, trial.gpus=1 on a CPU machine is one error line,
    exit 2, before the parent run exists (it used to wait forever)."""
    from orchestrator import sweep

    db = tmp_path / "mlflow.db"
    code = sweep.main(["ablation=transfusion_steps", "trial.gpus=1", f"tracking_uri=sqlite:///{db}",
                       f"storage_path={tmp_path / 'ray'}", f"data.cache_dir={cache_dir}"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # Ray logs to stderr too
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: a trial needs 1 worker(s) of 1 CPU, 1 GPU"), errors
    assert not db.exists()
