"""The Lightning integration: the ``LoraFA`` callback, the ``MemoryReport`` callback, adapter-only checkpoints,
and the strategies (DDP, FSDP1, FSDP2) and sharding helpers."""
