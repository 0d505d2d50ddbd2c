"""How to weigh a traveller's booking photos when they are fused into one template.

    python scripts/fusion_weights.py --lfw ../shared/data/lfw-dev

For every lfw-dev person with three or more usable photos (at most 10, label order), the
first two are fused with each candidate weighting (equal; the embedder's raw output norm,
a known quality signal of ArcFace-family models, and its square; the detector score; the
log sharpness; the inter-eye distance; the cosine of the yaw) and scored against the
person's other photos (genuine) and every other person's photos (impostor). It prints FNMR
and FMR at three thresholds, and the single-photo and max-of-two references, so the
choice in matcher.templates.fuse_templates (equal weights) can be checked.
"""
from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

THRESHOLDS = (0.345, 0.40, 0.45)


def embed(folder: Path):
    """Per labelled photo: unit template, raw norm and quality fields of the central face."""
    from matcher.calibrate.embedding import central_face, read_labels
    from matcher.face.pipeline import Pipeline

    rows = read_labels(folder)
    pipe = Pipeline(threads=1)
    raw_norm: dict[int, float] = {}

    def one(i: int):
        image = pipe.decode((folder / rows[i][0]).read_bytes())
        face = central_face(pipe.analyse(image), image.shape)
        if face is None or not face.quality.accepted:
            return None
        blob = pipe.align(image, face.kps[None])
        out = pipe.sessions.embedder.run(None, {pipe.sessions.embedder_input: blob})[0][0]
        raw_norm[i] = float(np.linalg.norm(out))
        q = face.quality
        return face.template, {"norm": raw_norm[i], "norm^2": raw_norm[i] ** 2,
                               "det": q.det_score, "sharp": float(np.log1p(q.sharpness)),
                               "ieye": min(q.inter_eye_px, 60.0),
                               "cosyaw": float(np.cos(np.radians(q.yaw_deg)))}

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, range(len(rows))))
    return [r[1] for r in rows], results


def main() -> None:
    from matcher.templates import fuse_templates

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lfw", type=Path, required=True)
    args = p.parse_args()
    identities, results = embed(args.lfw)
    by_person: dict[str, list[int]] = {}
    for i, r in enumerate(results):
        if r is not None and len(by_person.setdefault(identities[i], [])) < 10:
            by_person[identities[i]].append(i)
    multi = {who: rows for who, rows in by_person.items() if len(rows) >= 3}
    every = [i for rows in by_person.values() for i in rows]
    probes = np.stack([results[i][0] for i in every])
    probe_person = np.array([identities[i] for i in every])
    owners = np.array(list(multi))
    print(f"{len(multi)} people with >= 3 usable photos; {len(every)} probe photos")
    weightings = ["equal", "norm", "norm^2", "det", "sharp", "ieye", "cosyaw"]
    for name in weightings:
        fused, genuine = [], []
        for rows in multi.values():
            w = None if name == "equal" else np.array([results[i][1][name] for i in rows[:2]])
            f = fuse_templates(np.stack([results[i][0] for i in rows[:2]]), w)
            fused.append(f)
            genuine += [float(results[i][0] @ f) for i in rows[2:]]
        impostor = (probes @ np.stack(fused).T)[probe_person[:, None] != owners[None, :]]
        genuine = np.asarray(genuine)
        cells = [f"t={t}: FNMR {np.mean(genuine < t):.4f} FMR {np.mean(impostor >= t):.2e}"
                 for t in THRESHOLDS]
        print(f"{name:8s} " + "  ".join(cells))
    single, best_of_two = [], []
    for rows in multi.values():
        a, b = results[rows[0]][0], results[rows[1]][0]
        for i in rows[2:]:
            x = results[i][0]
            single.append(float(x @ a))
            best_of_two.append(max(float(x @ a), float(x @ b)))
    for label, g in (("one photo", single), ("max of two", best_of_two)):
        g = np.asarray(g)
        print(f"{label:10s} " + "  ".join(f"t={t}: FNMR {np.mean(g < t):.4f}"
                                          for t in THRESHOLDS))


if __name__ == "__main__":
    main()
