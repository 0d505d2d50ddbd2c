"""Shared fixtures: the real face photos and one real pipeline per test session."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_faces_dir() -> Path:
    """../shared/data/faces beside the checkout (CI lays shared/ next to the clone)."""
    override = os.environ.get("MATCHER_FACES_DIR")
    path = Path(override) if override else REPO.parent / "shared" / "data" / "faces"
    return path


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    path = shared_faces_dir()
    if not (path / "labels.csv").exists():
        pytest.fail(f"shared face photos not found at {path}; set MATCHER_FACES_DIR")
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
    from matcher.pipeline import Pipeline

    return Pipeline()
