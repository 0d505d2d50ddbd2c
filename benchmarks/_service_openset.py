"""The open-set day gallery through the real service (issue 18's targets): a ``matcher
serve`` process on loopback, bookings enrolled with photos over gRPC, every probe a photo
sent to Identify, decided by the service's own thresholds.

Who is who (lfw-dev, seeded): people with two or more usable photos are split in half,
booked and never booked; people with one photo are split 70 / 30 into booked distractors
and never-booked people, so the gallery holds about 1,800 travellers and about 1,000
never-booked people each probe once (the shape of the held-back check). A booked person
probes once with one of their other photos. Booking with two photos: people with three or
more usable photos are booked with two (fused by the service), everyone else with one.
Two-frame probes send two different photos of the person as frames of one request (an
upper bound on what two lane frames add).

FNIR and FPIR count the probes the service decided (MATCH / NO_MATCH) of enrolled
travellers: FNIR does not count refused bookings. A probe answered NO_FACE or LOW_QUALITY
is a recapture at the gate and is counted apart. A booking the service refuses whole is
counted and its person left out of the gallery. The headline, booked travellers cleared
by face, counts every booked traveller who comes to the gate: refused bookings,
recaptures and misses all count against it (issue 25).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from matcher.calibrate.pairs import capped_rows

from ._binomial import clopper_pearson
from .harness import Report

SINGLES_BOOKED = 0.7


def plan(identities: np.ndarray, usable: np.ndarray, seed: int = 0) -> dict:
    """Rows of booking photos, probes and frames per person (rows index labels.csv)."""
    rows = capped_rows(identities, usable)
    rng = np.random.default_rng(seed)
    people: dict[str, list[int]] = {}
    for i in rows.tolist():
        people.setdefault(str(identities[i]), []).append(i)
    names = sorted(people)
    multi = rng.permutation([n for n in names if len(people[n]) >= 2]).tolist()
    singles = rng.permutation([n for n in names if len(people[n]) == 1]).tolist()
    booked = set(multi[: len(multi) // 2]) | set(singles[: int(len(singles) * SINGLES_BOOKED)])
    out = {"booked": {}, "probes": []}
    for name in names:
        photos = people[name]
        if name not in booked:
            order = rng.permutation(photos).tolist()
            out["probes"].append({"person": name, "mated": False, "one": order[:1],
                                  "frames": order[:2]})
            continue
        order = [photos[0], *rng.permutation(photos[1:]).tolist()]
        two = len(order) >= 3
        out["booked"][name] = {"one": order[:1], "two": order[:2] if two else order[:1]}
        spare = order[2:] if two else order[1:]  # never a booking photo in either gallery
        if spare:
            out["probes"].append({"person": name, "mated": True, "one": spare[:1],
                                  "frames": spare[:2]})
    return out


def run_gallery(folder: Path, files: np.ndarray, plan_: dict, booking: str,
                address: str, frames: bool) -> dict:
    """Enrol the plan's bookings (``booking``: "one" or "two" photos) and send every probe;
    counts of what the service answered."""
    from matcher.client import MatcherClient
    from matcher.v1 import matcher_pb2 as pb

    def photo(i: int) -> bytes:
        return (folder / str(files[i])).read_bytes()

    counts = {"booked": 0, "booking_refused": 0, "mated": 0, "hits": 0, "nonmated": 0,
              "false_matches": 0, "recaptures": 0, "probes": 0, "wrong_traveller": 0,
              "arrivals": 0, "arrivals_not_enrolled": 0, "arrival_recaptures": 0,
              "bookings_disagree": 0, "photos_refused": {}, "bookings_partial": 0,
              "false_match_pairs": [], "false_match_people": [], "missed": []}
    with MatcherClient(address) as client:
        requests = [client.enroll_request(name, [photo(i) for i in b[booking]])
                    for name, b in sorted(plan_["booked"].items())]
        enrolled = set()
        refused = counts["photos_refused"]
        for req, resp in zip(requests, client.enroll_stream(requests, timeout=3600), strict=True):
            if resp.HasField("error"):
                counts["booking_refused"] += 1
                counts["bookings_disagree"] += "photos_disagree" in resp.error.message
                continue
            enrolled.add(req.traveller_id)
            counts["bookings_partial"] += any(not p.enrolled for p in resp.photos)
            for p in resp.photos:
                if not p.enrolled:
                    code = p.reason.split(":", 1)[0]
                    refused[code] = refused.get(code, 0) + 1
        counts["booked"] = len(enrolled)
        counts["gallery_info_searchable"] = int(client.gallery_info().searchable_travellers)
        for p in plan_["probes"]:
            counts["arrivals"] += p["mated"]
            if p["mated"] and p["person"] not in enrolled:
                counts["arrivals_not_enrolled"] += 1
                continue  # booking refused: the gate never gets to try
            if frames and len(p["frames"]) >= 2:
                resp = client.identify(frames=[photo(i) for i in p["frames"]], timeout=60)
            else:
                resp = client.identify(photo(p["one"][0]), timeout=60)
            counts["probes"] += 1
            if resp.decision not in (pb.MATCH, pb.NO_MATCH):
                counts["recaptures"] += 1
                counts["arrival_recaptures"] += p["mated"]
                continue
            match = resp.decision == pb.MATCH
            if p["mated"]:
                counts["mated"] += 1
                hit = match and resp.traveller_id == p["person"]
                counts["hits"] += hit
                counts["wrong_traveller"] += match and not hit
                if not hit:
                    top = resp.candidates[0] if resp.candidates else None
                    own = [c.score for c in resp.candidates if c.traveller_id == p["person"]]
                    counts["missed"].append(
                        f"{p['person']}: {resp.reason}, top {top.traveller_id if top else '-'} "
                        f"{top.score if top else float('nan'):.3f}, own "
                        f"{own[0] if own else float('nan'):.3f}")
            else:
                counts["nonmated"] += 1
                if match:
                    counts["false_matches"] += 1
                    counts["false_match_pairs"].append(
                        f"{p['person']} -> {resp.traveller_id} ({resp.score:.3f})")
                    counts["false_match_people"].append([p["person"], resp.traveller_id])
            counts["threshold"] = float(resp.threshold)
    return counts


def known_pairs() -> set[frozenset[str]]:
    """Pairs of lfw-dev names the shipped score model lists as one person under two names
    (label noise) or as look-alikes (relatives, one photograph): no threshold separates
    them, and the calibration states them apart (docs/operating-points.md)."""
    from matcher.face.models import default_pack
    from matcher.gallery.scoremodel import load_score_model

    source = load_score_model(default_pack().model_id).document.get("source", {})
    return {frozenset((d["a"], d["b"])) for key in ("label_noise_dropped", "look_alikes_apart")
            for d in source.get(key, [])}


def headline(report: Report, tag: str, r: dict) -> None:
    """Booked travellers cleared by face (enrolled AND matched to their own id on the first
    capture, of every booked traveller who comes to the gate) beside its parts."""
    arrivals = max(r["arrivals"], 1)
    bookings = r["booked"] + r["booking_refused"]
    lo, hi = clopper_pearson(r["hits"], arrivals)
    report.figure(f"{tag}_cleared_by_face", r["hits"] / arrivals, "rate", summary=True,
                  note=f"{r['hits']} of {r['arrivals']} booked travellers at the gate "
                       f"(95% CI {lo:.3f}..{hi:.3f}); {r['arrivals_not_enrolled']} never "
                       f"enrolled, {r['arrival_recaptures']} asked to recapture, "
                       f"{r['mated'] - r['hits']} missed by the matcher")
    lo, hi = clopper_pearson(r["booking_refused"], max(bookings, 1))
    report.figure(f"{tag}_failure_to_enrol", r["booking_refused"] / max(bookings, 1), "rate",
                  summary=True,
                  note=f"{r['booking_refused']} of {bookings} bookings refused whole (95% CI "
                       f"{lo:.3f}..{hi:.3f}; {r['bookings_disagree']} as photos_disagree); "
                       f"{r['bookings_partial']} enrolled from part of their photos; photos "
                       f"refused by reason {dict(sorted(r['photos_refused'].items()))}")


def through_the_service(report: Report, lfw) -> list[dict]:
    """Both bookings, one- and two-frame probes; figures and params.

    Every photo of a person (at most 10) may be a booking photo or a probe, group photos
    included: what a booking office receives, not what calibration kept."""
    from .suite_service import served

    plan_ = plan(lfw.embedded.identities, np.ones(len(lfw.embedded.identities), bool))
    rows = []
    for booking in ("one", "two"):
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            with served(data, []) as address:
                for frames in (False, True):
                    c = run_gallery(lfw.folder, lfw.embedded.files, plan_, booking, address,
                                    frames)
                    rows.append({"booking": booking, "frames": 2 if frames else 1, **c})
    known = known_pairs()
    for r in rows:
        tag = f"lfw_service_{r['booking']}_photo_{r['frames']}_frame"
        fpir = r["false_matches"] / max(r["nonmated"], 1)
        apart = [text for text, people in zip(r["false_match_pairs"], r["false_match_people"],
                                              strict=True) if frozenset(people) in known]
        report.figure(f"{tag}_fpir_known_pairs_apart",
                      (r["false_matches"] - len(apart)) / max(r["nonmated"] - len(apart), 1),
                      "rate", summary=True,
                      note=f"{r['false_matches'] - len(apart)} of {r['nonmated'] - len(apart)}: "
                           f"the {len(apart)} false matches between people the shipped score "
                           f"model lists as one person under two names or as look-alikes "
                           f"counted apart ({'; '.join(apart) or 'none'})")
        fnir = 1 - r["hits"] / max(r["mated"], 1)
        lo, hi = clopper_pearson(r["false_matches"], r["nonmated"])
        report.figure(f"{tag}_fpir", fpir, "rate", summary=True,
                      note=f"{r['false_matches']} of {r['nonmated']} never-booked people "
                           f"matched (95% CI {lo:.2g}..{hi:.2g}) at threshold "
                           f"{r.get('threshold', float('nan')):.4f}, "
                           f"{r['gallery_info_searchable']} travellers searchable")
        report.figure(f"{tag}_fnir", fnir, "rate", summary=True,
                      note=f"{r['mated'] - r['hits']} of {r['mated']} booked people not "
                           f"found ({r['wrong_traveller']} as somebody else)")
        report.figure(f"{tag}_recapture", r["recaptures"] / max(r["probes"], 1), "rate",
                      note=f"{r['recaptures']} of {r['probes']} probes NO_FACE or "
                           f"LOW_QUALITY; {r['booking_refused']} bookings refused")
        headline(report, tag, r)
    report.param(service_open_set=rows)
    return rows


def main() -> None:
    """``python -m benchmarks._service_openset``: the day gallery alone, on lfw-dev's labels
    as they are (the accuracy suite merges its known label noise first, so its split of the
    same people differs); prints every figure with its note."""
    from types import SimpleNamespace

    from matcher.calibrate.embedding import read_labels

    from ._faces import lfw_dir

    folder = lfw_dir()
    if folder is None:
        return
    rows = read_labels(folder)
    embedded = SimpleNamespace(identities=np.array([who for _, who in rows]),
                               files=np.array([file for file, _ in rows]))
    report = Report("service_openset", quick=False)
    through_the_service(report, SimpleNamespace(folder=folder, embedded=embedded))
    for key, entry in report.figures.items():
        print(f"{key} {entry['median']:.5g} {entry.get('note', '')}")


if __name__ == "__main__":
    main()
