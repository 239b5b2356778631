"""tao's built-in generators, scorers, objectives and tasks.

Each submodule is a plugin registered under the ``tao`` entry-point group in tao-core's own
``pyproject.toml``, exactly as a third-party package would register one.
"""
