"""tao's in-process sampling engine for Llama-family models.

It runs the trainer's own model (its parameter tensors, LoRA adapters included) with continuous
batching over a preallocated block KV cache, shares prompt prefixes between samples and prompts,
and returns each sampled token's log-prob under the project's one definition. It works on token
ids; text is the samplers' business (:mod:`tao_core.sampler`).

The interface (one thread adds, aborts and steps; a server runs the loop in one thread)::

    engine = Engine(model, eos_token_ids=[2], config=EngineConfig(max_kv_tokens=32768))
    results = engine.run([EngineRequest(prompt_ids, SamplingParams(n=4, seed=0))])  # to completion

    rid = engine.add_request(EngineRequest(ids, params, on_token=push))  # or drive it yourself:
    while engine.has_unfinished():
        for result in engine.step(): ...  # EngineResult: samples (SampleResult) or error

- **Requests and results.** ``EngineRequest(prompt_ids, params, stop_checker, ignore_eos,
  weight_set, on_token)``; ``add_request`` returns the request id, and a bad request is answered
  with an error result (``EngineResult.error``) without touching the others. Each
  ``SampleResult`` has ``token_ids``, ``logprobs`` (``log_softmax(logits / T)`` before truncation),
  ``finish_reason`` (``"stop"``, ``"length"``, ``"abort"``, ``"error"``) and ``top_logprobs``.
- **Weight sets.** ``add_weight_set(name, {parameter name: tensor})`` gives the engine a second set
  of parameters, such as a frozen or EMA teacher: only the named parameters are replaced, every other
  one is the policy's own tensor (never copied), and the tensors are held as given, so an in-place
  update is seen. A request picks its set with ``EngineRequest.weight_set`` (``"policy"`` by
  default); each set's requests run in forwards of their own within the same step. Cached prefixes
  are never shared between sets and are dropped when a set's tensors (or the policy's) change.
  ``remove_weight_set(name)``; ``weight_sets`` lists them.
- **Streaming.** ``EngineRequest.on_token(request_id, sample_index, token_id, logprob)`` is called
  once per sampled token, in order. If it raises, that request alone ends (``EngineResult.error``
  says why; its samples keep the tokens so far, ``finish_reason`` ``"error"``).
- **Abort.** ``abort(request_id)`` ends a waiting or running request at once: its cache blocks and
  reservation are freed and its result (``finish_reason`` ``"abort"``, partial tokens) comes with the
  next ``step()``. From inside a callback it takes effect at the end of the step.
- **Drain.** ``start_drain()`` refuses new requests (each is answered with the error "engine is
  draining") while those in flight finish; ``has_unfinished()`` says when none is left, or
  ``drain()`` steps until then and returns their results; ``resume_admission()`` accepts again.
- **Top log-probs.** ``SamplingParams.top_logprobs = k`` (0..20) returns, for every sampled
  position, the ``k`` most likely ``(token id, log-prob)`` pairs under the same definition as the
  sampled log-prob, computed on the device and read back in the step's one host transfer.

Modules: ``cache`` (blocks, prefix index), ``scheduler`` (requests, admission), ``sampling``
(temperature, top-k/top-p/min-p, per-request random streams, top log-probs), ``runner`` (the
forward pass), ``linear`` (float32 CPU linears through oneDNN), ``weights`` (weight sets), ``core``
(the step loop on token ids), ``sampler`` (``EngineSampler``, the text-level
:class:`~tao_core.sampler.Sampler`).
"""

from tao_core.engine.core import Engine, EngineConfig, weights_version
from tao_core.engine.runner import unsupported_reason
from tao_core.engine.sampler import EngineSampler
from tao_core.engine.scheduler import EngineRequest, EngineResult, SampleResult, TokenCallback
from tao_core.engine.weights import POLICY

__all__ = [
    "POLICY",
    "Engine",
    "EngineConfig",
    "EngineRequest",
    "EngineResult",
    "EngineSampler",
    "SampleResult",
    "TokenCallback",
    "unsupported_reason",
    "weights_version",
]
