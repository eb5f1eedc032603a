"""docs/architecture.md's "Adding a router" example, run as written: one file (its class with its own settings)
plus its registration is all a router needs to attach, route, take its settings from YAML and refuse bad ones."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from mixroute.config import ConfigError, load_config
from mixroute.mixture import Mixture, settle
from mixroute.models import tiny_model
from mixroute.routers import ROUTERS

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


@pytest.fixture
def nearest(monkeypatch):
    text = DOC.read_text()
    section = text[text.index("### Adding a router"):text.index("### Adding an expert kind")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("mixroute.routers.nearest")
    monkeypatch.setitem(sys.modules, module.__name__, module)   # dataclasses resolve annotations through it
    exec(compile(code, "docs/architecture.md", "exec"), module.__dict__)
    monkeypatch.setitem(ROUTERS, "nearest", module.NearestRouter)   # the one registry line
    return module.NearestRouter


def test_the_documented_router_attaches_routes_and_reads_its_settings(nearest):
    cfg = load_config(None, ["mixture.router=nearest", "mixture.num_experts=3",
                             "mixture.routers.nearest.init_std=0.5"]).mixture
    mix = Mixture.attach(tiny_model()[0], cfg)
    keys = torch.stack([r.keys.detach() for r in mix.routers.values()])
    assert 0.4 < float(keys.std()) < 0.6   # its own setting reached it (default 0.02)
    ids = torch.randint(10, 3000, (4, 9), generator=torch.Generator().manual_seed(0))
    out = mix(input_ids=ids, prompt_mask=torch.ones_like(ids, dtype=torch.bool))
    weights = torch.stack(list(out.routing.values()))   # (layers, 4, 3): one expert per sequence
    assert weights.shape[1:] == (4, 3) and torch.equal(weights.sum(-1), torch.ones(weights.shape[:2]))
    assert set(weights.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ConfigError, match=r"unknown key mixture.routers.nearest.init; valid keys in "
                                          r"mixture.routers.nearest: init_std \(router 'nearest'\)"):
        settle(load_config(None, ["mixture.router=nearest", "mixture.routers.nearest.init=1"]).mixture)
    with pytest.raises(ConfigError, match=r"mixture.routers.nearest.init_std: 0.0 is out of range"):
        settle(load_config(None, ["mixture.router=nearest", "mixture.routers.nearest.init_std=0.0"]).mixture)
