"""The demo gallery `matcher demo` serves: the faces of the photo packaged with the models."""
from __future__ import annotations

import logging

from ..face.models import demo_photo
from ..face.pipeline import DetectorConfig, Pipeline
from ..gallery.served import ServedGallery
from ..templates import photo_sha256

log = logging.getLogger(__name__)

DEMO_PREFIX = "demo-player-"
DEMO_VALID_TO = 4_102_444_800.0  # 2100-01-01: the demo gallery never expires


def enrol_demo_gallery(pipeline: Pipeline, gallery: ServedGallery) -> int:
    """Enrol every face of the packaged players.jpg as demo-player-01.. (left to right).

    Idempotent: a restart finds the same photo and window and changes nothing. The group
    photo's faces are small, so it is detected at the reference's 640x640.
    """
    group = Pipeline(pipeline.pack, detector=DetectorConfig(input_size=(640, 640)),
                     quality=pipeline.quality_policy, limits=pipeline.limits,
                     sessions=pipeline.sessions)
    data = demo_photo("players.jpg").read_bytes()
    faces = sorted(group.analyse_bytes(data), key=lambda f: float(f.bbox[0]))
    sha = photo_sha256(data)
    for number, face in enumerate(faces, 1):
        gallery.enroll(f"{DEMO_PREFIX}{number:02d}", face.template[None, :], 0.0,
                       DEMO_VALID_TO, [sha])
    log.info("demo gallery: %d travellers from players.jpg", len(faces))
    return len(faces)
