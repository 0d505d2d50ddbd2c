"""Shared fixtures: the real face photos, one real pipeline per test session, and a real
server with the test photos enrolled (one per module that asks for it)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# The 25 photos live in the repository so a fresh clone's tests need nothing beside it.
FACES_DIR = REPO / "tests" / "data" / "faces"


def faces_dir_path() -> Path:
    """tests/data/faces, or $MATCHER_FACES_DIR to run the same tests on another copy."""
    override = os.environ.get("MATCHER_FACES_DIR")
    return Path(override) if override else FACES_DIR


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    path = faces_dir_path()
    if not (path / "labels.csv").exists():
        pytest.fail(f"face photos not found at {path} (labels.csv missing); "
                    "unset MATCHER_FACES_DIR to use tests/data/faces")
    return path


@pytest.fixture(scope="session")
def face_labels(faces_dir: Path) -> dict[str, dict[str, str]]:
    """file -> {identity, faces, note} from labels.csv."""
    with open(faces_dir / "labels.csv", newline="") as f:
        return {row["file"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="session")
def single_face_files(face_labels) -> list[str]:
    return sorted(f for f, row in face_labels.items() if row["faces"] == "1")


@pytest.fixture(scope="session")
def pipeline():
    from matcher.face.pipeline import Pipeline

    return Pipeline()


# Module scope: each test module that asks gets its own server, data directory and
# gallery, so one module's enrolments and removals never reach another's.
@pytest.fixture(scope="module")
def server(tmp_path_factory, pipeline):
    from service_helpers import ServerThread, server_config

    data = tmp_path_factory.mktemp("e2e")
    with ServerThread(server_config(data), pipeline) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from matcher.client import MatcherClient

    with MatcherClient(server.address, timeout=30.0, lane_id="K-01") as c:
        yield c


@pytest.fixture(scope="module")
def enrolled(client, faces_dir) -> dict[str, str]:
    """identity -> enrolled file; enrolled through the Enroll RPC."""
    from service_helpers import enrolment_plan

    plan = enrolment_plan(faces_dir)
    for identity, file in plan.items():
        resp = client.enroll(identity, [(faces_dir / file).read_bytes()])
        assert resp.traveller_id == identity and resp.added_templates == 1
    return plan
