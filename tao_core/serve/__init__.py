"""``tao serve``: an OpenAI-compatible HTTP server over tao's engine.

Layers, in the order a request passes through them:

| module | what it does |
|---|---|
| ``app`` | the FastAPI routes, OpenAI-shaped errors, the lifespan (start the engine loop; drain it at shutdown) |
| ``completions`` | one chat or completion request: body, prompt tokens, the engine submission, the whole or streamed answer |
| ``protocol`` | request checks: a :class:`~tao_core.serve.protocol.GenerationRequest` or a 400 naming the field |
| ``engine_loop`` | the one thread that owns the engine: continuous batching, tokens back to each request's queue |
| ``text``, ``responses`` | tokens to text (stop strings cut as tao's samplers cut them), OpenAI's response shapes |
| ``exchange``, ``metrics`` | every exchange for the inference table (:class:`~tao_core.serve.exchange.ExchangeLogger`), ``/metrics`` |
| ``auth``, ``keys`` | bearer API keys (``tao keys``), admin keys, per-key rate limits, the loopback-open mode |
| ``versions``, ``admin`` | model versions swapped with no dropped request; ``POST /admin/reload`` and ``/admin/rollback`` |
| ``settings``, ``cli`` | :class:`ServeConfig` and the ``tao serve`` command |
| ``threads`` | torch work outside the engine thread runs in a passing thread, so the engine's OpenMP pool is the only one |

Only ``app`` and ``completions`` import FastAPI/Starlette; importing this package does not.
"""

from tao_core.serve.settings import ServeConfig

__all__ = ["ServeConfig"]
