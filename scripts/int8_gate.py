"""Issue 13's accuracy and speed gate for the int8 embedder, on lfw-dev without the people
whose photos calibrated the int8 activations (scripts/quantize_embedder.py).

    python scripts/int8_gate.py --lfw ../shared/data/lfw-dev \
        --fp32-model gate-fp32.json --int8-model gate-int8.json [--rounds 5] [--json out.json]

Make the two score models first, on the folder this script prints (``--prepare`` only
writes it): ``matcher calibrate --labels <folder> --out gate-fp32.json --cache
~/.cache/matcher/calibrate`` and the same with ``--embedder-precision int8``.

Figures: cosine int8 vs fp32 per photo (median, 1st percentile, min); FNMR at FMR 1e-5
from each score model with its identity-bootstrap 95 % CI; LFW 10-fold accuracy on
pairs.txt with a 95 % CI over identities (as benchmarks/_accuracy_lfw.py), and the paired
int8 - fp32 difference; embed ms per face and images/s, interleaved (benchmarks/_int8.py).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from quantize_embedder import calibration_identities  # noqa: E402

from benchmarks import _int8  # noqa: E402
from benchmarks._faces import load_photos  # noqa: E402
from benchmarks._lfw import (  # noqa: E402
    identity_weights,
    pair_templates_scores,
    read_pairs,
    rows_of,
    ten_fold_accuracy,
    with_ci,
)
from matcher.calibrate.embedding import Embedded, embed_folder, read_labels  # noqa: E402
from matcher.face.models import default_pack  # noqa: E402
from matcher.face.pipeline import Pipeline  # noqa: E402
from matcher.gallery.scoremodel import ScoreModel  # noqa: E402

CACHE = Path.home() / ".cache" / "matcher"
FMR = 1e-5


def gate_folder(lfw: Path) -> Path:
    """lfw-dev's labels.csv without the calibration people; images and pairs.txt linked."""
    held = set(calibration_identities(lfw))
    keep = [(f, who) for f, who in read_labels(lfw) if who not in held]
    tag = hashlib.sha256(repr(keep).encode()).hexdigest()[:12]
    sub = CACHE / "bench" / f"lfw-dev-int8-gate-{tag}"
    sub.mkdir(parents=True, exist_ok=True)
    for name in ("images", "pairs.txt"):
        if not (sub / name).exists():
            (sub / name).symlink_to(lfw.resolve() / name)
    with open(sub / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "identity"), *keep])
    return sub


def embedded(lfw: Path, sub: Path, precision: str) -> Embedded:
    """The gate folder through the served pipeline; rows of a cached full lfw-dev run of
    the same settings are reused (a template does not depend on which other photos ran)."""
    pipeline = Pipeline(default_pack(precision), threads=1)
    cache = CACHE / "calibrate"
    full_sha = hashlib.sha256((lfw / "labels.csv").read_bytes()).hexdigest()
    sub_sha = hashlib.sha256((sub / "labels.csv").read_bytes()).hexdigest()
    full = cache / f"embedded-{full_sha[:12]}-{pipeline.settings_hash()[:12]}.npz"
    mine = cache / f"embedded-{sub_sha[:12]}-{pipeline.settings_hash()[:12]}.npz"
    if full.exists() and not mine.exists():
        e = Embedded.load(full)
        rows = rows_of(e, np.array([f for f, _ in read_labels(sub)]))
        Embedded(e.files[rows], e.identities[rows], e.status[rows], e.reasons[rows],
                 e.templates[rows], e.settings_hash, sub_sha).save(mine)
    return embed_folder(sub, pipeline, cache_dir=cache)


def lfw_pairs(e: Embedded, sub: Path, W: np.ndarray, person: np.ndarray) -> np.ndarray:
    """10-fold accuracy per bootstrap row (row 0: the point estimate)."""
    a, b, same, fold = read_pairs(sub)
    scores, _ = pair_templates_scores(e, a, b)
    _, thr = ten_fold_accuracy(scores, same, fold)
    w = W[:, person[rows_of(e, a)]]
    correct = (scores > thr[np.searchsorted(np.unique(fold), fold)]) == same
    return (w * correct).sum(1) / w.sum(1)


def fmt(stat: dict, pct: bool = True) -> str:
    f = (lambda v: f"{v:.2%}") if pct else (lambda v: f"{v:.4f}")
    return f"{f(stat['point'])} (95% CI {f(stat['lo'])}-{f(stat['hi'])})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lfw", type=Path, required=True)
    p.add_argument("--prepare", action="store_true", help="only write the gate folder")
    p.add_argument("--fp32-model", type=Path)
    p.add_argument("--int8-model", type=Path)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    sub = gate_folder(args.lfw)
    print(f"gate folder: {sub}")
    if args.prepare:
        return 0
    out: dict = {}
    fp32, int8 = embedded(args.lfw, sub, "fp32"), embedded(args.lfw, sub, "int8")
    both = fp32.usable(False) & int8.usable(False)
    cos = np.einsum("ij,ij->i", fp32.templates[both], int8.templates[both])
    out["cosine"] = {"photos": int(both.sum()), "median": float(np.median(cos)),
                     "p1": float(np.percentile(cos, 1)), "min": float(cos.min())}
    print(f"cosine int8 vs fp32 over {both.sum()} photos: median {np.median(cos):.4f}, "
          f"1st percentile {np.percentile(cos, 1):.4f}, min {cos.min():.4f}")

    names, person = np.unique(fp32.identities, return_inverse=True)
    W = identity_weights(len(names), 200)
    acc = {k: lfw_pairs(e, sub, W, person) for k, e in (("fp32", fp32), ("int8", int8))}
    for k, v in acc.items():
        out[f"lfw_accuracy_{k}"] = with_ci(v)
        print(f"LFW 10-fold accuracy {k}: {fmt(with_ci(v))}")
    out["lfw_accuracy_diff"] = with_ci(acc["int8"] - acc["fp32"])
    print(f"  int8 - fp32 (paired): {fmt(out['lfw_accuracy_diff'])}")

    for k, path in (("fp32", args.fp32_model), ("int8", args.int8_model)):
        if path is None:
            continue
        model = ScoreModel.load(path)
        t = model.threshold_at_fmr(FMR)
        f, lo, hi = model.fnmr_at(t)
        out[f"fnmr_{k}"] = {"threshold": t, "point": f, "lo": lo, "hi": hi,
                            "model_id": model.model_id}
        print(f"FNMR at FMR {FMR:g} {k} ({model.model_id}): threshold {t:.4f}, "
              f"{f:.2%} (95% CI {lo:.2%}-{hi:.2%})")

    speed = _int8.measure([ph.data for ph in load_photos()], args.rounds)
    for k in _int8.PRECISIONS:
        print(f"{k}: embed {np.median(speed['embed_ms'][k]):.2f} ms/face (CPU), "
              f"{np.median(speed['images_per_s'][k]):.1f} images/s, "
              f"{np.median(speed['cpu_ms_per_image'][k]):.1f} CPU ms/image")
    cx = np.median(np.array(speed["cpu_ms_per_image"]["fp32"])
                   / np.array(speed["cpu_ms_per_image"]["int8"]))
    ex = np.median(np.array(speed["embed_ms"]["fp32"]) / np.array(speed["embed_ms"]["int8"]))
    ix = np.median(np.array(speed["images_per_s"]["int8"])
                   / np.array(speed["images_per_s"]["fp32"]))
    print(f"speed-up int8/fp32 (median of {args.rounds} per-round ratios): embed {ex:.2f}x, "
          f"images/s {ix:.2f}x (wall), {cx:.2f}x (CPU per image)")
    out["speed"] = {"embed_ms": speed["embed_ms"], "images_per_s": speed["images_per_s"],
                    "cpu_ms_per_image": speed["cpu_ms_per_image"], "embed_speedup": float(ex),
                    "images_speedup": float(ix), "cpu_per_image_speedup": float(cx)}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
