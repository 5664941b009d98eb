"""The base model and its LoRA adapter: loading, pooling, ranks, training and the multi-process launch."""
