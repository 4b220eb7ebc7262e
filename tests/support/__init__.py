"""Test doubles that speak the real protocols: an HTTP Kubernetes API server and a kubelet-side gRPC client."""
