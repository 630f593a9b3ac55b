"""Restoring a ``.kvp``: selections, piecewise decoding, tensors in memory and safetensors files."""
