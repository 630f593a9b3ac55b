"""File formats: the ``.kvp`` container and safetensors KV-cache dumps."""
