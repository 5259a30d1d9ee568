import pytest
import yaml

from pgseg.config import ConfigError, dump_config, flatten, load_config, preset_names, to_dict


def test_presets_load_and_differ_only_where_documented():
    assert {"pgseg_vit_s", "groupvit_vit_s", "tiny"} <= set(preset_names())
    paper, base, tiny = load_config("pgseg_vit_s"), load_config("groupvit_vit_s"), load_config("tiny")
    assert paper.npr.enabled and not base.npr.enabled and not base.npr.i_npr and not base.npr.t_npr
    assert flatten(to_dict(paper)).keys() == flatten(to_dict(base)).keys()
    diff = {k for k, v in flatten(to_dict(paper)).items() if flatten(to_dict(base))[k] != v}
    assert diff == {"npr.enabled", "npr.i_npr", "npr.t_npr"}
    assert tiny.model.image.embed_dim < paper.model.image.embed_dim and tiny.model.image.img_size == 64


def test_yaml_file_with_base_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("base: tiny\nnpr:\n  phi: 0.3\n  lambda: 0.5\noptim: {lr: 1e-3}\n")
    cfg = load_config(path, ["npr.beta=0.2", "model.image.depths=[1, 1, 1]"])
    assert cfg.npr.phi == 0.3 and cfg.npr.lambda_ == 0.5 and cfg.npr.beta == 0.2
    assert cfg.optim.lr == pytest.approx(1e-3)  # YAML reads 1e-3 as a string: accepted as a number
    assert cfg.model.image.depths == [1, 1, 1] and cfg.model.image.embed_dim == 64
    again = load_config(yaml.safe_load(dump_config(cfg)))
    assert to_dict(again) == to_dict(cfg)  # dump → load round trip


@pytest.mark.parametrize("override, key", [
    ("npr.foo=1", "npr.foo"),
    ("modle.image.embed_dim=3", "modle"),
    ("model.image.depths=3", "model.image.depths"),
    ("npr.phi=1.5", "npr.phi"),
    ("npr.phi=-0.1", "npr.phi"),
    ("npr.mode=paperish", "npr.mode"),
    ("npr.hrs=yes please", "npr.hrs"),
    ("npr.num_prototypes=[8]", "npr.num_prototypes"),
    ("npr.num_prototypes=[8, 0]", "npr.num_prototypes"),
    ("model.image.num_heads=[5, 2, 2]", "model.image.num_heads[0]"),
    ("model.image.num_output_groups=[16]", "model.image.num_output_groups"),
    ("model.image.num_group_tokens=[16, 8, 4]", "model.image.num_group_tokens"),
    ("model.image.img_size=65", "model.image.img_size"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.weights=[1.0]", "data.weights"),
    ("optim.lr=-1", "optim.lr"),
    ("schedule.warmup_epochs=99", "schedule.warmup_epochs"),
    ("train.precision=fp8", "train.precision"),
    ("eval.resize=bicubic", "eval.resize"),
    ("npr.enabled=false", "npr.enabled"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert str(err.value).startswith(key), str(err.value)


def test_unknown_key_lists_allowed_and_bad_sources(tmp_path):
    with pytest.raises(ConfigError, match=r"npr\.lamda: unknown key .*lambda"):
        load_config("tiny", ["npr.lamda=0.1"])
    with pytest.raises(ConfigError, match="no such file, and not a preset"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("npr: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("tiny", ["npr.phi"])


def test_mode_resolves_each_switch_and_switches_override():
    official = load_config("tiny", ["npr.mode=official"]).npr.resolved()
    assert (official.matching, official.hrs_rule, official.pg_reduction, official.image_ema, official.text_ema,
            official.pg_temperature) == ("min_similarity", "column0", "pooled", False, "every_forward", "learnable")
    paper = load_config("tiny").npr.resolved()
    assert (paper.matching, paper.hrs_rule, paper.pg_reduction, paper.image_ema, paper.text_ema,
            paper.pg_temperature) == ("max_similarity", "matched_pair", "per_image_mean", True, "train_step", "fixed")
    mixed = load_config("tiny", ["npr.mode=official", "npr.matching=max_similarity"]).npr.resolved()
    assert mixed.matching == "max_similarity" and mixed.hrs_rule == "column0"
