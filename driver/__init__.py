"""Unidra: one Kubernetes DRA kubelet plugin for every kind of accelerator."""

__version__ = "0.1.0"
