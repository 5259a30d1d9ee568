"""Sweep files: every key checked against the config schema before any trial; grid × variants expanded."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, **spec) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": "tiny", **spec}))
    return path


def test_grid_and_variants_expand_to_trials(tmp_path):
    from pipelines.tune import load_sweep

    spec = load_sweep(_write(tmp_path, space={"npr.phi": {"grid": [0.1, 0.3]}, "optim.lr": {"loguniform": [1e-4, 1e-2]}},
                             variants=[{"name": "a", "set": {"npr.hrs": False}}, {"name": "b", "set": {}}]))
    trials = spec.trial_values()
    assert [label for label, _ in trials] == ["a npr.phi=0.1", "a npr.phi=0.3", "b npr.phi=0.1", "b npr.phi=0.3"]
    assert trials[1][1] == {"npr.hrs": False, "npr.phi": 0.3}


@pytest.mark.parametrize("spec, message", [
    ({"space": {"npr.phii": {"grid": [0.1]}}}, "space.npr.phii: npr.phii: unknown key"),
    ({"space": {"npr.phi": {"grid": [2.0]}}}, "space.npr.phi: npr.phi: must be in [0, 1]"),
    ({"space": {}}, "space: the search space is empty"),
    ({"space": {"npr.phi": {"range": [0, 1]}}}, "space.npr.phi: expected one of {grid, choice, uniform, loguniform"),
    ({"space": {"optim.lr": {"loguniform": [0, 1]}}}, "space.optim.lr.loguniform: give [low, high] with low < high and low > 0"),
    ({"variants": [{"name": "x", "set": {"npr.foo": 1}}]}, "variants[0] (x): npr.foo: unknown key"),
    ({"variants": [{"name": "x", "set": {"npr.enabled": False}}]}, "variants[0] (x): npr.enabled: is false"),
    ({"variants": [{"name": "x", "set": {}}, {"name": "x", "set": {}}]}, "variants: every variant needs a name of its own"),
    ({"variants": [{"name": "x", "set": {}}], "baseline": "y"}, "baseline: 'y' is not one of the variants"),
])
def test_bad_sweep_files_name_the_key(tmp_path, spec, message):
    from pgseg.config import ConfigError
    from pipelines.tune import load_sweep

    with pytest.raises(ConfigError) as err:
        load_sweep(_write(tmp_path, **spec))
    assert message in str(err.value)


def test_ready_sweep_files_load():
    from pipelines.tune import load_sweep

    files = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
    assert files
    for path in files:
        spec = load_sweep(path)
        assert spec.trial_values()
        if spec.data_stages is not None:  # only the data stages run before the trials: the others need a model
            assert spec.data_stages.stages == ["sources", "download"], path.name


def test_seeds_repeat_every_point_and_set_the_model_and_data_seeds(tmp_path):
    from pipelines.tune import load_sweep

    spec = load_sweep(_write(tmp_path, seeds=[0, 1, 2], variants=[{"name": "off", "set": {"npr.hrs": False}},
                                                                  {"name": "on", "set": {}}]))
    trials = spec.trial_values()
    assert [label for label, _ in trials] == [f"{v} seed={s}" for v in ("off", "on") for s in (0, 1, 2)]
    config = spec.config(trials[4][1])
    assert (config.train.seed, config.data.seed, config.npr.hrs) == (1, 1, True)
    assert spec.config(trials[0][1]).npr.hrs is False
    alone = load_sweep(_write(tmp_path, seeds=[3, 5]))  # seeds alone: the base config's spread over seeds
    assert [label for label, _ in alone.trial_values()] == ["default seed=3", "default seed=5"]


@pytest.mark.parametrize("spec, message", [
    ({"seeds": [0, 0]}, "seeds: give a non-empty list of distinct integers >= 0"),
    ({"seeds": []}, "seeds: give a non-empty list"),
    ({"seeds": [1, -2]}, "seeds: give a non-empty list"),
    ({"seeds": [0, 1], "space": {"train.seed": {"grid": [0, 1]}}}, "seeds: train.seed is also swept"),
    ({"seeds": [0, 1], "variants": [{"name": "x", "set": {"data.seed": 3}}]}, "seeds: data.seed is also swept"),
])
def test_bad_seeds_name_the_problem(tmp_path, spec, message):
    from pgseg.config import ConfigError
    from pipelines.tune import load_sweep

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_sweep(_write(tmp_path, **spec))


def _rows(values: dict[tuple[str, int], float]):
    from pipelines.tune import TrialRow

    return [TrialRow(f"{v}{s}", v, f"{v} seed={s}", {"seed": s}, "finished", 8, 8, {"eval/dev/mIoU": m}, m)
            for (v, s), m in values.items()]


def test_seed_statistics_pair_each_variant_with_the_baseline_by_seed(tmp_path):
    from pipelines.tune import load_sweep
    from pipelines.tune.stats import seed_statistics, verdict

    spec = load_sweep(_write(tmp_path, seeds=[0, 1, 2], metric="eval/dev/mIoU",
                             variants=[{"name": "off", "set": {"npr.enabled": True, "npr.i_npr": False,
                                                                "npr.t_npr": False}}, {"name": "on", "set": {}}]))
    # seeds move both variants together (0.10, 0.20, 0.30): unpaired the two overlap, paired "on" is 1-3 points up
    values = {("off", 0): 0.10, ("off", 1): 0.20, ("off", 2): 0.30, ("on", 0): 0.12, ("on", 1): 0.21, ("on", 2): 0.33}
    off, on = seed_statistics(spec, _rows(values))
    t2 = 4.302652729911275  # Student's t, 97.5 % quantile, 2 degrees of freedom (tables)
    assert (off["variant"], off["runs"], off["diverged"], off["pairs"]) == ("off", 3, 0, None)
    assert off["dev mIoU mean"] == pytest.approx(20.0) and off["std"] == pytest.approx(10.0)
    assert off["CI95 low"] == pytest.approx(20 - t2 * 10 / 3 ** 0.5, abs=1e-3)
    assert off["CI95 high"] == pytest.approx(20 + t2 * 10 / 3 ** 0.5, abs=1e-3)
    assert on["CI95 low"] < off["dev mIoU mean"] < on["CI95 high"]  # unpaired: no visible difference
    # paired differences 2, 1, 3 points: mean 2, std 1
    assert on["pairs"] == 3 and on["Δ mean"] == pytest.approx(2.0)
    assert on["Δ CI95 low"] == pytest.approx(2 - t2 / 3 ** 0.5, abs=1e-3)
    assert on["Δ CI95 high"] == pytest.approx(2 + t2 / 3 ** 0.5, abs=1e-3)
    assert 0 < on["p"] < 0.1
    assert "includes zero" in verdict(on, "off")
    values[("on", 1)] = 0.225  # differences 2, 2.5, 3: the interval moves above zero
    assert "above zero" in verdict(seed_statistics(spec, _rows(values))[1], "off")


def test_a_diverged_or_failed_seed_is_counted_and_left_out_of_the_pairs(tmp_path):
    from pipelines.tune import load_sweep
    from pipelines.tune.stats import seed_statistics, verdict

    spec = load_sweep(_write(tmp_path, seeds=[0, 1, 2], metric="eval/dev/mIoU",
                             variants=[{"name": "off", "set": {"npr.hrs": False}}, {"name": "on", "set": {}}]))
    rows = _rows({("off", 0): 0.1, ("off", 1): 0.2, ("off", 2): 0.3, ("on", 0): 0.2, ("on", 1): 0.3, ("on", 2): 0.4})
    rows[4].last["eval/dev/mIoU"] = float("nan")  # "on" seed 1 diverged
    rows[2].status = "failed"  # "off" seed 2 failed
    off, on = seed_statistics(spec, rows)
    assert (off["runs"], off["diverged"], on["runs"], on["diverged"]) == (3, 1, 3, 1)
    assert off["dev mIoU mean"] == pytest.approx(15.0) and on["dev mIoU mean"] == pytest.approx(30.0)
    assert on["pairs"] == 1 and on["Δ mean"] == pytest.approx(10.0)  # only seed 0 has both
    assert on["Δ CI95 low"] != on["Δ CI95 low"]  # one pair: no interval (nan)
    assert "fewer than two paired seeds" in verdict(on, "off")


def test_a_metric_scored_only_by_the_final_model_needs_no_scheduler(tmp_path):
    from pgseg.config import ConfigError
    from pipelines.tune import load_sweep
    from pipelines.tune.spec import check_metric

    plain = load_sweep(_write(tmp_path, metric="eval/final/mIoU", seeds=[0, 1]))
    check_metric(plain, ["dev"], ["final"])  # scored once at the last step: fine without a scheduler
    with pytest.raises(ConfigError, match="names eval set 'test'; the trials score dev, final"):
        check_metric(load_sweep(_write(tmp_path, metric="eval/test/mIoU", seeds=[0, 1])), ["dev"], ["final"])
    asha = load_sweep(_write(tmp_path, metric="eval/final/mIoU", seeds=[0, 1], scheduler="asha"))
    with pytest.raises(ConfigError, match=r"eval/final/mIoU is scored once, by the final model .* asha scheduler"):
        check_metric(asha, ["dev"], ["final"])
    check_metric(load_sweep(_write(tmp_path, metric="eval/dev/mIoU", seeds=[0, 1], scheduler="asha")), ["dev"], ["final"])
    best = load_sweep(_write(tmp_path, metric="eval/best_mIoU", seeds=[0, 1]))
    check_metric(best, ["dev"], [])
    with pytest.raises(ConfigError, match="eval/best_mIoU .* only eval.final_datasets.*eval/final/mIoU"):
        check_metric(best, [], ["final"])  # nothing would ever report it
