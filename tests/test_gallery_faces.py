"""Acceptance on real faces: enrol one photo per person through the real pipeline, then
identify every other photo, the group photos, a removed traveller and an ended booking."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from matcher.errors import UnknownTraveller
from matcher.gallery.decision import Decider, Outcome, Reason
from matcher.gallery.primary import PrimaryGallery

NOW = 1_800_000_000.0
WINDOW = (NOW - 3600, NOW + 8 * 3600)


@pytest.fixture(scope="module")
def face_templates(pipeline, faces_dir: Path, face_labels) -> dict[str, np.ndarray]:
    """file -> (faces, 512) templates of every face found in it."""
    out = {}
    images = {f: pipeline.decode((faces_dir / f).read_bytes()) for f in face_labels}
    for f, faces in zip(images, pipeline.analyse_many(list(images.values())), strict=True):
        out[f] = np.stack([x.template for x in faces])
    return out


@pytest.fixture(scope="module")
def enrolment_files(single_face_files, face_labels) -> dict[str, str]:
    """identity -> the first single-face photo of that person (the booking photo)."""
    chosen: dict[str, str] = {}
    for f in single_face_files:
        chosen.setdefault(face_labels[f]["identity"], f)
    return chosen


@pytest.fixture
def gallery(tmp_path, pipeline, faces_dir, face_templates, enrolment_files):
    g = PrimaryGallery.open(tmp_path / "gallery", pipeline.model_id)
    for identity, f in enrolment_files.items():
        single = only_face(face_templates[f])
        g.enroll(identity, single, *WINDOW,
                 [hashlib.sha256((faces_dir / f).read_bytes()).hexdigest()])
    yield g
    g.close()


def only_face(templates: np.ndarray) -> np.ndarray:
    assert len(templates) == 1
    return templates[:1]


def test_every_other_single_face_photo_identifies_at_rank1(
        gallery, face_templates, single_face_files, face_labels, enrolment_files):
    decider = Decider(gallery)
    probes = [f for f in single_face_files if f not in enrolment_files.values()]
    assert len(probes) >= 15
    decisions = decider.identify_many(np.concatenate([face_templates[f] for f in probes]),
                                      k=5, now=NOW)
    for f, d in zip(probes, decisions, strict=True):
        want = face_labels[f]["identity"]
        assert d.candidates[0].traveller_id == want, f
        assert d.outcome is Outcome.MATCH and d.traveller_id == want, (f, d.reason, d.score)
    # and 1:1 against the right traveller passes, against a wrong one fails
    for f in probes:
        want = face_labels[f]["identity"]
        assert decider.verify(face_templates[f][0], want, NOW).is_match
        wrong = next(i for i in enrolment_files if i != want)
        d = decider.verify(face_templates[f][0], wrong, NOW)
        assert d.outcome is Outcome.NO_MATCH and d.reason is Reason.BELOW_THRESHOLD


def test_group_photos_and_the_unknown_face(gallery, face_templates, face_labels):
    decider = Decider(gallery)
    for f in ("group_obama_biden.jpg", "group_two_people.jpg",
              "group_kit_harington_rose_leslie.jpg"):
        decisions = decider.identify_many(face_templates[f], k=5, now=NOW)
        assert len(decisions) == int(face_labels[f]["faces"])
        people = [p for p in face_labels[f]["identity"].split(";") if p != "unknown"]
        matched = sorted(d.traveller_id for d in decisions if d.is_match)
        assert matched == sorted(people), f
        unmatched = [d for d in decisions if not d.is_match]
        assert len(unmatched) == face_labels[f]["identity"].count("unknown")
        for d in unmatched:  # the third face of group_obama_biden.jpg
            assert d.outcome is Outcome.NO_MATCH and d.reason is Reason.BELOW_THRESHOLD


def test_removed_traveller_is_never_returned_again(gallery, face_templates, tmp_path,
                                                   pipeline):
    decider = Decider(gallery)
    probe = face_templates["obama_2.jpg"]
    assert decider.identify(probe[0], now=NOW).traveller_id == "obama"
    gallery.remove("obama")
    for _ in range(2):
        d = decider.identify(probe[0], now=NOW)
        assert d.outcome is Outcome.NO_MATCH
        assert "obama" not in {c.traveller_id for c in d.candidates}
        with pytest.raises(UnknownTraveller):
            decider.verify(probe[0], "obama", NOW)
        assert decider.claim_then_search(probe[0], "obama", NOW, fallback=False).reason \
            is Reason.UNKNOWN_TRAVELLER
        gallery.rebuild(now=NOW)  # nor after a rebuild
    gallery.close()
    # nor after a restart
    with PrimaryGallery.open(tmp_path / "gallery", pipeline.model_id) as reopened:
        assert "obama" not in {c.traveller_id for c in
                               reopened.search(probe, 6, NOW)[0]}


def test_booking_outside_its_window_is_not_matched(gallery, face_templates):
    decider = Decider(gallery)
    probe = face_templates["kit_harington_2.jpg"][0]
    assert decider.identify(probe, now=NOW).traveller_id == "kit_harington"
    for when in (WINDOW[0] - 1, WINDOW[1], WINDOW[1] + 86400):
        assert decider.identify(probe, now=when).outcome is Outcome.NO_MATCH
        d = decider.verify(probe, "kit_harington", when)
        assert d.outcome is Outcome.NO_MATCH and d.reason is Reason.OUTSIDE_WINDOW
    # claim-then-search: a valid claim matches in 1:1; an ended one falls back and still fails
    assert decider.claim_then_search(probe, "kit_harington", NOW).mode == "verify"
    late = decider.claim_then_search(probe, "kit_harington", WINDOW[1] + 1)
    assert late.outcome is Outcome.NO_MATCH and late.fallback_used


def test_claim_then_search_finds_the_real_traveller_behind_a_wrong_claim(
        gallery, face_templates):
    decider = Decider(gallery)
    probe = face_templates["rose_leslie_2.jpg"][0]
    d = decider.claim_then_search(probe, "biden", NOW)
    assert d.fallback_used and d.mode == "identify"
    assert d.is_match and d.traveller_id == "rose_leslie" and d.claimed_traveller_id == "biden"
    assert not decider.claim_then_search(probe, "biden", NOW, fallback=False).is_match
