# All metadata lives in pyproject.toml; this shim lets old pip versions do editable installs.
from setuptools import setup

setup()
