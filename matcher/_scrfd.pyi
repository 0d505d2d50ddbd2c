# What matcher/_native.py calls in the compiled native/scrfd.pyx (mypy cannot read
# Cython); the .pyx signatures are the truth, this only lets mypy check the dispatcher.
from collections.abc import Callable
from typing import TypeVar

import numpy as np

_Outputs = TypeVar("_Outputs")

def decode_candidates(scores: tuple[np.ndarray, ...], boxes: tuple[np.ndarray, ...],
                      kps: tuple[np.ndarray, ...], strides: tuple[int, ...], input_w: int,
                      num_anchors: int, threshold: float, inv_scale: float,
                      allocate: Callable[[int], _Outputs]) -> _Outputs: ...
def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, keep: np.ndarray) -> int: ...
