"""`unidra fleet`: the cluster-wide view of every node's accelerators, read-only.

view (pure: objects in, report out) <- watch (list+watch per kind) -> render (tables, JSON,
YAML) and metrics (Prometheus); service wires them for the command.
"""
