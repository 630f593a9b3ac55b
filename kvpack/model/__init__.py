"""Models: running a transformers causal LM to dump its KV cache, and persisting / restoring that cache."""
