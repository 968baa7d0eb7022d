"""Model-level operations: which modules to adapt (``select``), converting and preparing a model (``convert``), its
attention, dropouts, recomputation and quantized base (``attention``, ``dropouts``, ``recompute``, ``quantization``),
merged weights (``merge``), the optimizer side (``optim``), saving and loading adapters (``adapter_state``,
``safe_load``) and PEFT's format (``peft_export``).
"""
