"""Config loading: defaults, overrides and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from rabo import config
from rabo.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load() -> None:
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files, "configs/*.yaml must ship the defaults"
    for f in files:
        cfg = config.load(f)
        assert cfg.rounds >= 1


def test_defaults_and_overrides() -> None:
    cfg = config.load(None, ["estimator.name=exact", "rounds=7", "clients.ratios=[1, 0.5]"])
    assert cfg.estimator.name == "exact" and cfg.rounds == 7
    assert cfg.clients.ratios == [1.0, 0.5]
    assert config.load(None).estimator.name == "fd-central"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["bogus=1"], r"bogus: unknown key; allowed keys here: seed, rounds"),
        (["estimator.nme=exact"], r"estimator.nme: unknown key; did you mean .name.\? allowed "
                                  r"keys here: name,"),
        (["estimator.name=magic"], r"estimator.name: 'magic' is not allowed; choose one of "
                                   r"'fd-central', 'fd-forward', 'exact', 'neumann'"),
        (["rounds=ten"], r"rounds: expected an integer, got 'ten'"),
        (["rounds=0"], r"rounds: 0 is out of range; allowed: >= 1"),
        (["rounds=true"], r"rounds: expected an integer"),
        (["clients.participation=1.5"], r"clients.participation: 1.5 is out of range; "
                                        r"allowed: > 0 and <= 1"),
        (["clients.ratios=[1, 2]"], r"clients.ratios\[1\]: must be in \(0, 1\]"),
        (["clients.memory_budgets=[lots]"], r"clients.memory_budgets\[0\]: 'lots' is not a byte"),
        (["model.hidden=[]"], r"model.hidden: an MLP needs at least one hidden layer"),
        (["model=3"], r"model: expected a mapping"),
        (["data.split=random"], r"data.split: 'random' is not allowed; choose one of 'iid'"),
        (["policy.ladder=[]"], r"policy.ladder: must hold at least one ratio"),
        (["model.kind=cnn", "data.dataset=mnist1d"], r"model.kind: cnn needs image data"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(None, overrides)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml: not found"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config.load(bad)
    bad.write_text("inner:\n  steps: -1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: inner.steps: -1 is out of range"):
        config.load(bad)


def test_override_syntax() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config.load(None, ["rounds"])
    with pytest.raises(ConfigError, match="rounds is not a section"):
        config.load(None, ["rounds=3", "rounds.x=1"])


def test_describe_lists_every_key_with_help() -> None:
    rows = config.describe()
    keys = {r[0] for r in rows}
    assert {"estimator.delta", "mask.policy", "policy.safety", "lower_level"} <= keys
    assert all(r[3] for r in rows)


def test_docs_config_md_is_current() -> None:
    assert (ROOT / "docs" / "config.md").read_text() == config.markdown(), \
        "docs/config.md is stale: run `rabo config --markdown > docs/config.md`"


def test_exponent_without_a_dot_is_a_number() -> None:
    assert config.load(None, ["outer.lr=1e-9"]).outer.lr == 1e-9
    with pytest.raises(ConfigError, match="outer.lr: expected a number, got 'fast'"):
        config.load(None, ["outer.lr=fast"])


def test_byte_sizes_and_lists() -> None:
    from rabo.units import parse_byte_list, parse_bytes

    assert parse_bytes("512MiB") == 512 << 20 and parse_bytes("1.5GB") == 1_500_000_000
    assert parse_byte_list(" 96MiB, 40MiB ,16MiB,") == [96 << 20, 40 << 20, 16 << 20]
    with pytest.raises(ValueError, match="12XB"):
        parse_byte_list("96MiB,12XB")
    with pytest.raises(ValueError, match="names no size"):
        parse_byte_list(" , ")


def test_misspelt_keys_and_values_get_a_suggestion() -> None:
    from rabo import config
    from rabo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"estimater: unknown key; did you mean 'estimator'\?"):
        config.load(None, ["estimater.name=exact"])
    with pytest.raises(ConfigError, match=r"outer.lrr: unknown key; did you mean 'lr'\?"):
        config.load(None, ["outer.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'exakt' is not allowed; did you mean 'exact'\? "
                                          r"choose one of"):
        config.load(None, ["estimator.name=exakt"])
    with pytest.raises(ConfigError) as info:  # nothing close: no guess
        config.load(None, ["zzz=1"])
    assert "did you mean" not in str(info.value)


def test_config_init_writes_a_commented_starter_that_loads_back(tmp_path) -> None:
    import subprocess
    import sys

    from rabo import config

    target = tmp_path / "mine.yaml"
    run = [sys.executable, "-m", "rabo.cli", "config", "--init", str(target), "--set",
           "estimator.name=exact", "--set", "clients.ratios=[1, 0.5]"]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = target.read_text()
    assert "rounds: 30  # communication rounds Q" in text
    assert "  name: exact  # " in text  # nested keys indented, each with its help
    want = config.load(None, ["estimator.name=exact", "clients.ratios=[1, 0.5]"])
    assert config.to_dict(config.load(target)) == config.to_dict(want)
    again = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    assert subprocess.run([*run, "--force"], capture_output=True, timeout=120).returncode == 0
