"""The model batcher's work: the jobs a probe's frames become (an image, an aligned face,
a traveller's frames together), and the batch function that runs every frame of a batch
through the face pipeline at once and hands each job its Analysis. Also the probe inputs a
request's fields become (frames, raw aligned faces, templates).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInput, MatcherError
from ..face.frames import Analysis
from ..face.pipeline import Pipeline, StageTimings
from ..templates import ALIGNED_SIZE, EMBEDDING_DIM, check_templates

ALIGNED_RAW_BYTES = ALIGNED_SIZE * ALIGNED_SIZE * 3

# -- jobs for the model batcher ----------------------------------------------------------

@dataclass(frozen=True)
class ImageJob:
    data: bytes


@dataclass(frozen=True)
class AlignedJob:
    """An aligned face: ``crop`` (112, 112, 3) uint8 RGB, or ``data`` an encoded 112x112."""

    crop: np.ndarray | None
    data: bytes = b""


@dataclass(frozen=True)
class FramesJob:
    """The frames of one traveller's probe: analysed together, in one model batch.
    ``positions``: each frame's index in the request (what an error names)."""

    frames: tuple[ImageJob | AlignedJob, ...]
    positions: tuple[int, ...]


Job = ImageJob | AlignedJob | FramesJob
# One frame as the engine takes it: a job for the models, or a ready (512,) template.
Frame = ImageJob | AlignedJob | np.ndarray


def job_weight(job: Job) -> int:
    """Units of model work a job stands for (MicroBatcher weight): its frames."""
    return len(job.frames) if isinstance(job, FramesJob) else 1


@dataclass
class FramesAnalysis:
    """A FramesJob's answer: one Analysis per frame, in order, and the job's stage times
    (decode summed over its frames; detect, align, embed, quality: its batch's)."""

    frames: list[Analysis]
    timings_ms: dict[str, float]


def _frames_timings(frames: list[Analysis], shared: dict[str, dict[str, float]]
                    ) -> dict[str, float]:
    """A FramesJob's stage times: the batch's shared stages once per kind of frame in it,
    plus each image frame's own decode (an image Analysis's decode holds its own decode
    and the batch's shared finer decodes)."""
    timings: dict[str, float] = {}
    for kind in sorted({"image" if a.from_image else "aligned" for a in frames}):
        for stage, ms in shared[kind].items():
            timings[stage] = timings.get(stage, 0.0) + ms
    finer = shared["image"].get("decode", 0.0)
    own = [a.timings_ms.get("decode", 0.0) - finer for a in frames if a.from_image]
    if own:
        timings["decode"] = sum(own) + finer
    return timings


def frame_error(index: int, exc: BaseException) -> BaseException:
    """``exc`` of the same kind, its message naming the frame it came from (frames[i])."""
    if not isinstance(exc, MatcherError):
        return exc
    try:
        return type(exc)(f"frames[{index}]: {exc}")
    except TypeError:  # a subclass with another constructor: keep it as it is
        return exc


def aligned_from_raw(data: bytes) -> np.ndarray:
    if len(data) != ALIGNED_RAW_BYTES:
        raise InvalidInput(f"a raw aligned face is {ALIGNED_SIZE}x{ALIGNED_SIZE}x3 = "
                           f"{ALIGNED_RAW_BYTES} bytes, got {len(data)}")
    return np.frombuffer(data, np.uint8).reshape(ALIGNED_SIZE, ALIGNED_SIZE, 3)


def template_from_values(values: Sequence[float]) -> np.ndarray:
    """A template sent as a probe: (512,) float32, finite and L2-normalised (checked)."""
    template = np.asarray(values, np.float32)
    if template.shape != (EMBEDDING_DIM,):
        raise InvalidInput(f"a template has {EMBEDDING_DIM} values, got {template.size}")
    return check_templates(template, what="the template")[0]


def photo_bytes(frame: Frame) -> bytes:
    """The bytes that name a probe's photo (photo_sha256): an image or an aligned face as
    sent (a raw one's pixels), a template's float32 values."""
    if isinstance(frame, ImageJob):
        return frame.data
    if isinstance(frame, AlignedJob):
        return frame.data if frame.crop is None else frame.crop.tobytes()
    return frame.tobytes()



class BatchAnalyser:
    """The model batcher's batch function (runs in a worker thread): every frame of every
    job in one pipeline run."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def __call__(self, jobs: list[Job]) -> list[Analysis | FramesAnalysis | BaseException]:
        """Every frame of every job in one pipeline run; a FramesJob's answers regrouped."""
        units: list[ImageJob | AlignedJob] = []
        for job in jobs:
            units.extend(job.frames if isinstance(job, FramesJob) else (job,))
        analysed, shared = self._analyse_units(units)
        results: list[Analysis | FramesAnalysis | BaseException] = []
        start = 0
        for job in jobs:
            if not isinstance(job, FramesJob):
                results.append(analysed[start])
                start += 1
                continue
            mine = analysed[start:start + len(job.frames)]
            start += len(job.frames)
            failed = next(((i, a) for i, a in enumerate(mine) if isinstance(a, BaseException)),
                          None)
            if failed is not None:  # a bad frame is a bad request, as a bad single probe is
                results.append(frame_error(job.positions[failed[0]], failed[1]))
                continue
            frames = [a for a in mine if isinstance(a, Analysis)]  # all of them: none failed
            results.append(FramesAnalysis(frames, _frames_timings(frames, shared)))
        return results

    def _analyse_units(self, jobs: list[ImageJob | AlignedJob]
                       ) -> tuple[list[Analysis | BaseException], dict[str, dict[str, float]]]:
        """One Analysis (or the error) per job, and the stage times the batch's images and
        aligned faces shared (``{"image": {...}, "aligned": {...}}``)."""
        results: list[Analysis | BaseException | None] = [None] * len(jobs)
        shared: dict[str, dict[str, float]] = {"image": {}, "aligned": {}}
        images, image_slots, image_decode_ms = [], [], []
        crops, crop_slots = [], []
        for i, job in enumerate(jobs):
            if isinstance(job, AlignedJob):
                try:
                    crops.append(job.crop if job.crop is not None
                                 else self._decode_aligned(job.data))
                except MatcherError as exc:
                    results[i] = exc
                    continue
                crop_slots.append(i)
                continue
            t = time.perf_counter()
            try:
                images.append(self.pipeline.decode_scaled(job.data))
            except MatcherError as exc:  # one bad image fails only its own request
                results[i] = exc
                continue
            image_slots.append(i)
            image_decode_ms.append((time.perf_counter() - t) * 1e3)
        if images:
            timings = StageTimings()
            per_image = self.pipeline.analyse_many(images, timings)
            # the batch's finer decodes (DecodeScaling), if any, are shared like its other stages
            finer_decode_ms = timings.ms.get("decode", 0.0)
            shared["image"] = dict(timings.ms)
            for slot, image, faces, decode_ms in zip(image_slots, images, per_image,
                                                     image_decode_ms, strict=True):
                faces = sorted(faces, key=lambda f: f.area, reverse=True)
                templates = (np.stack([f.template for f in faces]) if faces
                             else np.empty((0, EMBEDDING_DIM), np.float32))
                results[slot] = Analysis(faces, templates, True,
                                         {**timings.ms, "decode": decode_ms + finer_decode_ms},
                                         image.shape[:2])
        if crops:
            t = time.perf_counter()
            templates = self.pipeline.embed_aligned(np.stack(crops))
            embed_ms = (time.perf_counter() - t) * 1e3
            shared["aligned"] = {"embed": embed_ms}
            for row, slot in enumerate(crop_slots):
                results[slot] = Analysis([], templates[row:row + 1], False,
                                         {"embed": embed_ms})
        return results, shared  # type: ignore[return-value]

    def _decode_aligned(self, data: bytes) -> np.ndarray:
        crop = self.pipeline.decode(data)
        if crop.shape != (ALIGNED_SIZE, ALIGNED_SIZE, 3):
            raise InvalidInput(f"an aligned face must be {ALIGNED_SIZE}x{ALIGNED_SIZE} pixels, "
                               f"got {crop.shape[1]}x{crop.shape[0]}")
        return crop
