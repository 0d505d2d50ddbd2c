# What matcher/_native.py calls in the compiled native/imaging.pyx (mypy cannot read
# Cython); the .pyx signatures are the truth, this only lets mypy check the dispatcher.
import numpy as np

def letterbox_to_blob(image: np.ndarray, out: np.ndarray, new_h: int, new_w: int,
                      mean: float, inv_std: float) -> None: ...
def warp_faces_to_batch(image: np.ndarray, inverse_transforms: np.ndarray, out: np.ndarray,
                        mean: float, inv_std: float) -> None: ...
