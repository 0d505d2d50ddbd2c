"""Per-face quality: is this capture good enough to match, and if not, what to ask for.

Reasons are short machine-readable codes a lane can turn into a prompt for the traveller
("look at the camera", "come closer").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class QualityPolicy:
    """Accept/reject thresholds for one detected face.

    Each default keeps a capture whose template still matches with margin; the rationale
    and the figures behind it are in docs/pipeline.md#the-quality-gate.
    """

    # SCRFD's own cut is 0.5; the weak detections just above it were faint faces.
    min_det_score: float = 0.6
    # Pixels between the eye centres in the input image; below it templates drift.
    # ISO/ICAO ask 60+ px for an enrolment portrait.
    min_inter_eye_px: float = 20.0
    # Variance of the Laplacian on the grey 112x112 aligned crop: low means blurred.
    min_sharpness: float = 16.0
    # Pose from 5 landmarks is rough (see pose_from_landmarks); on lfw-dev faces turned up
    # to this matched like frontal ones, and beyond it the data thins out.
    max_abs_yaw_deg: float = 60.0
    # Roll is undone by the alignment, pitch barely measured by 5 points: both limits only
    # catch the absurd.
    max_abs_roll_deg: float = 35.0
    max_abs_pitch_deg: float = 45.0


DEFAULT_POLICY = QualityPolicy()


@dataclass(frozen=True)
class Quality:
    det_score: float
    face_width_px: float
    face_height_px: float
    inter_eye_px: float
    sharpness: float
    yaw_deg: float
    pitch_deg: float
    roll_deg: float
    cut_by_border: bool
    reasons: tuple[str, ...] = field(default=())

    @property
    def accepted(self) -> bool:
        return not self.reasons

    def as_dict(self) -> dict:
        d = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}
        d["reasons"] = list(self.reasons)
        d["accepted"] = self.accepted
        return d


def pose_from_landmarks(kps: np.ndarray) -> tuple[float, float, float]:
    """Rough (yaw, pitch, roll) in degrees from 5 points: eyes, nose tip, mouth corners.

    Roll is the eye line's angle. Yaw and pitch come from where the nose tip sits inside
    the eye-mouth quadrilateral; 0 is frontal. Good enough to tell "turned away" from
    "looking at the camera", which is all a lane needs.
    """
    le, re, nose, lm, rm = kps.astype(np.float64)
    eye_vec = re - le
    roll = np.degrees(np.arctan2(eye_vec[1], eye_vec[0]))
    c, s = np.cos(np.radians(-roll)), np.sin(np.radians(-roll))
    rot = np.array([[c, -s], [s, c]])
    le, re, nose, lm, rm = (rot @ p for p in (le, re, nose, lm, rm))
    eye_mid, mouth_mid = (le + re) / 2, (lm + rm) / 2
    half_span = max((re[0] - le[0]) / 2, 1e-6)
    yaw = np.degrees(np.arcsin(np.clip((nose[0] - eye_mid[0]) / half_span, -1, 1)))
    face_h = max(mouth_mid[1] - eye_mid[1], 1e-6)
    # In the ArcFace template the nose tip sits at 0.5 of the eye-mouth distance.
    pitch = np.degrees(np.arcsin(np.clip(((nose[1] - eye_mid[1]) / face_h - 0.5) * 2, -1, 1)))
    return float(yaw), float(pitch), float(roll)


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian: low means blurred. grey: (h, w) float."""
    lap = (grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1]
           - 4.0 * grey[1:-1, 1:-1])
    return float(lap.var())


def assess(det_score: float, bbox: np.ndarray, kps: np.ndarray, image_shape: tuple[int, ...],
           crop_grey: np.ndarray, policy: QualityPolicy = DEFAULT_POLICY) -> Quality:
    """Quality of one detected face. crop_grey: (112, 112) float, 0..255 scale."""
    h, w = image_shape[:2]
    inter_eye = float(np.linalg.norm(kps[1] - kps[0]))
    yaw, pitch, roll = pose_from_landmarks(kps)
    sharpness = laplacian_variance(crop_grey)
    cut = bool(bbox[0] < 0 or bbox[1] < 0 or bbox[2] > w or bbox[3] > h)
    reasons = []
    if det_score < policy.min_det_score:
        reasons.append("low_detector_score")
    if inter_eye < policy.min_inter_eye_px:
        reasons.append("face_too_small")
    if sharpness < policy.min_sharpness:
        reasons.append("blurred")
    if abs(yaw) > policy.max_abs_yaw_deg:
        reasons.append("head_turned")
    if abs(pitch) > policy.max_abs_pitch_deg:
        reasons.append("head_tilted_up_or_down")
    if abs(roll) > policy.max_abs_roll_deg:
        reasons.append("head_tilted_sideways")
    if np.any(kps < 0) or np.any(kps[:, 0] >= w) or np.any(kps[:, 1] >= h):
        reasons.append("landmarks_outside_image")
    return Quality(float(det_score), float(bbox[2] - bbox[0]), float(bbox[3] - bbox[1]),
                   inter_eye, sharpness, yaw, pitch, roll, cut, tuple(reasons))
