"""Label noise and look-alike families: impostor pairs of people that score in the genuine
range, dropped where names or a shared photograph say they are one person, listed apart
where nothing does (relatives, twins, look-alikes)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .pairs import PairScores


def _name_evidence(a: str, b: str) -> float:
    """How alike two names are, 0..1: the same words in another order count as 1."""
    import difflib

    def words(name: str) -> list[str]:
        return name.lower().replace("_", " ").replace("-", " ").split()

    if sorted(words(a)) == sorted(words(b)):
        return 1.0
    return difflib.SequenceMatcher(None, " ".join(words(a)), " ".join(words(b))).ratio()


def _thumbnail(path: Path) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L").resize((32, 32)), dtype=np.float64)
    except OSError:
        return None
    grey -= grey.mean()
    return grey / max(float(np.linalg.norm(grey)), 1e-9)


def _same_photograph(folder: Path, files_a: list[str], files_b: list[str]) -> bool:
    """Do the two identities share one photograph (correlation of 32x32 thumbnails)?"""
    thumbs_b = [t for t in (_thumbnail(folder / f) for f in files_b) if t is not None]
    for fa in files_a:
        ta = _thumbnail(folder / fa)
        if ta is not None and any(float((ta * tb).sum()) >= SAME_PHOTO_CORRELATION
                                  for tb in thumbs_b):
            return True
    return False


NAME_EVIDENCE = 0.8           # John_Gruden / Jon_Gruden: 0.95; siblings share half a name
SAME_PHOTO_CORRELATION = 0.95  # one photograph filed twice, not two photographs


def label_noise(pairs: PairScores, genuine_floor: float, folder: Path | None = None,
                files_by_identity: dict[str, list[str]] | None = None, top: int = 40) -> dict:
    """Suspect labels, with score and name or image evidence.

    * ``dropped``: identity pairs scoring in the genuine range (best cross score >= the
      genuine 5th percentile) that are one person on other evidence too: near-identical
      names (John_Gruden / Jon_Gruden, Choi_Sung-hong / Sung_Hong_Choi), or one photograph
      filed under both names. Left out of the impostor counts. A high score alone never
      drops a pair, so twins, siblings and look-alikes stay in.
    * ``high_impostors``: the highest-scoring remaining identity pairs (at most ``top``).
    * ``look_alikes``: every remaining identity pair scoring in the genuine range:
      relatives, twins, look-alikes (and wrong labels without other evidence).
    * ``low_genuines``: the lowest genuine pairs (wrong label, wrong face picked, or a
      hard pair), listed and kept in.
    """
    names = pairs.identity_names
    best: dict[tuple[int, int], float] = {}
    for s, a, b in zip(pairs.tail.tolist(), pairs.tail_a.tolist(), pairs.tail_b.tolist(),
                       strict=True):
        key = (a, b) if a < b else (b, a)
        if s > best.get(key, -1.0):
            best[key] = s
    ranked = sorted(best.items(), key=lambda kv: -kv[1])
    dropped: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    alike: list[dict[str, Any]] = []
    for (a, b), s in ranked:
        na, nb = str(names[a]), str(names[b])
        row: dict[str, Any] = {"a": na, "b": nb, "best_score": round(s, 4),
               "name_similarity": round(_name_evidence(na, nb), 3)}
        evidence = None
        if s >= genuine_floor:
            if row["name_similarity"] >= NAME_EVIDENCE:
                evidence = "name"
            elif folder is not None and files_by_identity is not None and _same_photograph(
                    folder, files_by_identity[na], files_by_identity[nb]):
                evidence = "same photograph"
        if evidence:
            dropped.append({**row, "evidence": evidence})
            continue
        if s >= genuine_floor:
            alike.append(row)
        if len(kept) < top:
            kept.append(row)
    low = np.argsort(pairs.genuine)[:top]
    low_rows = [{"identity": str(names[pairs.genuine_identity[i]]),
                 "score": round(float(pairs.genuine[i]), 4)} for i in low]
    return {"dropped": dropped, "high_impostors": kept, "look_alikes": alike,
            "low_genuines": low_rows}


