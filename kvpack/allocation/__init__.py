"""Bit allocation: a code width per group, chosen over every group of a file at once."""
