"""Face photos for the suites (tests/data/faces; LFW when present) and the InsightFace peer."""
from __future__ import annotations

import csv
import itertools
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Photo:
    file: str
    identities: tuple[str, ...]
    faces: int
    data: bytes


def faces_dir() -> Path:
    """tests/data/faces in the checkout, or $MATCHER_FACES_DIR (as tests/conftest.py)."""
    override = os.environ.get("MATCHER_FACES_DIR")
    path = Path(override) if override else REPO / "tests" / "data" / "faces"
    if not (path / "labels.csv").exists():
        raise FileNotFoundError(f"face photos not found at {path} (labels.csv missing); "
                                "unset MATCHER_FACES_DIR to use tests/data/faces")
    return path


def lfw_dir() -> Path | None:
    """../shared/data/lfw-dev beside the checkout, or $MATCHER_LFW_DIR; None if absent.

    Too large for the repository (79 MB), so a benchmark that wants it runs without it and
    says so in one line rather than failing on a fresh clone.
    """
    override = os.environ.get("MATCHER_LFW_DIR")
    path = Path(override) if override else REPO.parent / "shared" / "data" / "lfw-dev"
    if (path / "labels.csv").exists():
        return path
    print(f"lfw-dev not found at {path}: skipping the LFW figures "
          "(set MATCHER_LFW_DIR to its folder)", flush=True)
    return None


def load_photos() -> list[Photo]:
    root = faces_dir()
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [Photo(r["file"], tuple(r["identity"].split(";")), int(r["faces"]),
                  (root / r["file"]).read_bytes()) for r in rows]


def pair_scores(templates: dict[str, np.ndarray], identity: dict[str, str]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of every pair of single-face photos: (genuine, impostor) float64 arrays."""
    genuine, impostor = [], []
    for a, b in itertools.combinations(sorted(templates), 2):
        score = float(templates[a] @ templates[b])
        (genuine if identity[a] == identity[b] else impostor).append(score)
    return np.asarray(genuine), np.asarray(impostor)


class FaceAnalysisPeer:
    """InsightFace's FaceAnalysis on copies of our two ONNX files in a temporary model root.

    Nothing is downloaded and ~/.insightface is not touched. ``sess_options`` None keeps
    InsightFace's own ONNX Runtime defaults (all cores, spinning threads): the reference
    as people run it.
    """

    def __init__(self, det_size: tuple[int, int] = (640, 640), sess_options=None) -> None:
        from insightface.app import FaceAnalysis

        from matcher.face.models import DETECTOR_FILE, EMBEDDER_FILE, vectron_model_dir

        self._tmp = tempfile.TemporaryDirectory(prefix="insightface_root_")
        pack = Path(self._tmp.name) / "models" / "buffalo_s"
        pack.mkdir(parents=True)
        for name in (DETECTOR_FILE, EMBEDDER_FILE):
            shutil.copyfile(vectron_model_dir() / name, pack / name)
        kwargs = {"sess_options": sess_options} if sess_options is not None else {}
        self.app = FaceAnalysis(name="buffalo_s", root=self._tmp.name,
                                providers=["CPUExecutionProvider"], **kwargs)
        self.app.prepare(ctx_id=-1, det_size=det_size)
        self.detector = self.app.det_model
        self.recognizer = self.app.models["recognition"]

    def get(self, rgb: np.ndarray) -> list:
        """FaceAnalysis.get on the BGR version of our decoded RGB pixels."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # scikit-image deprecation inside
            return self.app.get(np.ascontiguousarray(rgb[:, :, ::-1]))

    def close(self) -> None:
        self._tmp.cleanup()
