"""From photo bytes to templates: decode, detect, align, quality, embed (ONNX Runtime).

Knows nothing of galleries or gRPC.
"""
