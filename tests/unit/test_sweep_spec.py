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
