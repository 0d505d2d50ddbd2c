"""The only module that imports compiled code: checks dtype and contiguity, then dispatches.

TEMPORARY: delegates to the numpy twins until native/ lands.
"""
from __future__ import annotations

from . import _reference

letterbox_to_blob = _reference.letterbox_to_blob
warp_faces_to_batch = _reference.warp_faces_to_batch
decode_scrfd = _reference.decode_scrfd
nms = _reference.nms
