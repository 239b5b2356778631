"""tao's in-process sampling engine for Llama-family models.

It runs the trainer's own model (its parameter tensors, LoRA adapters included) with continuous
batching over a preallocated block KV cache, shares prompt prefixes between samples and prompts,
and returns each sampled token's log-prob under the project's one definition.

Modules: ``cache`` (blocks, prefix index), ``scheduler`` (requests, admission), ``sampling``
(temperature, top-k/top-p/min-p, per-request random streams), ``runner`` (the forward pass),
``linear`` (float32 CPU linears through oneDNN), ``core`` (the step loop on token ids),
``sampler`` (``EngineSampler``, the text-level :class:`~tao_core.sampler.Sampler`).
"""

from tao_core.engine.core import Engine, EngineConfig, weights_version
from tao_core.engine.runner import unsupported_reason
from tao_core.engine.sampler import EngineSampler
from tao_core.engine.scheduler import EngineRequest, EngineResult, SampleResult

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineRequest",
    "EngineResult",
    "EngineSampler",
    "SampleResult",
    "unsupported_reason",
    "weights_version",
]
