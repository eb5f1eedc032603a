"""The library's routers (centroid, arrow) beyond the router contract (their rows are in
tests/test_mixture_matrix.py): their prototypes survive a save and decide as documented."""

from __future__ import annotations

import pytest
import torch

from mixroute.config import MixtureConfig
from mixroute.mixture import Mixture
from mixroute.models import tiny_model


@pytest.mark.parametrize("router", ["centroid", "arrow"])
@torch.no_grad()
def test_prototypes_are_saved_and_decide(router, tmp_path):
    mix = Mixture.attach(tiny_model()[0], MixtureConfig(router=router, num_experts=3, experts={"lora": {"rank": 4}}))
    torch.manual_seed(0)
    for r in mix.routers.values():
        r.prototypes.normal_()
    ids = torch.randint(10, 3000, (2, 8), generator=torch.Generator().manual_seed(0))
    before = mix(input_ids=ids).routing
    mix.save(str(tmp_path / "m"))
    loaded = Mixture.load(tiny_model()[0], str(tmp_path / "m"))
    for key, r in loaded.routers.items():
        torch.testing.assert_close(r.prototypes, mix.routers[key].prototypes)
    after = loaded(input_ids=ids).routing
    for key in before:
        torch.testing.assert_close(after[key], before[key])


def test_centroid_picks_the_nearest_prototype_and_arrow_ignores_sign():
    from mixroute.routers.base import RouterDims
    from mixroute.routers.arrow import ArrowRouter
    from mixroute.routers.centroid import CentroidRouter

    cfg = MixtureConfig(router="centroid", num_experts=3, routers={"centroid": {"top_k": 1}})
    c = CentroidRouter(cfg, RouterDims(4, 3))
    c.prototypes.copy_(torch.eye(3, 4))
    hidden = torch.tensor([[[0.1, 0.0, 2.0, 0.0], [0.0, 0.0, 1.0, 0.1]]])
    route = c(hidden, None, None)
    assert route.index.tolist() == [2] and route.logits.shape == (1, 3)
    a = ArrowRouter(MixtureConfig(router="arrow", num_experts=3,
                                  routers={"arrow": {"arrow_top_k": 2}}), RouterDims(4, 3))
    a.prototypes.copy_(torch.eye(3, 4))
    w = a(-hidden, None, None).weights          # a negated token scores the same: |cos|
    torch.testing.assert_close(w, a(hidden, None, None).weights)
    assert (w > 0).sum(-1).tolist() == [[2, 2]] and int(w[0, 0].argmax()) == 2
