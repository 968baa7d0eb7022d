"""The math: LoRA-FA adapters and what they compute.

``base`` (the adapter: frozen A, trained B, scale, merging), ``linear`` / ``router`` / ``multihead`` / ``experts``
(the adapters of a linear layer, a MoE router, ``nn.MultiheadAttention``, fused MoE experts), ``correction`` (B's
gradient correction), ``initialization`` (A's draw), ``dropout`` / ``dropout_masks`` / ``seeded_attention`` (dropout
that keeps a seed instead of a mask), ``find`` (the adapters in a model).
"""
