"""Probe-side options on lfw-dev, each judged on people the calibration never saw:
flip test-time augmentation (issue 18 item 6) and multi-frame probes (item 5).

Both reuse the identity-disjoint splits of _threshold_cv: calibrate the shipped way on one
half (matcher.calibrate.fit.fit_with_kinds; 1:1 at the policy's FMR and confidence with the
look-alikes in, 1:N from the fit with them apart at the policy's confidence), then run the
open-set protocol on the other half at its largest gallery. Variants are paired: the same
split, gallery and probe draws, only the templates or the probe frames differ. The
interval of a relative change is the 2.5-97.5 percentile over splits; halves overlap from
split to split, so it is indicative, not exact.
"""
from __future__ import annotations

import numpy as np

from matcher.calibrate.pairs import score_pairs
from matcher.gallery.decision import DecisionPolicy
from matcher.gallery.scoremodel import SINGLE, ScoreModel

from ._threshold_cv import FRAMES, SHIPPED_POLICY, _top2, open_set, shipped_fit

# Adopt flip TTA by default only if both miss rates drop by at least this (relative),
# with the interval clear of zero (the bar issue 18 set).
FLIP_ADOPTION_GAIN = 0.15


def shipped_model(templates: np.ndarray, identities: np.ndarray, bootstrap: int, seed: int
                  ) -> ScoreModel:
    return shipped_fit(templates, identities, bootstrap, seed)[0]


def _open_set_rates(model: ScoreModel, templates: np.ndarray, person: np.ndarray,
                    bookings: int, seed: int, policy: DecisionPolicy, frames: str = FRAMES[0],
                    jittered: np.ndarray | None = None) -> tuple[float, float]:
    """(FNIR, FPIR) at the largest gallery of one evaluation half."""
    gallery, probes = open_set(templates, person, bookings, np.random.default_rng(seed),
                               frames, jittered)
    n = len(gallery.person)
    t = max(policy.min_threshold, model.for_search.threshold_at_fmr(
        policy.fpir_1toN / n, policy.confidence_1toN))
    top1, at, top2 = _top2(probes.templates @ gallery.templates.T)
    match = (top1 >= t) & (top1 - top2 >= policy.margin)
    hit = match & (gallery.person[at] == probes.person)
    fnir = float((~hit & probes.mated).sum() / max(probes.mated.sum(), 1))
    fpir = float((match & ~probes.mated).sum() / max((~probes.mated).sum(), 1))
    return fnir, fpir


def _halves(identities: np.ndarray, splits: int, seed: int):
    names = np.unique(identities)
    rng = np.random.default_rng(seed)
    for split in range(splits):
        half = rng.permutation(names)
        yield split, np.isin(identities, half[: len(half) // 2]), int(rng.integers(1 << 30))


def flip_gain(plain: np.ndarray, flipped: np.ndarray, identities: np.ndarray, *,
              splits: int, bootstrap: int, seed: int = 0,
              policy: DecisionPolicy = SHIPPED_POLICY) -> dict:
    """Per variant and split: 1:1 FNMR at the policy's FMR (one booking photo) and FNIR at
    the 1:N operating point (one and two booking photos); then the relative drops."""
    names = np.unique(identities)
    out: dict[str, list] = {"plain": [], "flip": []}
    for split, calib, draw in _halves(identities, splits, seed):
        person = np.searchsorted(names, identities[~calib])
        for name, x in (("plain", plain), ("flip", flipped)):
            model = shipped_model(x[calib], identities[calib], bootstrap, seed + split)
            t = max(policy.min_threshold, model.threshold_at_fmr(
                policy.fmr_1to1, policy.confidence_1to1, SINGLE))
            genuine = score_pairs(x[~calib], identities[~calib]).genuine
            out[name].append([float((genuine < t).mean()),
                              *(_open_set_rates(model, x[~calib], person, b, draw, policy)[0]
                                for b in (1, 2))])
    a, b = np.asarray(out["plain"]), np.asarray(out["flip"])
    drop = 1.0 - b / np.maximum(a, 1e-12)
    keys = ("fnmr_1to1", "fnir_one_photo", "fnir_two_photos")
    result = {"plain": dict(zip(keys, a.mean(0).tolist(), strict=True)),
              "flip": dict(zip(keys, b.mean(0).tolist(), strict=True)),
              "relative_drop": {k: {"mean": float(drop[:, i].mean()),
                                    "lo": float(np.percentile(drop[:, i], 2.5)),
                                    "hi": float(np.percentile(drop[:, i], 97.5))}
                                for i, k in enumerate(keys)}}
    gains = result["relative_drop"]
    result["adopt"] = all(gains[k]["mean"] >= FLIP_ADOPTION_GAIN and gains[k]["lo"] > 0
                          for k in ("fnmr_1to1", "fnir_one_photo"))
    return result


def frame_gain(templates: np.ndarray, jittered: np.ndarray, identities: np.ndarray, *,
               splits: int, bootstrap: int, seed: int = 0,
               policy: DecisionPolicy = SHIPPED_POLICY) -> dict:
    """FNIR and FPIR at the 1:N operating point with two-photo booking, for probes of one
    frame, of two different photos (an upper bound on two lane frames) and of a photo with
    a jittered copy of it (a lower bound)."""
    names = np.unique(identities)
    rates: dict[str, list] = {f: [] for f in FRAMES}
    for split, calib, draw in _halves(identities, splits, seed):
        model = shipped_model(templates[calib], identities[calib], bootstrap, seed + split)
        person = np.searchsorted(names, identities[~calib])
        for frames in FRAMES:
            rates[frames].append(_open_set_rates(model, templates[~calib], person, 2, draw,
                                                 policy, frames, jittered[~calib]))
    return {f: {"fnir": float(np.mean([r[0] for r in rs])),
                "fpir": float(np.mean([r[1] for r in rs]))} for f, rs in rates.items()}


def jitter(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A second lane frame made from one photo: shifted up to 5 px, scaled 0.93-1.07,
    gain 0.75-1.25 and gamma 0.8-1.25 (the small changes of a face a second later)."""
    from PIL import Image

    h, w = pixels.shape[:2]
    s = rng.uniform(0.93, 1.07)
    dx, dy = rng.uniform(-5, 5, 2)
    gain, gamma = rng.uniform(0.75, 1.25), rng.uniform(0.8, 1.25)
    a = 1 / s  # output (x, y) samples input ((x - cx) / s + cx - dx, ...)
    moved = Image.fromarray(pixels).transform(
        (w, h), Image.AFFINE, (a, 0, w / 2 * (1 - a) - dx, 0, a, h / 2 * (1 - a) - dy),
        resample=Image.BILINEAR)
    x = np.clip((np.asarray(moved, np.float32) / 255.0) ** gamma * gain, 0.0, 1.0)
    return (x * 255.0 + 0.5).astype(np.uint8)


def jittered_templates(folder, files: np.ndarray, pipeline, seed: int = 7) -> np.ndarray:
    """(n, 512) template of the labelled (central) face of a jittered copy of each photo;
    NaN where no usable face was found in it."""
    from concurrent.futures import ThreadPoolExecutor

    from matcher.calibrate.embedding import central_face
    from matcher.face.pipeline import DecodedPhoto

    seeds = np.random.default_rng(seed).integers(0, 1 << 31, len(files))

    def one(i: int) -> np.ndarray:
        pixels = pipeline.decode((folder / str(files[i])).read_bytes())
        moved = jitter(pixels, np.random.default_rng(int(seeds[i])))
        face = central_face(pipeline.analyse(DecodedPhoto.full(moved)), moved.shape)
        if face is None or not face.quality.accepted:
            return np.full(512, np.nan, np.float32)
        return face.template

    with ThreadPoolExecutor(2) as pool:
        return np.stack(list(pool.map(one, range(len(files)))))
