"""tao: tune a language model from unlabeled prompts (Test-time Adaptive Optimization).

The core holds the data contracts, the plugin manager, model loading, sampling, training and the
pipeline; generators, scorers, objectives and tasks come from plugins (``tao_plugins`` for the
built-ins) registered under the ``tao`` entry-point group.
"""

from tao_core.errors import ModelLoadError, PluginError, TaoError, TaoInputError
from tao_core.hookspecs import hookimpl
from tao_core.plugins import get_component, get_plugin_manager, get_registry
from tao_core.types import Candidate, Prompt, SamplingParams, Score, read_jsonl, write_jsonl

__version__ = "0.1.0"

__all__ = [
    "Candidate",
    "ModelLoadError",
    "PluginError",
    "Prompt",
    "SamplingParams",
    "Score",
    "TaoError",
    "TaoInputError",
    "get_component",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "read_jsonl",
    "write_jsonl",
    "load_model",
    "LoadedModel",
]


def __getattr__(name: str):
    # Model loading pulls in torch; keep `import tao_core` cheap for plugin discovery.
    if name in ("load_model", "LoadedModel"):
        from tao_core import models

        return getattr(models, name)
    raise AttributeError(f"module 'tao_core' has no attribute {name!r}")
