"""The built wheel carries every subpackage and data file, not only what an editable install sees."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from tests.conftest import REPO


def test_wheel_contains_all_packages_and_data(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("tao_core-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in ("tao_core", "tao_core/engine", "tao_kernels", "tao_plugins", "tao_plugins/scorers", "tao_plugins/tasks"):
        assert f"{pkg}/__init__.py" in names, pkg
    assert any(n.startswith("tao_plugins/data/sql/") and n.endswith(".sqlite") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[tao]" in text and "builtin-scorers = tao_plugins.scorers" in text
    assert "tao = tao_core.cli:main" in text
