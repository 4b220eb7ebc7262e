"""`unidra demo`: the whole story on one machine, with an embedded API server and a kubelet stand-in."""
