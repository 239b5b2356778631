"""The `tao demo` configurations are valid and the label-free one never sees an answer."""

from __future__ import annotations

from click.testing import CliRunner

from tao_core.cli import DEMO_CONFIG, LABEL_FREE_CONFIG, STRUCTURED_TEMPLATES, cli
from tao_core.config import RunConfig, from_dict, validate


def test_demo_configs_validate():
    for base in (DEMO_CONFIG, LABEL_FREE_CONFIG):
        validate(from_dict(RunConfig, {**base, "output_dir": "unused", "steps_per_round": 20}))


def test_label_free_demo_scores_by_consensus_of_structured_voters():
    cfg = from_dict(RunConfig, {**LABEL_FREE_CONFIG, "output_dir": "unused"})
    assert cfg.score.scorer == "majority-vote"  # no verifier, no calculator
    assert cfg.score.options["voters"] == list(STRUCTURED_TEMPLATES)
    assert "default" in cfg.generate.options["templates"]  # the on-policy samples that are trained
    assert all("{question}" in t for t in STRUCTURED_TEMPLATES.values())


def test_label_free_rejects_a_scorer():
    result = CliRunner().invoke(cli, ["demo", "--label-free", "--scorer", "majority-vote"])
    assert result.exit_code == 2 and "--label-free sets its own scorer" in result.output


def test_example_configs_validate():
    from pathlib import Path

    from tao_core.config import load_config

    configs = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        validate(load_config(path), where=str(path))
