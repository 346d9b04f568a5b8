"""Every preset builds, is counted without allocation, and `molden models` lists it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from molden.cli.app import app
from molden.errors import MoldenConfigError
from molden.models.presets import PRESETS, SOURCES, build_backbone, count_parameters, preset


def test_every_preset_has_a_source_and_cpu_presets_stay_small():
    assert set(SOURCES) == set(PRESETS)
    for name in PRESETS:
        if name.endswith("_cpu"):
            assert count_parameters(preset(name)) < 250_000, name
        else:
            assert count_parameters(preset(name)) > 500_000, name


def test_cpu_presets_build_real_modules_with_the_counted_parameters():
    for name in (n for n in PRESETS if n.endswith("_cpu")):
        backbone = build_backbone(preset(name))
        assert sum(p.numel() for p in backbone.parameters()) == count_parameters(preset(name))


def test_models_command_lists_every_preset_with_its_count():
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == set(PRESETS)
    assert rows["painn_cpu"]["equivariant"] and not rows["gns_qm9_cpu"]["equivariant"]
    assert rows["gns_qm9_paper"]["parameters"] == count_parameters(preset("gns_qm9_paper"))


def test_an_unknown_preset_names_the_known_ones():
    with pytest.raises(MoldenConfigError, match="gns_qm9_cpu"):
        preset("gns_huge")
