"""Native (Cython) kernels vs their numpy twins on realistic inputs, side by side in one run.

For every kernel: ms per call (min/median/max over interleaved repeats) for both
implementations, the speed-up ratio, a check that the outputs agree, and a ratio floor
(native must not be slower than numpy; if numpy were as fast we would keep numpy).
Also the whole ``Pipeline.analyse`` over the shared photos with either set of kernels,
to show what the kernels are worth end to end (the ONNX models dominate there).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from matcher import _native, _reference
from matcher.face import pipeline as pipeline_module
from matcher.face.alignment import alignment_transforms
from matcher.face.pipeline import (
    ANCHORS_PER_CELL,
    DET_INV_STD,
    DET_MEAN,
    EMB_INV_STD,
    EMB_MEAN,
    STRIDES,
    DetectorConfig,
    Pipeline,
    letterbox_geometry,
)

from ._faces import faces_dir
from .harness import Report, measure

FACES = faces_dir()
FLOOR = 1.0    # native must at least match numpy
TARGET = 5.0   # what we aim for; reported, not enforced


def _frames(pipeline: Pipeline) -> dict[str, np.ndarray]:
    """A real 1920x1080 frame and a real 640x480 frame (its centre crop)."""
    full = pipeline.decode((FACES / "obama_1080p.jpg").read_bytes())
    if full.shape[:2] != (1080, 1920):
        raise RuntimeError(f"obama_1080p.jpg is {full.shape}, expected 1080x1920")
    top, left = (1080 - 480) // 2, (1920 - 640) // 2
    return {"1920x1080": full, "640x480": np.ascontiguousarray(full[top:top + 480,
                                                                      left:left + 640])}


def _warp_transforms(pipeline: Pipeline, frame: np.ndarray, n: int) -> np.ndarray:
    """n crop->frame transforms: the real face, then jittered copies (a crowd at the gate)."""
    detections = pipeline.detect(frame)
    if not len(detections):
        raise RuntimeError("no face found in obama_1080p.jpg")
    base = alignment_transforms(detections.kps[:1])[0]
    rng = np.random.default_rng(0)
    out = np.repeat(base[None], n, axis=0)
    for i in range(1, n):
        angle = rng.uniform(-0.3, 0.3)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        out[i, :, :2] = base[:, :2] @ rot * rng.uniform(0.5, 2.0)
        out[i, :, 2] = base[:, 2] + rng.uniform(-800, 800, 2)
    return out


def _detector_outputs(pipeline: Pipeline, image: np.ndarray, config: DetectorConfig):
    input_h, input_w, new_h, new_w, det_scale = letterbox_geometry(*image.shape[:2], config)
    blob = np.empty((1, 3, input_h, input_w), dtype=np.float32)
    _native.letterbox_to_blob(image, blob[0], new_h, new_w, DET_MEAN, DET_INV_STD)
    outs = pipeline.sessions.detector.run(None, {pipeline.sessions.detector_input: blob})
    n = len(STRIDES)
    return ([np.ascontiguousarray(outs[i][0, :, 0]) for i in range(n)],
            [np.ascontiguousarray(outs[n + i][0]) for i in range(n)],
            [np.ascontiguousarray(outs[2 * n + i][0]) for i in range(n)], input_w, det_scale)


def _side_by_side(native: Callable[[], object], numpy_twin: Callable[[], object],
                  repeats: int, number: int) -> tuple[list[float], list[float]]:
    """Seconds per call of each, repeats interleaved so drift on a shared box hits both."""
    measure(native, repeats=0, warmup=2)
    measure(numpy_twin, repeats=0, warmup=1)
    a, b = [], []
    for _ in range(repeats):
        a += measure(native, repeats=1, warmup=0, number=number)
        b += measure(numpy_twin, repeats=1, warmup=0, number=number)
    return a, b


def _snapshot(result):
    """A copy of a kernel's result (letterbox and warp write into a shared buffer)."""
    return tuple(map(_snapshot, result)) if isinstance(result, tuple) else result.copy()


def _agree(a, b) -> tuple[bool, str]:
    """(outputs agree, how closely): indices exactly, floats to rtol = atol = 1e-5."""
    if isinstance(a, tuple):
        parts = [_agree(x, y) for x, y in zip(a, b, strict=True)]
        return all(ok for ok, _ in parts), "; ".join(detail for _, detail in parts)
    if a.shape != b.shape:
        return False, f"shapes {a.shape} vs {b.shape}"
    if a.dtype.kind in "iu":
        return bool(np.array_equal(a, b)), f"{len(a)} indices, exact"
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    return bool(np.allclose(a, b, rtol=1e-5, atol=1e-5)), f"max abs diff {diff:.2g}"


def run(report: Report, quick: bool) -> None:
    repeats = 5 if quick else 21
    pipeline = Pipeline()
    frames = _frames(pipeline)
    config = DetectorConfig(max_side=640)  # adaptive letterbox, long side 640 (as briefed)
    cases: list[tuple[str, Callable[[object], object], int]] = []

    small = pipeline.decode((FACES / "obama_small.jpg").read_bytes())  # 320x240
    fixed = DetectorConfig(input_size=(640, 640))  # the reference's letterbox: upscales it
    for label, frame, geometry in [(*item, config) for item in frames.items()] + [
            (f"{small.shape[1]}x{small.shape[0]}", small, fixed)]:
        input_h, input_w, new_h, new_w, _ = letterbox_geometry(*frame.shape[:2], geometry)
        blob = np.empty((3, input_h, input_w), dtype=np.float32)

        def letterbox(impl, frame=frame, blob=blob, new_h=new_h, new_w=new_w):
            impl.letterbox_to_blob(frame, blob, new_h, new_w, DET_MEAN, DET_INV_STD)
            return blob
        cases.append((f"letterbox {label}->{input_w}x{input_h}", letterbox, 2))

    for n in (1, 16):
        transforms = _warp_transforms(pipeline, frames["1920x1080"], n)
        batch = np.empty((n, 3, 112, 112), dtype=np.float32)

        def warp(impl, transforms=transforms, batch=batch):
            impl.warp_faces_to_batch(frames["1920x1080"], transforms, batch, EMB_MEAN,
                                     EMB_INV_STD)
            return batch
        cases.append((f"warp {n} face{'s' if n > 1 else ''} from 1080p", warp, 20 if n == 1 else 2))

    scores, boxes, kps, input_w, det_scale = _detector_outputs(
        pipeline, pipeline.decode((FACES / "group_obama_biden.jpg").read_bytes()), config)
    threshold = pipeline.detector_config.score_threshold

    def decode(impl):
        return impl.decode_scrfd(scores, boxes, kps, STRIDES, input_w, ANCHORS_PER_CELL,
                                 threshold, det_scale)
    cases.append((f"decode_scrfd ({sum(map(len, scores))} anchors)", decode, 50))

    for nms_threshold in (threshold, 0.05):
        s, b, _ = _native.decode_scrfd(scores, boxes, kps, STRIDES, input_w, ANCHORS_PER_CELL,
                                       nms_threshold, det_scale)

        def suppress(impl, s=s, b=b):
            return impl.nms(b, s, pipeline.detector_config.nms_iou)
        cases.append((f"nms ({len(s)} candidates)", suppress, 200 if len(s) < 100 else 20))

    report.param(repeats=repeats, letterbox=dict(config.__dict__), detector_threshold=threshold,
                 threads="native and numpy kernels both run on one core")
    labels, native_ms, numpy_ms, speedups = [], [], [], []
    for label, call, number in cases:
        ok, detail = _agree(_snapshot(call(_native)), _snapshot(call(_reference)))
        report.check(f"{label}: native output equals numpy twin", ok, detail)
        t_native, t_numpy = _side_by_side(lambda call=call: call(_native),
                                          lambda call=call: call(_reference), repeats, number)
        a = report.times_ms(f"{label} native", t_native)
        b = report.times_ms(f"{label} numpy", t_numpy)
        speedup = b["median"] / a["median"]
        report.figure(f"{label} speed-up", speedup, "x", summary=True,
                      note=f"numpy median / native median; target {TARGET}x")
        report.ratio_floor(f"{label}: native not slower than numpy", speedup, FLOOR,
                           f"(target {TARGET}x)")
        labels.append(label)
        native_ms.append(a)
        numpy_ms.append(b)
        speedups.append(speedup)

    _end_to_end(report, pipeline, quick)
    _plot(report, labels, native_ms, numpy_ms, speedups)


def _end_to_end(report: Report, pipeline: Pipeline, quick: bool) -> None:
    """Pipeline.analyse over every shared photo, with the native kernels and with the twins."""
    images = [pipeline.decode(p.read_bytes()) for p in sorted(FACES.iterdir())
              if p.suffix.lower() in (".jpg", ".png")]

    def analyse_all():
        return [pipeline.analyse(im) for im in images]

    def with_twins():
        pipeline_module._native = _reference  # the pipeline's only hook into compiled code
        try:
            return analyse_all()
        finally:
            pipeline_module._native = _native

    t_native, t_numpy = _side_by_side(analyse_all, with_twins, 2 if quick else 5, 1)
    a = report.times_ms(f"pipeline.analyse x{len(images)} images native", t_native, summary=True)
    b = report.times_ms(f"pipeline.analyse x{len(images)} images numpy", t_numpy)
    report.figure("pipeline.analyse speed-up", b["median"] / a["median"], "x", summary=True,
                  note="whole pipeline incl. ONNX detector and embedder")


def _plot(report: Report, labels, native_ms, numpy_ms, speedups) -> None:
    fig, ax = report.plot(figsize=(10, 5.5))
    x = np.arange(len(labels))
    width = 0.38
    for offset, entries, name, colour in ((-width / 2, native_ms, "native (Cython)", "tab:blue"),
                                          (width / 2, numpy_ms, "numpy twin", "tab:orange")):
        med = np.array([e["median"] for e in entries])
        err = np.array([[m - e["min"] for m, e in zip(med, entries, strict=True)],
                        [e["max"] - m for m, e in zip(med, entries, strict=True)]])
        ax.bar(x + offset, med, width, yerr=err, capsize=3, label=name, color=colour)
    for xi, s, e in zip(x, speedups, numpy_ms, strict=True):
        ax.annotate(f"{s:.1f}x", (xi, e["max"]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=9, fontweight="bold")
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (median, bars: min-max)")
    ax.set_xlabel("kernel and input")
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_title("Native kernels vs numpy twins (label: speed-up)")
    ax.legend()
    ax.margins(y=0.15)
