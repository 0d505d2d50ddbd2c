"""decode -> detect -> align -> embed: pure functions on arrays around two ORT sessions.

Shapes and conventions follow the reference InsightFace pipeline exactly (RGB planes,
(x - 127.5) / 128 for SCRFD, (x - 127.5) / 127.5 for the embedder, 5-point similarity to
the ArcFace template), so templates are interchangeable with it.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .. import _native
from ..templates import ALIGNED_SIZE, EMBEDDING_DIM
from .alignment import alignment_transforms
from .decode import DEFAULT_LIMITS, DecodeLimits, ReducedImage, decode_image, decode_reduced
from .models import ModelPack, Sessions, default_pack, load_sessions
from .quality import DEFAULT_POLICY, Quality, QualityPolicy, assess

DET_MEAN, DET_INV_STD = 127.5, 1.0 / 128.0
EMB_MEAN, EMB_INV_STD = 127.5, 1.0 / 127.5
STRIDES = (8, 16, 32)
ANCHORS_PER_CELL = 2
# Faces per embedder run: larger batches cost more per face on CPU
# (docs/pipeline.md#embedder-batch).
EMBED_CHUNK = 8
# Bump when code changes what templates come out (resampling, alignment, normalisation):
# the shipped score model then no longer describes the served scores and must be re-derived.
SCORE_REVISION = 1


@dataclass(frozen=True)
class DetectorConfig:
    """How SCRFD is run.

    input_size: fixed (width, height) letterbox as in the reference, e.g. (640, 640); None
        scales each image down (never up) to a long side of ``max_side``, padded to a
        multiple of 32.
    fallback_max_side: if no face reaches ``confident_score`` in an image larger than
        ``max_side``, detect again at up to this long side (None: never); keep the better.

    Why these defaults (speed vs parity with 640x640): docs/pipeline.md#detector-size.
    """

    input_size: tuple[int, int] | None = None
    max_side: int = 320
    fallback_max_side: int | None = 640
    # A face below the quality gate's detection score is rejected: no need to look again.
    confident_score: float = QualityPolicy.min_det_score
    score_threshold: float = 0.5
    nms_iou: float = 0.4
    max_faces: int = 64

    def __post_init__(self) -> None:
        if self.input_size is not None and (len(self.input_size) != 2
                                            or min(self.input_size) < 32):
            raise ValueError(f"input_size must be (width, height) >= 32, got: {self.input_size}")
        if self.max_side < 32:
            raise ValueError(f"max_side must be >= 32, got: {self.max_side}")

    def fallback(self) -> DetectorConfig | None:
        """The config of the second, larger pass; None when there is none."""
        if self.input_size is not None or self.fallback_max_side is None \
                or self.fallback_max_side <= self.max_side:
            return None
        return replace(self, max_side=self.fallback_max_side, fallback_max_side=None)


@dataclass(frozen=True)
class DecodeScaling:
    """How large JPEGs are decoded: at 1/2, 1/4 or 1/8 of their size (libjpeg DCT scaling).

    The detector gets the largest reduction that still covers its biggest pass; each face
    is warped from pixels with at least ``min_crop_resolution`` source pixels per template
    pixel, decoding that photo again, finer, only where a face is too small. Other formats
    and JPEGs under twice the detector's biggest pass always decode at full size.

    Off by default: it saves decode CPU on photos with large faces but costs more on small
    ones and moves templates (docs/pipeline.md#decode-scaling). When on it is part of
    ``score_settings``, so it needs a score model made with it.
    """

    enabled: bool = False
    min_crop_resolution: float = 2.0

    def __post_init__(self) -> None:
        if self.min_crop_resolution < 1.0:
            raise ValueError(f"min_crop_resolution must be >= 1 (source pixels per template "
                             f"pixel), got: {self.min_crop_resolution}")


@dataclass(frozen=True)
class DecodedPhoto:
    """A photo as the pipeline analyses it: pixels at 1/``reduced.reduction`` of full size,
    and its bytes, to decode a face too small at that reduction again, finer."""

    reduced: ReducedImage
    data: bytes = b""

    @classmethod
    def full(cls, image: np.ndarray) -> DecodedPhoto:
        """An already decoded (H, W, 3) uint8 RGB image at full size."""
        return cls(ReducedImage(image, 1, (image.shape[1], image.shape[0])))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, 3) of the full-size image: what face boxes and landmarks refer to."""
        width, height = self.reduced.full_size
        return height, width, 3


@dataclass(frozen=True)
class Detections:
    """Faces found in one image, highest score first; pixel coordinates of that image.

    boxes (n, 4) float32 x1y1x2y2; scores (n,) float32; kps (n, 5, 2) float32
    (left eye, right eye, nose tip, left and right mouth corner, as seen in the image).
    """

    boxes: np.ndarray
    scores: np.ndarray
    kps: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def to_full_size(self, reduced: ReducedImage) -> Detections:
        """These detections, made on ``reduced.pixels``, in full-size image pixels."""
        if reduced.reduction == 1:
            return self
        r = float(reduced.reduction)
        shift = np.array(reduced.offset, dtype=np.float32) + np.float32((r - 1) / 2)
        return Detections(self.boxes * np.float32(r) + np.tile(shift, 2), self.scores,
                          self.kps * np.float32(r) + shift)


@dataclass(frozen=True)
class Face:
    bbox: np.ndarray
    kps: np.ndarray
    det_score: float
    quality: Quality
    template: np.ndarray  # (512,) float32, L2-normalised

    @property
    def area(self) -> float:
        return float((self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1]))


@dataclass
class StageTimings:
    """Milliseconds spent per stage, for responses and metrics.

    ``clock`` is wall time by default; ``time.thread_time`` gives the calling thread's CPU
    time instead (what the benchmarks add up as the stage sum: immune to other processes,
    exact for single-threaded ONNX Runtime sessions).
    """

    ms: dict[str, float] = field(default_factory=dict)
    clock: Callable[[], float] = time.perf_counter

    def add(self, stage: str, started: float) -> None:
        """Add the time since ``started`` (a value of ``self.clock()``) to ``stage``."""
        self.ms[stage] = self.ms.get(stage, 0.0) + (self.clock() - started) * 1e3


def score_settings(pack: ModelPack, detector: DetectorConfig, quality: QualityPolicy,
                   scaling: DecodeScaling = DecodeScaling(), flip: bool = False
                   ) -> dict[str, Any]:
    """Everything that moves a template's score or decides which faces are searched, for a
    pipeline built with these settings. A function, so that a driver which never loads
    the models (the re-index on Ray) can fingerprint the pipeline its workers build."""
    return {"model_id": pack.model_id, "detector_sha256": pack.detector.sha256,
            "embedder_sha256": pack.embedder.sha256, "revision": SCORE_REVISION,
            "detector": asdict(detector), "quality": asdict(quality),
            **({"decode_scaling": asdict(scaling)} if scaling.enabled else {}),
            **({"flip": True} if flip else {})}


def settings_hash(settings: dict[str, Any]) -> str:
    """The one fingerprint of pipeline settings (``score_settings``): 16 hex digits."""
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def letterbox_geometry(height: int, width: int, config: DetectorConfig
                       ) -> tuple[int, int, int, int, float]:
    """(input_h, input_w, new_h, new_w, det_scale) for an image of this size."""
    if config.input_size is not None:
        input_w, input_h = config.input_size
        # The reference's arithmetic, kept verbatim so detections agree with it.
        if height / width > input_h / input_w:
            new_h = input_h
            new_w = int(new_h / (height / width))
        else:
            new_w = input_w
            new_h = int(new_w * (height / width))
        return input_h, input_w, new_h, new_w, new_h / height
    scale = min(1.0, config.max_side / max(height, width))
    new_h = max(1, int(round(height * scale)))
    new_w = max(1, int(round(width * scale)))
    return (32 * math.ceil(new_h / 32), 32 * math.ceil(new_w / 32), new_h, new_w, new_h / height)


class Pipeline:
    """Stateless apart from the ORT sessions; safe to call from several threads."""

    def __init__(self, pack: ModelPack | None = None, *,
                 detector: DetectorConfig = DetectorConfig(),
                 quality: QualityPolicy = DEFAULT_POLICY,
                 limits: DecodeLimits = DEFAULT_LIMITS, threads: int = 1,
                 sessions: Sessions | None = None,
                 scaling: DecodeScaling = DecodeScaling(), flip: bool = False) -> None:
        self.pack = pack or default_pack()
        # Flip test-time augmentation: a template is embed(face) + embed(mirrored face).
        # Off by default: on lfw-dev it did not clear the bar docs/pipeline.md states.
        self.flip = flip
        self.detector_config = detector
        self.quality_policy = quality
        self.limits = limits
        self.scaling = scaling
        self.sessions = sessions or load_sessions(self.pack, threads)
        self._det_outputs = [o.name for o in self.sessions.detector.get_outputs()]

    @property
    def model_id(self) -> str:
        return self.pack.model_id

    def score_settings(self) -> dict[str, Any]:
        """Everything that moves a template's score or decides which faces are searched."""
        return score_settings(self.pack, self.detector_config, self.quality_policy,
                              self.scaling, self.flip)

    def settings_hash(self) -> str:
        """The fingerprint of ``score_settings`` (16 hex digits)."""
        return settings_hash(self.score_settings())

    # -- stages -------------------------------------------------------------------

    def decode(self, data: bytes) -> np.ndarray:
        """Full-size (H, W, 3) uint8 RGB pixels."""
        return decode_image(data, self.limits)

    def decode_scaled(self, data: bytes) -> DecodedPhoto:
        """The photo as ``analyse`` wants it: a large JPEG at the largest DCT reduction that
        still holds the detector's biggest input (see DecodeScaling); else full size."""
        if not self.scaling.enabled:
            return DecodedPhoto.full(self.decode(data))
        return DecodedPhoto(decode_reduced(data, self.limits,
                                           min_long_side=self._detector_long_side()), data)

    def _detector_long_side(self) -> int:
        config = self.detector_config
        if config.input_size is not None:
            return max(config.input_size)
        second = config.fallback()
        return second.max_side if second is not None else config.max_side

    def detect(self, image: np.ndarray) -> Detections:
        return self.detect_many([image])[0]

    def detect_many(self, images: list[np.ndarray]) -> list[Detections]:
        """Detect in several images; images that share a letterbox size share one ORT run.

        Images larger than ``max_side`` where no face reached ``confident_score`` are
        detected again at ``fallback_max_side`` (see DetectorConfig).
        """
        config = self.detector_config
        results = self._detect_at(images, config)
        second = config.fallback()
        if second is not None:
            retry = [i for i, (im, d) in enumerate(zip(images, results, strict=True))
                     if _best_score(d) < config.confident_score
                     and max(im.shape[:2]) > config.max_side]
            if retry:
                again = self._detect_at([images[i] for i in retry], second)
                for i, d in zip(retry, again, strict=True):
                    if _best_score(d) > _best_score(results[i]):
                        results[i] = d
        return results

    def _detect_at(self, images: list[np.ndarray], config: DetectorConfig) -> list[Detections]:
        geometry = [letterbox_geometry(im.shape[0], im.shape[1], config) for im in images]
        results: list[Detections | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(geometry):
            groups.setdefault((g[0], g[1]), []).append(i)
        for (input_h, input_w), members in groups.items():
            blob = np.empty((len(members), 3, input_h, input_w), dtype=np.float32)
            for slot, i in enumerate(members):
                _, _, new_h, new_w, _ = geometry[i]
                _native.letterbox_to_blob(images[i], blob[slot], new_h, new_w,
                                          DET_MEAN, DET_INV_STD)
            outs = self.sessions.detector.run(self._det_outputs,
                                              {self.sessions.detector_input: blob})
            for slot, i in enumerate(members):
                results[i] = self._postprocess(outs, slot, input_w, geometry[i][4])
        return results  # type: ignore[return-value]

    def _postprocess(self, outs: list[np.ndarray], slot: int, input_w: int,
                     det_scale: float) -> Detections:
        n = len(STRIDES)
        scores = [np.ascontiguousarray(outs[i][slot, :, 0]) for i in range(n)]
        boxes = [np.ascontiguousarray(outs[n + i][slot]) for i in range(n)]
        kps = [np.ascontiguousarray(outs[2 * n + i][slot]) for i in range(n)]
        cfg = self.detector_config
        s, b, k = _native.decode_scrfd(scores, boxes, kps, STRIDES, input_w, ANCHORS_PER_CELL,
                                       cfg.score_threshold, det_scale)
        keep = _native.nms(b, s, cfg.nms_iou)[: cfg.max_faces]
        return Detections(b[keep], s[keep], k[keep])

    def align(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """(n, 5, 2) landmarks -> (n, 3, 112, 112) float32 embedder input."""
        return self._warp(ReducedImage(image, 1, (image.shape[1], image.shape[0])),
                          alignment_transforms(kps))

    def _warp(self, source: ReducedImage, transforms: np.ndarray) -> np.ndarray:
        """Faces warped from ``source``; transforms (n, 2, 3) map template pixels to
        full-size image pixels."""
        blob = np.empty((len(transforms), 3, ALIGNED_SIZE, ALIGNED_SIZE), dtype=np.float32)
        if len(transforms):
            if source.reduction != 1:
                # full-size point q is reduced-image point (q - (r - 1) / 2 - offset) / r
                r = source.reduction
                transforms = transforms / r
                transforms[:, :, 2] -= (np.asarray(source.offset) + (r - 1) / 2) / r
            _native.warp_faces_to_batch(source.pixels, np.ascontiguousarray(transforms), blob,
                                        EMB_MEAN, EMB_INV_STD)
        return blob

    def _crop_source(self, photo: DecodedPhoto, transforms: np.ndarray) -> ReducedImage:
        """Where one photo's faces are warped from: its reduced decode when every face there
        keeps ``min_crop_resolution`` source pixels per template pixel, else a finer decode
        (full size only if a face needs it). transforms: (n, 2, 3), template -> full size."""
        source = photo.reduced
        if source.reduction == 1 or not len(transforms):
            return source
        # full-size pixels per template pixel of each face: its transform's scale
        per_template_px = np.sqrt(np.abs(np.linalg.det(transforms[:, :, :2])))
        affordable = float(per_template_px.min()) / self.scaling.min_crop_resolution
        if affordable >= source.reduction:
            return source
        return decode_reduced(photo.data, self.limits, max_reduction=max(1, int(affordable)))

    def embed(self, blob: np.ndarray) -> np.ndarray:
        """(n, 3, 112, 112) float32 -> (n, 512) float32 L2-normalised templates."""
        out = np.empty((len(blob), EMBEDDING_DIM), dtype=np.float32)
        for start in range(0, len(blob), EMBED_CHUNK):
            chunk = blob[start:start + EMBED_CHUNK]
            out[start:start + len(chunk)] = self._embed_raw(chunk)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.maximum(norms, 1e-12, out=norms)
        return out / norms

    def _embed_raw(self, chunk: np.ndarray) -> np.ndarray:
        def run(x: np.ndarray) -> np.ndarray:
            return self.sessions.embedder.run(None, {self.sessions.embedder_input: x})[0]

        if not self.flip:
            return run(chunk)
        both = run(np.concatenate([chunk, chunk[:, :, :, ::-1]]))
        return both[:len(chunk)] + both[len(chunk):]

    def embed_aligned(self, crops: np.ndarray) -> np.ndarray:
        """Already-aligned (n, 112, 112, 3) uint8 RGB faces -> (n, 512) templates."""
        crops = np.asarray(crops)
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (112, 112, 3):
            raise ValueError(f"aligned faces must be (n, 112, 112, 3) uint8 RGB, got: "
                             f"shape={crops.shape}, dtype={crops.dtype}")
        blob = ((crops.astype(np.float32) - EMB_MEAN) * EMB_INV_STD).transpose(0, 3, 1, 2)
        return self.embed(np.ascontiguousarray(blob))

    # -- whole pipeline -----------------------------------------------------------

    def analyse(self, image: np.ndarray | DecodedPhoto,
                timings: StageTimings | None = None) -> list[Face]:
        return self.analyse_many([image], timings)[0]

    def analyse_many(self, images: Sequence[np.ndarray | DecodedPhoto],
                     timings: StageTimings | None = None) -> list[list[Face]]:
        """Every face of every image with quality and template; one embedder batch for all.

        images: full-size (H, W, 3) uint8 RGB arrays, or photos from ``decode_scaled``.
        Boxes and landmarks are in full-size pixels either way.
        """
        timings = timings if timings is not None else StageTimings()
        photos = [im if isinstance(im, DecodedPhoto) else DecodedPhoto.full(im)
                  for im in images]
        t = timings.clock()
        found = self.detect_many([p.reduced.pixels for p in photos])
        detections = [d.to_full_size(p.reduced) for p, d in zip(photos, found, strict=True)]
        timings.add("detect", t)
        t = timings.clock()
        transforms = [alignment_transforms(d.kps) for d in detections]
        timings.add("align", t)
        t = timings.clock()
        sources = [self._crop_source(p, m) for p, m in zip(photos, transforms, strict=True)]
        if any(src is not p.reduced for src, p in zip(sources, photos, strict=True)):
            timings.add("decode", t)  # finer decodes for faces too small in the reduced one
        t = timings.clock()
        blobs = [self._warp(src, m) for src, m in zip(sources, transforms, strict=True)]
        blob = np.concatenate(blobs) if blobs else np.empty((0, 3, 112, 112), np.float32)
        timings.add("align", t)
        t = timings.clock()
        templates = self.embed(blob)
        timings.add("embed", t)
        t = timings.clock()
        grey = blob.mean(axis=1) * (1.0 / EMB_INV_STD) + EMB_MEAN
        results, row = [], 0
        for im, d in zip(photos, detections, strict=True):
            faces = []
            for j in range(len(d)):
                q = assess(float(d.scores[j]), d.boxes[j], d.kps[j], im.shape, grey[row],
                           self.quality_policy)
                faces.append(Face(d.boxes[j], d.kps[j], float(d.scores[j]), q, templates[row]))
                row += 1
            results.append(faces)
        timings.add("quality", t)
        return results

    def analyse_bytes(self, data: bytes, timings: StageTimings | None = None) -> list[Face]:
        timings = timings if timings is not None else StageTimings()
        t = timings.clock()
        photo = self.decode_scaled(data)
        timings.add("decode", t)
        return self.analyse(photo, timings)


def _best_score(detections: Detections) -> float:
    return float(detections.scores[0]) if len(detections) else 0.0  # sorted by NMS


def largest_face(faces: list[Face]) -> Face | None:
    return max(faces, key=lambda f: f.area) if faces else None
