"""Everything kubelet speaks: plugin registration, the DRA gRPC services and their sockets."""
