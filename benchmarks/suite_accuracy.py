"""Accuracy: the shared photos (is the pipeline wired right?) and, when present, lfw-dev
(do the shipped operating points hold on thousands of people?).

Shared photos: every pair of single-face photos is compared (largest face, default
pipeline). With 6 people the set proves the pipeline is wired right (colour order,
alignment, EXIF, normalisation), not where the tail of the impostor distribution lies.

lfw-dev (../shared/data/lfw-dev, $MATCHER_LFW_DIR or ``--lfw DIR``; 2,875 people): the
served pipeline's templates (matcher.calibrate.embedding.embed_folder, cached), at most 10 photos a
person, and every figure with a 95 % interval from resampling identities (_lfw.py):
1:1 DET and the impostor tail against the shipped score model, LFW's 10-fold accuracy on
its own pairs, the open-set 1:N protocol (_openset.py) at the service's thresholds as the
gallery grows, the design choices of issue 10 item 4, each measured on the same data, and
the enrolment rule (which face of a booking photo is enrolled, _enrolment_lfw.py).
``--quick`` uses 600 people drawn with a fixed seed. Passport chip portraits (issue 26,
_document_lfw.py): FNMR and FMR of Verify with a JPEG 2000 chip portrait in a DG2 against
the plain JPEG reference, and Verify-with-document's cost next to Verify against a
booking; ``MATCHER_BENCH_ACCURACY_ONLY=document`` runs only that part.
"""
from __future__ import annotations

import os
from statistics import NormalDist

import numpy as np

from matcher.face.models import default_pack
from matcher.face.pipeline import Pipeline, largest_face
from matcher.gallery.decision import DecisionPolicy, consistency_threshold
from matcher.gallery.scoremodel import load_score_model

from ._faces import lfw_dir, load_photos, pair_scores
from .harness import Report

GENUINE_FLOOR = 0.50
IMPOSTOR_CEILING = 0.20
GALLERY_SIZES = (100, 1_000, 10_000)   # 1:N operating points: travellers booked for a day


def run(report: Report, quick: bool) -> None:
    from ._document_lfw import document_accuracy, verify_cost

    if os.environ.get("MATCHER_BENCH_ACCURACY_ONLY") == "document":
        verify_cost(report, quick)
        folder = lfw_dir()
        if folder is not None:
            document_accuracy(report, folder, quick)
        return
    shared = _shared_photos(report)
    verify_cost(report, quick)
    folder = lfw_dir()
    if folder is None:
        report.param(lfw="absent: shared-photo figures only")
        _plot(report, shared, None)
        return
    from ._accuracy_lfw import lfw_accuracy  # only when there is data to run it on
    from ._enrolment_lfw import enrolment_accuracy

    lfw = lfw_accuracy(report, folder, quick)
    policy = DecisionPolicy()
    model = load_score_model(default_pack().model_id)
    lfw["enrolment"] = enrolment_accuracy(report, folder, consistency_threshold(model, policy),
                                          policy.fmr_consistency, quick)
    document_accuracy(report, folder, quick)
    _plot(report, shared, lfw)


def _shared_photos(report: Report) -> tuple:
    photos = load_photos()
    pipe = Pipeline(threads=2)
    faces = {p.file: pipe.analyse_bytes(p.data) for p in photos}
    singles = [p for p in photos if p.faces == 1]
    templates = {p.file: largest_face(faces[p.file]).template for p in singles
                 if faces[p.file]}
    identity = {p.file: p.identities[0] for p in singles}
    genuine, impostor = pair_scores(templates, identity)
    report.param(photos=len(photos), single_face_photos=len(singles),
                 identities=len(set(identity.values())), genuine_pairs=len(genuine),
                 impostor_pairs=len(impostor), detector=str(pipe.detector_config))

    report.figure("genuine_min", genuine.min(), "cosine", summary=True)
    report.figure("genuine_mean", genuine.mean(), "cosine")
    report.figure("impostor_max", impostor.max(), "cosine", summary=True)
    report.figure("impostor_mean", impostor.mean(), "cosine")
    report.figure("impostor_std", impostor.std(ddof=1), "cosine")
    report.figure("separation_gap", genuine.min() - impostor.max(), "cosine",
                  note="lowest genuine minus highest impostor; > 0 means no overlap")
    eer, eer_threshold = _eer(genuine, impostor)
    report.figure("eer", eer, "rate", note=f"at threshold {eer_threshold:.3f}")
    report.check("every_genuine_pair>=0.50", genuine.min() >= GENUINE_FLOOR,
                 f"min genuine {genuine.min():.3f} over {len(genuine)} pairs")
    report.check("every_impostor_pair<=0.20", impostor.max() <= IMPOSTOR_CEILING,
                 f"max impostor {impostor.max():.3f} over {len(impostor)} pairs")

    points = _operating_points(pipe.model_id, impostor)
    for name, threshold, source in points:
        fmr = float((impostor >= threshold).mean())
        fnmr = float((genuine < threshold).mean())
        report.figure(f"threshold_{name}", threshold, "cosine", summary=name == "1:1_fmr_1e-05",
                      note=source)
        report.figure(f"empirical_fmr_at_{name}", fmr, "rate")
        report.figure(f"empirical_fnmr_at_{name}", fnmr, "rate")
    one_to_one = next(t for n, t, _ in points if n.startswith("1:1"))
    report.check("1:1_operating_point_separates_the_shared_set",
                 genuine.min() >= one_to_one > impostor.max(),
                 f"threshold {one_to_one:.3f}, genuine min {genuine.min():.3f}, "
                 f"impostor max {impostor.max():.3f}")
    _group_identification(report, photos, faces, templates, identity, one_to_one)
    return genuine, impostor, points


def _eer(genuine: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """Equal error rate and its threshold, scanning every observed score."""
    best = (1.0, 0.0)
    for t in np.unique(np.concatenate([genuine, impostor])):
        fmr, fnmr = (impostor >= t).mean(), (genuine < t).mean()
        if max(fmr, fnmr) < best[0]:
            best = (float(max(fmr, fnmr)), float(t))
    return best


def _operating_points(model_id: str, impostor: np.ndarray) -> list[tuple[str, float, str]]:
    """(name, threshold, where it comes from) for 1:1 and 1:N at several gallery sizes."""
    try:
        from matcher.gallery.decision import (
            DecisionPolicy,
            operating_point_1to1,
            operating_point_1toN,
        )
        from matcher.gallery.scoremodel import load_score_model
    except ImportError:  # the decision module is not there: report the empirical points
        return [("empirical_fmr_0", float(impostor.max()) + 1e-6,
                 "just above the highest impostor score (no gallery/decision.py)")]
    policy = DecisionPolicy()
    model = load_score_model(model_id)
    point = operating_point_1to1(model, policy.fmr_1to1, policy.min_threshold,
                                 policy.confidence_1to1, "single")
    points = [(f"1:1_fmr_{policy.fmr_1to1:g}", point.threshold,
               f"matcher.gallery.decision, FMR {policy.fmr_1to1:g}, floor {policy.min_threshold}")]
    for n in GALLERY_SIZES:
        p = operating_point_1toN(model, policy.fpir_1toN, n, policy.min_threshold,
                                 policy.confidence_1toN)
        points.append((f"1:N_fpir_{policy.fpir_1toN:g}_n{n}", p.threshold,
                       f"matcher.gallery.decision, FPIR {policy.fpir_1toN:g} over {n} travellers "
                       f"(FMR {p.comparison_fmr:.2g} per comparison)"))
    return points


def _group_identification(report: Report, photos, faces, templates: dict[str, np.ndarray],
                          identity: dict[str, str], threshold: float) -> None:
    """Each face of the group photos against the single-face photos as a gallery."""
    names = sorted(templates)
    gallery = np.stack([templates[f] for f in names])
    correct = total = 0
    wrong = []
    for p in photos:
        if p.faces == 1:
            continue
        found = []
        for face in faces[p.file]:
            scores = gallery @ face.template
            best = int(np.argmax(scores))
            found.append(identity[names[best]] if scores[best] >= threshold else "unknown")
        expected = sorted(p.identities)
        total += len(expected)
        matched = sum(min(found.count(x), expected.count(x)) for x in set(expected))
        correct += matched
        if matched != len(expected):
            wrong.append(f"{p.file}: {sorted(found)} vs {expected}")
    report.figure("group_faces_identified", correct / max(total, 1), "fraction",
                  summary=True, note=f"{correct}/{total} at the 1:1 threshold "
                                     f"{threshold:.3f}, strangers must come back unknown")
    report.check("group_photos_identified", not wrong, "; ".join(wrong) or "all correct")


def _plot(report: Report, shared: tuple, lfw: dict | None) -> None:
    """The shared-photo panels; with lfw-dev, its seven panels below them."""
    if lfw is None:
        _, axes = report.plot(1, 2, figsize=(13, 5))
        _plot_shared(*axes.ravel(), *shared)
        return
    from ._accuracy_plot import plot_lfw
    from ._accuracy_unseen import plot_probe_options, plot_unseen
    from ._enrolment_lfw import plot as plot_enrolment

    _, axes = report.plot(5, 3, figsize=(20, 26))
    axes = axes.ravel()
    _plot_shared(axes[0], axes[1], *shared)
    plot_lfw(axes[2:9], lfw)
    plot_unseen(axes[9], axes[10], lfw["unseen"], lfw["target_fpir"])
    plot_probe_options(axes[11], lfw["unseen"])
    plot_enrolment(axes[12], axes[13], lfw["enrolment"])
    axes[14].axis("off")


def _plot_shared(ax_hist, ax_det, genuine: np.ndarray, impostor: np.ndarray,
                 points: list[tuple[str, float, str]]) -> None:
    bins = np.linspace(-0.3, 1.0, 53)
    ax_hist.hist(impostor, bins=bins, alpha=0.6, label=f"impostor ({len(impostor)} pairs)",
                 color="tab:red")
    ax_hist.hist(genuine, bins=bins, alpha=0.6, label=f"genuine ({len(genuine)} pairs)",
                 color="tab:green")
    for i, (name, t, _) in enumerate(points):
        ax_hist.axvline(t, color="k", ls=["-", "--", ":", "-."][i % 4], lw=1,
                        label=f"{name}: {t:.3f}")
    ax_hist.set_xlabel("cosine similarity of the two templates")
    ax_hist.set_ylabel("pairs")
    ax_hist.set_title("genuine vs impostor scores (shared photos)")
    ax_hist.legend(fontsize=7)

    thresholds = np.linspace(-0.3, 1.0, 1301)
    fmr = np.array([(impostor >= t).mean() for t in thresholds])
    fnmr = np.array([(genuine < t).mean() for t in thresholds])
    floor = 0.5 / max(len(impostor), len(genuine))  # plot zeros at half the resolution
    ax_det.loglog(np.maximum(fmr, floor), np.maximum(fnmr, floor), "b-", drawstyle="steps-post",
                  label="empirical (zeros drawn at half the resolution)")
    # With no overlap the empirical curve is a corner; Gaussian fits to both score sets show
    # where the operating points sit in the tails the small set cannot reach.
    imp = NormalDist(float(impostor.mean()), float(impostor.std(ddof=1)))
    gen = NormalDist(float(genuine.mean()), float(genuine.std(ddof=1)))
    fine = np.linspace(-0.3, 1.0, 2601)
    model_fmr = np.array([1.0 - imp.cdf(t) for t in fine])
    model_fnmr = np.array([gen.cdf(t) for t in fine])
    keep = (model_fmr > 1e-12) & (model_fnmr > 1e-12)
    ax_det.loglog(model_fmr[keep], model_fnmr[keep], "k--", lw=1,
                  label="Gaussian fits to both score sets (model)")
    for name, t, _ in points:
        ax_det.plot([max(1.0 - imp.cdf(t), 1e-12)], [max(gen.cdf(t), 1e-12)], "o",
                    label=f"{name} (t={t:.3f})")
    ax_det.set_xlabel("false match rate (FMR)")
    ax_det.set_ylabel("false non-match rate (FNMR)")
    ax_det.set_xlim(1e-9, 1.0)
    ax_det.set_ylim(1e-6, 1.0)
    ax_det.set_title("DET curve")
    ax_det.grid(True, which="both", alpha=0.3)
    ax_det.legend(fontsize=7)
