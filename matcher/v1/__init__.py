"""Generated gRPC stubs for the matcher.v1 contract (protos/matcher/v1/matcher.proto).

Regenerate with ``python scripts/gen_protos.py``; never edit the *_pb2*.py files by hand.
"""
