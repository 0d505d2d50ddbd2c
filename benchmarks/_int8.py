"""The int8 embedder variant beside fp32 (issue 13 item 3): template agreement, embed CPU ms
per face and images/s, fp32 and int8 interleaved round by round so a busy machine hurts
both alike; speed-ups are medians of per-round ratios.

The layout is the service's worker layout: 2 workers, single-threaded ORT sessions, micro-
batches of 4 photos, each worker decoding its batch (``decode_scaled``, as MatchEngine) and
running ``analyse_many``.
"""
from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from matcher.face.models import default_pack
from matcher.face.pipeline import Pipeline

from .harness import Report

WORKERS = 2
MICRO_BATCH = 4
PRECISIONS = ("fp32", "int8")


def measure(datas: list[bytes], rounds: int) -> dict:
    """Per precision: embed CPU ms per face, images/s and process CPU ms per image, per
    round; template cosines.

    datas: encoded photos. Returns {"embed_ms": {p: [..]}, "images_per_s": {p: [..]},
    "cpu_ms_per_image": {p: [..]}, "cosine": (n,) int8 vs fp32, same aligned faces}.
    images/s is wall clock and moves with a neighbour's load; CPU ms per image (both
    workers, the whole process) does much less, so its ratio is the steadier figure.
    """
    pipes = {p: Pipeline(default_pack(p), threads=1) for p in PRECISIONS}
    ref = pipes["fp32"]
    images = [ref.decode(d) for d in datas]
    blob = np.concatenate([ref.align(im, d.kps)
                           for im, d in zip(images, ref.detect_many(images), strict=True)])
    templates = {p: pipe.embed(blob) for p, pipe in pipes.items()}
    cosine = np.einsum("ij,ij->i", templates["fp32"], templates["int8"])
    chunks = [datas[i:i + MICRO_BATCH] for i in range(0, len(datas), MICRO_BATCH)]

    def micro_batch(pipe: Pipeline, chunk: list[bytes]) -> None:
        pipe.analyse_many([pipe.decode_scaled(d) for d in chunk])

    embed_ms: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    per_s: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    cpu_ms: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    with ThreadPoolExecutor(WORKERS) as pool:
        for pipe in pipes.values():  # warm-up
            list(pool.map(functools.partial(micro_batch, pipe), chunks[:2]))
        for _ in range(rounds):
            for p, pipe in pipes.items():
                started = time.thread_time()
                pipe.embed(blob)  # single-threaded session: runs on this thread
                embed_ms[p].append((time.thread_time() - started) * 1e3 / len(blob))
                started, cpu = time.perf_counter(), time.process_time()
                list(pool.map(functools.partial(micro_batch, pipe), chunks))
                per_s[p].append(len(datas) / (time.perf_counter() - started))
                cpu_ms[p].append((time.process_time() - cpu) * 1e3 / len(datas))
    return {"embed_ms": embed_ms, "images_per_s": per_s, "cpu_ms_per_image": cpu_ms,
            "cosine": cosine,
            "faces": len(blob), "model_ids": {p: pipe.model_id for p, pipe in pipes.items()}}


def run(report: Report, datas: list[bytes], rounds: int) -> dict:
    """Record the int8 row of the pipeline suite (one line and nothing else if unbuilt)."""
    from matcher.face.models import EMBEDDER_INT8_FILE, VARIANT_DIR

    if not (VARIANT_DIR / EMBEDDER_INT8_FILE).exists():
        print(f"int8 embedder not built at {VARIANT_DIR}: skipping the int8 row "
              "(scripts/quantize_embedder.py)", flush=True)
        return {}
    m = measure(datas, rounds)
    ms, per_s = m["embed_ms"], m["images_per_s"]
    embed_x = np.median(np.array(ms["fp32"]) / np.array(ms["int8"]))
    images_x = np.median(np.array(per_s["int8"]) / np.array(per_s["fp32"]))
    cpu = m["cpu_ms_per_image"]
    cpu_x = np.median(np.array(cpu["fp32"]) / np.array(cpu["int8"]))
    report.param(int8={"model_ids": m["model_ids"], "faces": m["faces"], "rounds": rounds,
                       "layout": f"{WORKERS} workers x 1 ORT thread, batches of {MICRO_BATCH}"})
    for p in PRECISIONS:
        report.figure(f"{p}_embed_cpu_ms_per_face", ms[p], "ms",
                      note="thread CPU of Pipeline.embed over every face of the photos")
        report.figure(f"{p}_images_per_s_2_workers", per_s[p], "images/s")
        report.figure(f"{p}_cpu_ms_per_image_2_workers", cpu[p], "ms",
                      note="process CPU over the run / images")
    report.figure("int8_embed_speedup", float(embed_x), "x", summary=True,
                  note="fp32 / int8 embed CPU ms per face, median of per-round ratios")
    report.figure("int8_images_per_s_speedup", float(images_x), "x", summary=True,
                  note="int8 / fp32 images/s in the worker layout (adoption needs >= 1.4)")
    report.figure("int8_cpu_per_image_speedup", float(cpu_x), "x", summary=True,
                  note="fp32 / int8 CPU ms per image: images/s at full CPU, load-robust")
    cos = m["cosine"]
    report.figure("int8_template_cosine_min", float(cos.min()), "cosine",
                  note=f"int8 vs fp32 template of the same aligned face; median "
                       f"{np.median(cos):.4f} over {len(cos)} faces")
    return m
