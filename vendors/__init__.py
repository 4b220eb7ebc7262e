"""Vendor backends: each turns one vendor's hardware into Unidra's common device model."""
