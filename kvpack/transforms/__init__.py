"""Transforms between a K/V tensor and its codec: the tensor plan, un-RoPE, rotation, outliers, mixed widths."""
