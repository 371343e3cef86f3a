"""Typed model configs: every registered JSON file loads and round-trips; a bad field is one
ModelError that names it."""

from __future__ import annotations

import json

import pytest

from retrieval.embedding.config import HeadConfig, ModelConfig
from retrieval.embedding.factory import _CONFIG_DIR, list_models
from retrieval.errors import ModelError


@pytest.mark.parametrize("name", list_models())
def test_registered_configs_load_and_round_trip(name):
    raw = json.loads((_CONFIG_DIR / f"{name}.json").read_text())
    cfg = ModelConfig.from_dict(raw, source=name)
    assert cfg.to_dict() == raw
    assert cfg.embed_dim > 0 and cfg.image_tower.taps and cfg.text_tower.layers


def test_defaults_live_in_the_dataclasses():
    cfg = ModelConfig.from_dict(
        {
            "embed_dim": 8,
            "image_tower": {"type": "efficientnet_lite", "variant": "lite0"},
            "text_tower": {"type": "hf", "model": "package:x"},
        }
    )
    assert cfg.head == HeadConfig(hidden=0, dropout=0.0)
    assert cfg.image_tower.taps == ("head",) and cfg.text_tower.layers == (-1,) and cfg.text_tower.context_length == 64


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"embed_dim": "256"}, "cfg.embed_dim"),
        ({"head": {"hidden": 1.5}}, "cfg.head.hidden"),
        ({"head": {"widht": 3}}, "widht"),
        ({"image_tower": {"type": "efficientnet_lite"}}, "cfg.image_tower.variant is missing"),
        ({"text_tower": {"type": "hf", "model": "m", "layers": [-1, "x"]}}, "cfg.text_tower.layers[1]"),
        ({"embed_dim": True}, "cfg.embed_dim"),
    ],
)
def test_a_bad_field_is_one_error_naming_it(patch, field):
    raw = {
        "embed_dim": 8,
        "image_tower": {"type": "efficientnet_lite", "variant": "lite0"},
        "text_tower": {"type": "hf", "model": "package:x"},
        **patch,
    }
    with pytest.raises(ModelError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig.from_dict(raw, source="cfg")
