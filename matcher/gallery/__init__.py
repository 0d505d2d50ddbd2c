"""Who is booked and how a probe is decided: the SQLite store, templates at rest, the FAISS
index, snapshots, the primary and replica galleries, and the decision rules.

Knows nothing of gRPC or ONNX Runtime.
"""
