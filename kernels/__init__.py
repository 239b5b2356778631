"""tao_kernels: fused log-prob, entropy and KL from hidden states, without [tokens, vocab] logits.

Usable on its own: nothing here imports ``tao_core``.

- ``linear_logprob``: log pi(target) (and entropy) per token, forward and backward.
- ``linear_kl``: exact full-vocabulary KL(pi || pi_ref) per token from both models' hidden states.
- ``kl_estimate``: Schulman's sampled k1/k2/k3 estimators from per-token log-probs.
- ``linear_policy_loss``: the GRPO-family clipped loss plus a sampled or exact KL term.

Backends: ``"triton"`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``) and ``"torch"`` (chunked
PyTorch, the CPU path); ``"auto"`` picks. ``tao_kernels.reference`` holds the naive references.
"""

from .kl import kl_estimate, linear_kl
from .logprob import linear_logprob
from .policy_loss import PolicyLossOutput, linear_policy_loss

__all__ = ["PolicyLossOutput", "kl_estimate", "linear_kl", "linear_logprob", "linear_policy_loss"]
