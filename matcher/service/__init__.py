"""The gRPC service: server, servicer, engine (batched analysis + decisions), batching,
tokens, metrics and the audit log."""
