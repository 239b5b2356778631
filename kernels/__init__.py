"""tao_kernels: fused log-prob, entropy and KL from hidden states, without [tokens, vocab] logits.

Usable on its own: nothing here imports ``tao_core``.

- ``linear_logprob``: log pi(target) (and entropy) per token, forward and backward.
- ``linear_kl``: exact full-vocabulary KL(pi || pi_ref) per token from both models' hidden states.
- ``kl_estimate``: Schulman's sampled k1/k2/k3 estimators from per-token log-probs.
- ``linear_policy_loss``: the GRPO-family clipped loss plus a sampled or exact KL term.

Backends: ``"triton"`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``) and ``"torch"`` (chunked
PyTorch, the CPU path); ``"auto"`` picks. ``tao_kernels.reference`` holds the naive references that
tests and benchmarks compare against.

Layout: the three ops need the same per-row quantities of one block of logits, so they share one
pass rather than one file each. ``_chunked.py`` streams the LM head in blocks (token chunks forward,
vocabulary slices backward; the memory arithmetic is there), ``_rows.py`` (PyTorch) and
``_triton.py`` (Triton kernels) implement the row math of a block, and ``logprob.py``, ``kl.py`` and
``policy_loss.py`` register each op as a ``torch.library`` custom op (with a fake implementation, so
it is one opaque node in ``torch.compile`` graphs) and hold its functional API and its math.
"""

if __name__ != "tao_kernels":
    # This directory is installed as ``tao_kernels`` but, with the repository root on sys.path (pytest,
    # ``PYTHONPATH=.``), it is also importable as ``kernels``: the name of Hugging Face's kernels package,
    # which ``import transformers`` imports to probe for it. Running the modules a second time would
    # re-register the ``tao_kernels::`` custom ops, which destroys the first registration and leaves
    # ``tao_kernels``' op handles dangling (use-after-free: "ValueError: vector::reserve", bad_alloc).
    import sys

    import tao_kernels

    sys.modules[__name__] = tao_kernels
else:
    from .kl import kl_estimate, linear_kl
    from .logprob import linear_logprob
    from .policy_loss import PolicyLossOutput, linear_policy_loss

__all__ = ["PolicyLossOutput", "kl_estimate", "linear_kl", "linear_logprob", "linear_policy_loss"]
