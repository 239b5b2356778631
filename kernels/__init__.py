"""tao_kernels: fused log-prob, entropy and KL from hidden states, without [tokens, vocab] logits.

Usable on its own: nothing here imports ``tao_core``.
"""
