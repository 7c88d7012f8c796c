"""Bring your own model: a width-prunable model defined in this file alone (a residual MLP
the library does not ship) runs through every part RABO has, including ``rabo simulate`` and
``rabo local`` (real worker processes), with nothing added to the library.

This module is also the model plugin: importing it registers the model (the test runs the
commands with ``RABO_MODEL_PLUGINS=test_custom_model``, as docs/models.md describes).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from model_util import fd_central_error

from rabo.masks import MaskSpec, kept_count
from rabo.models import PrunableModel, register_model
from rabo.submodel import Axis, ParamLayout, extract, scatter

ROOT = Path(__file__).resolve().parents[1]
KIND = "test-residual-mlp"


class ResidualMLP(PrunableModel):
    """h = relu(W0 x + b0); h = h + relu(W1 h + b1); logits = head(h). One unit group, "h",
    prunes W0's rows, both axes of W1 and the head's columns."""

    def __init__(self, input_shape: tuple[int, ...], classes: int, width: int) -> None:
        self.inputs, self.classes, self.width = math.prod(input_shape), classes, width
        self.groups = {"h": width}
        h = Axis("h")
        self.layout = {
            "fc0.weight": ParamLayout((width, self.inputs), (h, None)),
            "fc0.bias": ParamLayout((width,), (h,)),
            "res.weight": ParamLayout((width, width), (h, h)),
            "res.bias": ParamLayout((width,), (h,)),
            "head.weight": ParamLayout((classes, width), (None, h)),
            "head.bias": ParamLayout((classes,), (None,)),
        }
        self.head_names = ("head.weight", "head.bias")
        self.backbone_names = ("fc0.weight", "fc0.bias", "res.weight", "res.bias")

    def features(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.linear(inputs.flatten(1), params["fc0.weight"], params["fc0.bias"]))
        h = h + F.relu(F.linear(h, params["res.weight"], params["res.bias"]))
        return self.scaled(h, self.width)

    def head(self, params: Mapping[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, params["head.weight"], params["head.bias"])

    def layer_flops(self, ratio: float = 1.0, batch: int = 1) -> dict[str, int]:
        k = kept_count(ratio, self.width)
        return {"fc0": 2 * batch * k * self.inputs, "res": 2 * batch * k * k,
                "head": 2 * batch * self.classes * k}

    def activation_numel(self, ratio: float = 1.0, batch: int = 1) -> int:
        k = kept_count(ratio, self.width)
        return batch * (self.inputs + 4 * k + self.classes)


def _factory(model_cfg: Any, input_shape: tuple[int, ...], classes: int) -> ResidualMLP:
    return ResidualMLP(input_shape, classes, int(model_cfg.options.get("width", 48)))


register_model(KIND, _factory)

SETTINGS = ["data.dataset=digits", f"model.kind={KIND}", "model.options={width: 40}",
            "clients.count=3", "clients.ratios=[1.0, 0.5, 0.25]"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["RABO_MODEL_PLUGINS"] = "test_custom_model"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT),
                                         env.get("PYTHONPATH", "")])
    return env


def _rabo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    sets = [a for s in SETTINGS for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "rabo.cli", *args, *sets], env=_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("policy", ["static", "rolling", "random"])
def test_extract_scatter_round_trip_on_the_custom_model(policy: str) -> None:
    model = ResidualMLP((1, 8, 8), 10, 12)
    params = model.init(0)
    for ratio in (1.0, 0.5, 0.25):
        sp = model.slice_plan(MaskSpec(policy, ratio, 3, seed=5))
        sub = extract(params, sp)
        assert sub["res.weight"].shape == (kept_count(ratio, 12),) * 2
        # the submodel runs as it is, and scattering it back restores the full model
        assert model.forward(sub, torch.randn(4, 1, 8, 8)).shape == (4, 10)
        back = scatter({k: torch.zeros_like(t) for k, t in params.items()}, sp, sub)
        kept = {k: back[k] != 0 for k in back}
        assert all(torch.equal(back[k][kept[k]], params[k][kept[k]]) for k in back)
        assert sum(int(m.sum()) for m in kept.values()) == sp.numel()


def test_unknown_and_broken_models_are_named() -> None:
    from rabo import config
    from rabo.errors import ConfigError
    from rabo.job import Job

    with pytest.raises(ConfigError, match="unknown model 'no-such-model'; known: .*mlp"):
        Job.from_config(config.load(None, ["data.dataset=digits", "model.kind=no-such-model"]))

    class Broken(ResidualMLP):
        def __init__(self) -> None:
            super().__init__((1, 8, 8), 10, 8)
            self.layout["res.weight"] = ParamLayout((8, 9), (Axis("h"), Axis("h")))

    register_model("test-broken", lambda c, s, n: Broken())
    with pytest.raises(ConfigError, match="res.weight axis 1 has size 9, but group 'h'"):
        Job.from_config(config.load(None, ["data.dataset=digits", "model.kind=test-broken"]))
    with pytest.raises(ConfigError, match="the built-in mlp takes no options"):
        config.load(None, ["model.options={width: 3}"])


@pytest.mark.parametrize("task_kind", ["A", "B"])
def test_estimators_agree_with_exact_on_the_custom_model(task_kind: str) -> None:
    err = fd_central_error(ResidualMLP((1, 8, 8), 10, 16), task_kind)
    assert err < 5e-3, err


@pytest.mark.slow
def test_rabo_simulate_and_rabo_local_train_the_custom_model(tmp_path: Path) -> None:
    sim = _rabo("simulate", "--rounds", "40", "--out", str(tmp_path / "sim"))
    assert sim.returncode == 0, sim.stdout[-2000:] + sim.stderr[-2000:]
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert summary["config"]["model"]["kind"] == KIND
    assert summary["test_acc"] > 0.6  # ten classes: chance is 0.1
    local = _rabo("local", "--workers", "3", "--rounds", "3", "--out", str(tmp_path / "local"),
                  "--set", "cluster.heartbeat_misses=30")
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-2000:]
    records = [json.loads(line) for line in
               (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert sorted(c["ratio"] for c in records[-1]["clients"]) == [0.25, 0.5, 1.0]
