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


def test_example_configs_match_the_demo_settings():
    """examples/configs/{demo,label-free-arithmetic}.toml are the demos' settings, kept in step."""
    import dataclasses
    from pathlib import Path

    from tao_core.config import load_config

    here = Path(__file__).parents[1] / "examples" / "configs"
    for name, base in (("demo.toml", DEMO_CONFIG), ("label-free-arithmetic.toml", LABEL_FREE_CONFIG)):
        got = load_config(here / name)
        want = from_dict(RunConfig, {**base, "output_dir": got.output_dir, "steps_per_round": 20})
        for section in ("generate", "score", "train"):
            assert dataclasses.asdict(getattr(got, section)) == dataclasses.asdict(getattr(want, section)), (name, section)
        assert (got.task, got.model, got.rounds, got.prompts_per_step) == (want.task, want.model, 2, want.prompts_per_step)
