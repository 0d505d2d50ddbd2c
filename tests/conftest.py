"""Shared fixtures: the real face photos and one real pipeline per test session."""
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
