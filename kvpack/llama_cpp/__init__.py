"""llama.cpp state files (slot / session) as kvpack caches: the GGUF's facts, the source compress reads, the writer."""
