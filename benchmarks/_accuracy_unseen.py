"""Issue 18 on lfw-dev: which threshold method holds on people the calibration never saw
(_threshold_cv), what flip augmentation and multi-frame probes buy (_fusion_lfw), and
what the shipped score model predicts at large N. Figures, params and the plot panels."""
from __future__ import annotations

import numpy as np

from matcher.calibrate.pairs import capped_rows
from matcher.face.pipeline import Pipeline
from matcher.gallery.decision import CONFIDENCE_1TON, operating_point_1toN
from matcher.gallery.scoremodel import FUSED, SINGLE

from ._fusion_lfw import flip_gain, frame_gain, jittered_templates
from ._lfw import embedded_lfw, merge_label_noise
from ._threshold_cv import cross_validate
from .harness import Report

EXPECTED_SIZES = (1_000, 10_000, 40_000)


def unseen_people(report: Report, lfw) -> dict:
    """lfw: _lfw.Lfw (label noise already merged into one identity)."""
    rows = capped_rows(lfw.embedded.identities, lfw.embedded.usable())
    x, ids = lfw.embedded.templates[rows], lfw.embedded.identities[rows]
    quick = lfw.quick
    splits, bootstrap = (6, 30) if quick else (100, 200)
    cv = cross_validate(x, ids, [], splits=splits, bootstrap=bootstrap, policy=lfw.policy)
    _record_cv(report, cv, lfw.policy, splits, bootstrap, quick)
    out = {"cv": cv, "expected": _expected(report, lfw), "both_booked": both_booked(report, lfw)}

    pairs = (4, 30) if quick else (30, 100)
    flipped, _ = merge_label_noise(embedded_lfw(lfw.folder, Pipeline(threads=1, flip=True),
                                                quick), lfw.model)
    flip = flip_gain(x, flipped.templates[rows], ids, splits=pairs[0], bootstrap=pairs[1],
                     policy=lfw.policy)
    _record_flip(report, flip, pairs[0])
    out["flip"] = flip

    jittered = jittered_templates(lfw.folder, lfw.embedded.files[rows], Pipeline(threads=1))
    frames = frame_gain(x, jittered, ids, splits=pairs[0], bootstrap=pairs[1],
                        policy=lfw.policy)
    for label, r in frames.items():
        key = label.replace(" + ", "_").replace(" ", "_")
        report.figure(f"lfw_frames_{key}_fnir", r["fnir"], "rate", summary=label != "one photo",
                      note=f"two-photo booking, N = the half's gallery, mean over {pairs[0]} "
                           f"identity-disjoint splits; FPIR {r['fpir']:.2g}")
    out["frames"] = frames
    if not quick:  # about 3,000 photos through a real server, twice
        from ._service_openset import through_the_service

        out["service"] = through_the_service(report, lfw)
    return out


def _record_cv(report: Report, cv: dict, policy, splits: int, bootstrap: int,
               quick: bool) -> None:
    table = sorted(cv["pooled"], key=lambda r: (r["bookings"], r["method"], r["n"]))
    report.param(threshold_cv={
        "splits": splits, "bootstrap": bootstrap, "target_fpir": policy.fpir_1toN,
        "unit": "people: one probe per booked and per never-booked person",
        "look_alikes": [f"{d['a']} / {d['b']} ({d['best_score']})" for d in cv["look_alikes"]],
        "choice": cv["choice"]["method"],
        "table": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()
                   if k not in ("false_matches",)} for r in table],
        "look_alike_false_matches": {
            f"{r['method']} / {r['bookings']} photo(s) / N {r['size']}": r["false_matches"]
            for r in table if r["size"] == "max"},
    })
    shipped = f"look-alikes apart: bound {CONFIDENCE_1TON:.0%}"
    for r in table:
        if r["method"] != shipped:
            continue
        tag = f"lfw_cv_{r['bookings']}photo_n{r['size']}"
        lo, hi = r["fpir_ci"]
        report.figure(f"{tag}_fpir", r["fpir"], "rate", summary=r["size"] == "max",
                      note=f"{r['false_positives']} of {r['nonmated']} never-booked people "
                           f"matched (95% CI {lo:.2g}..{hi:.2g}); "
                           f"{r['look_alike_false_positives']} of them a look-alike")
        report.figure(f"{tag}_fpir_without_look_alikes", r["fpir_without_look_alikes"],
                      "rate")
        report.figure(f"{tag}_fnir", r["fnir"], "rate", summary=r["size"] == "max",
                      note=f"{r['misses']} of {r['mated']} booked people missed; mean "
                           f"threshold {r['threshold']:.4f} at mean N {r['n']:.0f}")
    for r in cv["one_to_one"]:
        report.figure(f"lfw_cv_1to1_{r['kind']}_fmr", r["fmr"], "rate", summary=True,
                      note=f"{r['false_matches']} of {r['impostor_pairs']} impostor pairs of "
                           f"unseen people at mean threshold {r['threshold']:.4f}")
        report.figure(f"lfw_cv_1to1_{r['kind']}_fnmr", r["fnmr"], "rate", summary=True)
        if not quick:
            report.check(f"lfw_cv_1to1_{r['kind']}_fmr_holds", r["fmr"] <= policy.fmr_1to1,
                         f"FMR {r['fmr']:.3g} on unseen people, promised {policy.fmr_1to1:g}")
    if not quick:  # a 600-person quick run is too small to choose with
        report.check("lfw_cv_chooses_the_shipped_1toN_method",
                     cv["choice"]["method"] == shipped,
                     f"chosen: {cv['choice']['method']}; shipped: {shipped}")


def _record_flip(report: Report, flip: dict, splits: int) -> None:
    for key, gain in flip["relative_drop"].items():
        report.figure(f"lfw_flip_{key}_relative_drop", gain["mean"], "fraction",
                      note=f"plain {flip['plain'][key]:.4f} -> flip {flip['flip'][key]:.4f}; "
                           f"2.5-97.5 % over {splits} splits {gain['lo']:+.3f}..{gain['hi']:+.3f}")
    report.param(flip_augmentation={"adopt": flip["adopt"], **flip})


def _expected(report: Report, lfw) -> list[dict]:
    """FNIR to expect at large N from the shipped model: FNMR of the booking kind at the
    1:N threshold (the genuine comparison decides; the margin rule adds a little)."""
    model, policy = lfw.model, lfw.policy
    rows = []
    for n in EXPECTED_SIZES:
        point = operating_point_1toN(model, policy.fpir_1toN, n, policy.min_threshold,
                                     policy.confidence_1toN)
        for kind, label in ((SINGLE, "one"), (FUSED, "two")):
            f, lo, hi = model.fnmr_at(point.threshold, kind)
            report.figure(f"lfw_expected_fnir_n{n}_{label}_photo", f, "rate",
                          note=f"threshold {point.threshold:.4f}, 95% CI {lo:.3g}..{hi:.3g}; "
                               f"supported by the data: {point.supported}")
            rows.append({"n": n, "booking": label, "threshold": point.threshold,
                         "fnir": f, "lo": lo, "hi": hi, "supported": point.supported})
    return rows


def plot_unseen(ax_cv, ax_sizes, unseen: dict, target: float) -> None:
    """Panel 1: FPIR without look-alikes vs FNIR per method at the largest gallery.
    Panel 2: the shipped method's FPIR and FNIR as N grows (one and two booking photos)."""
    shipped = f"look-alikes apart: bound {CONFIDENCE_1TON:.0%}"
    for bookings, marker in ((1, "o"), (2, "s")):
        rs = [r for r in unseen["cv"]["pooled"]
              if r["size"] == "max" and r["bookings"] == bookings]
        for r in rs:
            colour = "tab:green" if r["method"] == shipped else "tab:grey"
            ax_cv.plot(max(r["fpir_without_look_alikes"], 1e-5), r["fnir"], marker,
                       color=colour, ms=5)
            if bookings == 1:
                ax_cv.annotate(r["method"], (max(r["fpir_without_look_alikes"], 1e-5),
                                             r["fnir"]), fontsize=5)
    ax_cv.axvline(target, color="k", ls="--", lw=1, label=f"target FPIR {target:g}")
    ax_cv.set_xscale("log")
    ax_cv.set_yscale("log")
    ax_cv.set_xlabel("FPIR on unseen people, look-alikes apart")
    ax_cv.set_ylabel("FNIR")
    ax_cv.set_title("threshold methods, cross-validated (o one, s two booking photos)")
    ax_cv.legend(fontsize=7)
    for bookings, colour in ((1, "tab:blue"), (2, "tab:orange")):
        rs = sorted((r for r in unseen["cv"]["pooled"]
                     if r["method"] == shipped and r["bookings"] == bookings),
                    key=lambda r: r["n"])
        n = [r["n"] for r in rs]
        ax_sizes.plot(n, [r["fnir"] for r in rs], "-o", color=colour,
                      label=f"FNIR, {bookings} booking photo(s)")
        ax_sizes.plot(n, [max(r["fpir"], 1e-5) for r in rs], ":^", color=colour,
                      label=f"FPIR with look-alikes, {bookings}")
        ax_sizes.plot(n, [max(r["fpir_without_look_alikes"], 1e-5) for r in rs], "--v",
                      color=colour, label=f"FPIR without look-alikes, {bookings}")
    ax_sizes.axhline(target, color="k", ls="--", lw=1)
    ax_sizes.set_yscale("log")
    ax_sizes.set_xlabel("travellers in the gallery (N)")
    ax_sizes.set_ylabel("rate")
    ax_sizes.set_title(f"shipped method ({shipped}) on unseen people")
    ax_sizes.legend(fontsize=6)


def plot_probe_options(ax, unseen: dict) -> None:
    """FNIR of the probe options: flip augmentation, and one or two frames."""
    flip, frames = unseen["flip"], unseen["frames"]
    labels, values = [], []
    for key in ("fnir_one_photo", "fnir_two_photos"):
        booking = key.split("_", 1)[1].replace("_", " ")
        labels += [f"plain, {booking}", f"flip, {booking}"]
        values += [flip["plain"][key], flip["flip"][key]]
    for label, r in frames.items():
        labels.append(f"probe: {label}\n(two-photo booking)")
        values.append(r["fnir"])
    ax.barh(range(len(values)), values, color="tab:blue")
    ax.set_yticks(range(len(values)), labels, fontsize=6)
    ax.set_xlabel("FNIR at the 1:N operating point (unseen people, largest half gallery)")
    ax.set_title("probe options: flip augmentation and frames")


def both_booked(report: Report, lfw) -> dict:
    """The look-alike pairs the shipped model states apart, with both people booked: what
    the service answers for each of their other photos (the margin rule's job)."""
    from ._threshold_cv import _top2

    rows = capped_rows(lfw.embedded.identities, lfw.embedded.usable())
    x, ids = lfw.embedded.templates[rows], lfw.embedded.identities[rows]
    pairs = lfw.model.document.get("source", {}).get("look_alikes_apart", [])
    names = np.unique(ids)
    first = np.array([np.flatnonzero(ids == n)[0] for n in names])
    gallery = x[first]                                   # everybody booked with one photo
    n = len(names)
    point = operating_point_1toN(lfw.model, lfw.policy.fpir_1toN, n,
                                 lfw.policy.min_threshold, lfw.policy.confidence_1toN)
    outcome = {"right": 0, "other_of_the_pair": 0, "ambiguous": 0, "below_threshold": 0,
               "someone_else": 0}
    for d in pairs:
        members = {d["a"], d["b"]}
        for who in members:
            probe_rows = np.flatnonzero(ids == who)[1:]
            if not len(probe_rows):
                continue
            top1, at, top2 = _top2(x[probe_rows] @ gallery.T)
            for s1, col, s2 in zip(top1, at, top2, strict=True):
                if s1 < point.threshold:
                    outcome["below_threshold"] += 1
                elif s1 - s2 < lfw.policy.margin:
                    outcome["ambiguous"] += 1
                elif names[col] == who:
                    outcome["right"] += 1
                elif names[col] in members:
                    outcome["other_of_the_pair"] += 1
                else:
                    outcome["someone_else"] += 1
    total = sum(outcome.values())
    report.figure("lfw_look_alikes_both_booked_named_the_other", outcome["other_of_the_pair"],
                  "probes", note=f"of {total} probes of the {len(pairs)} look-alike pairs, "
                                 f"everyone booked (N={n}, threshold {point.threshold:.4f}): "
                                 f"{outcome}")
    report.param(look_alikes_both_booked=outcome)
    return outcome
