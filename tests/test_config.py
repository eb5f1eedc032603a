"""Typed config: YAML, overrides, errors naming the key and what is valid, resolved config written."""

import pytest
import yaml

from mixroute.config import ConfigError, MovedKeyWarning, RunConfig, describe_fields, load_config, save_config
from mixroute.experts import expert_settings
from mixroute.mixture import settle
from mixroute.routers import router_settings


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("mixture:\n  router: poly\n  routers:\n    poly:\n      n_splits: 4\ntrain:\n  max_steps: 7\n")
    cfg = load_config(p, ["train.lr=0.001", "data.categories=[a, b]", "model.name=null",
                          "mixture.experts.lora.mlp_only=true"])
    assert cfg.mixture.router == "poly" and router_settings(cfg.mixture).n_splits == 4
    assert cfg.train.max_steps == 7 and cfg.train.lr == 0.001
    assert cfg.data.categories == ["a", "b"] and cfg.model.name is None
    assert expert_settings(cfg.mixture).mlp_only is True and expert_settings(cfg.mixture).rank == 8
    assert isinstance(load_config(None, ["train.lr=1"]).train.lr, float)


def test_old_flat_mixture_keys_move_to_their_owners_with_a_warning(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("mixture:\n  router: token_topk\n  top_k: 2\n  rank: 4\n  gate_hidden: 32\n")
    with pytest.warns(MovedKeyWarning, match=r"mixture.top_k -> mixture.routers.task.top_k and "
                                             r"mixture.routers.token_topk.top_k"):
        cfg = load_config(p)
    assert router_settings(cfg.mixture).top_k == 2 and expert_settings(cfg.mixture).rank == 4
    # an old dump holds every router's keys: each lands with the routers that read it, none is lost
    assert settle(cfg.mixture).routers["gate"].gate_hidden == 32
    with pytest.raises(ConfigError, match="mixture.rank and mixture.experts.lora.rank are both set"):
        load_config(p, ["mixture.experts.lora.rank=8"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("mixture.expert=foo", "mixture.expert: 'foo' is not valid; expected one of lora, dora, prompt"),
        ("mixture.routers.task.eta=-0.5",
         "mixture.routers.task.eta: -0.5 is out of range; must be >= 0.0 (router 'task')"),
        ("mixture.experts.lora.mlp_only=3",
         "mixture.experts.lora.mlp_only: 3 (int) is not valid; expected bool (expert kind 'lora')"),
        ("mixture.routers.task.etaa=1", "unknown key mixture.routers.task.etaa; valid keys in "
                                        "mixture.routers.task: top_k, eta, route_train"),
        ("mixture.routers.nope.x=1", "mixture.routers.nope: no router declares settings of that name; valid: "),
        ("mixture.experts.prompt.inject_layer=-1", "mixture.experts.prompt.inject_layer: -1 is out of range"),
    ],
)
def test_bad_router_and_expert_settings_name_key_and_valid(override, message):
    cfg = load_config(None, [override])   # typed against their owners' Config when the mixture is settled
    with pytest.raises(ConfigError) as e:
        settle(cfg.mixture)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.method=nope", "train.method: 'nope' is not valid"),
        ("mixture.num_experts=0", "mixture.num_experts: 0 is out of range; must be >= 1"),
        ("train.max_steps=1.5", "train.max_steps: 1.5 (float) is not valid; expected int"),
        ("train.max_stepz=3", "unknown key train.max_stepz; valid keys in train: method, max_steps"),
        ("bogus=1", "unknown key bogus; valid keys in the top level"),
        ("data.max_length=abc", "data.max_length: 'abc' (str) is not valid"),
        ("mixture.experts=3", "mixture.experts: 3 (int) is not valid; expected dict"),
        ("train", "not of the form key=value"),
    ],
)
def test_bad_values_name_key_and_valid(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(p)
    p.write_text("train:\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key train.warmup"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["mixture.num_experts=3", "output_dir=runs/x"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    data = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert data["mixture"]["num_experts"] == 3
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def test_every_field_is_documented():
    from mixroute.experts import EXPERT_KINDS
    from mixroute.routers import ROUTERS

    rows = describe_fields(RunConfig)
    for owner in [*ROUTERS.values(), *EXPERT_KINDS.values()]:   # each router's and expert kind's own settings
        rows += describe_fields(owner.Config, f"{owner.__name__}.")
    assert len(rows) > 60
    undocumented = [key for key, _tp, _d, help_text in rows if len(help_text) < 10]
    assert undocumented == []


def test_a_run_records_every_routers_settings(tmp_path):
    """config.yaml holds every router's and expert kind's settings with their defaults (a later default change
    cannot alter what an old run says it ran), and reads back as the same config."""
    from mixroute import rundir

    cfg = load_config(None, ["mixture.routers.task.eta=0.3", f"output_dir={tmp_path}"])
    rundir.write_config(tmp_path, cfg)
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert data["mixture"]["routers"]["task"] == {"top_k": 1, "eta": 0.3, "route_train": "router"}
    assert data["mixture"]["routers"]["gate"]["gate_hidden"] == 256 and data["mixture"]["experts"]["lora"]["rank"] == 8
    again = rundir.read_config(tmp_path)
    assert rundir.recorded_config(again) == rundir.recorded_config(cfg)


def test_router_names_are_checked_against_the_registry():
    """Router names belong to mixroute.routers (one file + one registry line per router), not to the config's
    types: a config loads with any string, the mixture refuses an unknown one with the valid names."""
    from mixroute.mixture import validate_mixture
    from mixroute.routers import ROUTERS

    cfg = load_config(None, ["mixture.router=foo"])
    with pytest.raises(ConfigError) as err:
        validate_mixture(cfg.mixture)
    assert "mixture.router: 'foo' is not valid" in str(err.value) and ", ".join(ROUTERS) in str(err.value)


def test_a_bare_no_is_the_word_for_a_choice_named_no():
    # YAML reads model.precision=no as False; the choice is the word
    assert load_config(None, ["model.precision=no"]).model.precision == "no"
    with pytest.raises(ConfigError, match="model.precision"):
        load_config(None, ["model.precision=yes"])


def test_exponent_floats_without_a_dot():
    # YAML 1.1 reads 5e-5 as the string '5e-05'
    assert load_config(None, ["train.lr=5e-5"]).train.lr == 5e-5
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=fast"])


def test_a_retired_key_loads_with_a_warning_that_says_what_replaced_it(tmp_path):
    from mixroute.config import RetiredKeyWarning

    p = tmp_path / "old.yaml"   # a config.yaml an older mixroute wrote into a run directory
    p.write_text("federated:\n  clients: 3\n  inject_failures: ['2:1']\n")
    with pytest.warns(RetiredKeyWarning, match=r"federated.inject_failures is retired and ignored: failure "
                                               r"injection is a test aid"):
        cfg = load_config(str(p))
    assert cfg.federated.clients == 3 and not hasattr(cfg.federated, "inject_failures")
    with pytest.raises(ConfigError, match="unknown key federated.inject_failure;"):   # a typo is still an error
        load_config(None, ["federated.inject_failure=[]"])
