"""Install the example third-party plugin for real, see it discovered and used, then remove it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "tao-plugin-example"


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)


def _installed() -> bool:
    return _pip("show", "tao-plugin-example").returncode == 0


@pytest.fixture
def example_installed():
    if _installed():
        pytest.fail("tao-plugin-example is already installed; this test must start from a clean environment")
    out = _pip("install", "--no-deps", "--no-build-isolation", "--quiet", str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    try:
        yield
    finally:
        _pip("uninstall", "--yes", "--quiet", "tao-plugin-example")
    assert not _installed()


def test_example_plugin_discovered_and_used(example_installed, tiny_model_dir):
    out = subprocess.run([sys.executable, "-m", "tao_core.cli", "plugins", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    plugins = {p["name"]: p for p in json.loads(out.stdout)}
    assert plugins["example"]["version"] == "0.2.0"
    assert plugins["example"]["registers"] == {"generators": ["system-prompted"], "scorers": ["concise"]}

    script = textwrap.dedent(f"""
        import json
        from tao_core import SamplingParams, get_component
        from tao_core.api import generate
        from tao_core.models import load_model
        lm = load_model({str(tiny_model_dir)!r})
        groups = generate(["What is 2 plus 3?"], SamplingParams(n=3, max_new_tokens=5, seed=0),
                          model=lm, generator="system-prompted")
        scorer = get_component("scorers", "concise")()
        from tao_core import Prompt
        scores = scorer.score(Prompt(id="p0", text="What is 2 plus 3?"), groups[0])
        print(json.dumps({{"n": len(groups[0]), "template": groups[0][0].template,
                          "system_in_prompt": "Answer in one short sentence" in lm.tokenizer.decode(
                              groups[0][0].prompt_token_ids),
                          "statuses": [s.status for s in scores]}}))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["n"] == 3 and result["template"] == "system-prompted" and result["system_in_prompt"]
    assert len(result["statuses"]) == 3 and set(result["statuses"]) <= {"ok", "abstain"}
