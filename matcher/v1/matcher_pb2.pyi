import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    MATCH: _ClassVar[Decision]
    NO_MATCH: _ClassVar[Decision]
    NO_FACE: _ClassVar[Decision]
    LOW_QUALITY: _ClassVar[Decision]
DECISION_UNSPECIFIED: Decision
MATCH: Decision
NO_MATCH: Decision
NO_FACE: Decision
LOW_QUALITY: Decision

class Probe(_message.Message):
    __slots__ = ("image", "aligned", "template")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ALIGNED_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    aligned: AlignedFace
    template: Template
    def __init__(self, image: _Optional[bytes] = ..., aligned: _Optional[_Union[AlignedFace, _Mapping]] = ..., template: _Optional[_Union[Template, _Mapping]] = ...) -> None: ...

class AlignedFace(_message.Message):
    __slots__ = ("data", "format")
    class Format(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FORMAT_UNSPECIFIED: _ClassVar[AlignedFace.Format]
        ENCODED: _ClassVar[AlignedFace.Format]
        RAW_RGB: _ClassVar[AlignedFace.Format]
    FORMAT_UNSPECIFIED: AlignedFace.Format
    ENCODED: AlignedFace.Format
    RAW_RGB: AlignedFace.Format
    DATA_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    format: AlignedFace.Format
    def __init__(self, data: _Optional[bytes] = ..., format: _Optional[_Union[AlignedFace.Format, str]] = ...) -> None: ...

class Template(_message.Message):
    __slots__ = ("values", "model_id")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    model_id: str
    def __init__(self, values: _Optional[_Iterable[float]] = ..., model_id: _Optional[str] = ...) -> None: ...

class IdentifyRequest(_message.Message):
    __slots__ = ("probe", "frames", "top_k", "all_faces", "request_id", "lane_id")
    PROBE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ALL_FACES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LANE_ID_FIELD_NUMBER: _ClassVar[int]
    probe: Probe
    frames: _containers.RepeatedCompositeFieldContainer[Probe]
    top_k: int
    all_faces: bool
    request_id: str
    lane_id: str
    def __init__(self, probe: _Optional[_Union[Probe, _Mapping]] = ..., frames: _Optional[_Iterable[_Union[Probe, _Mapping]]] = ..., top_k: _Optional[int] = ..., all_faces: _Optional[bool] = ..., request_id: _Optional[str] = ..., lane_id: _Optional[str] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("dg2", "image")
    DG2_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    dg2: bytes
    image: bytes
    def __init__(self, dg2: _Optional[bytes] = ..., image: _Optional[bytes] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("probe", "frames", "traveller_id", "document", "request_id", "lane_id")
    PROBE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    TRAVELLER_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LANE_ID_FIELD_NUMBER: _ClassVar[int]
    probe: Probe
    frames: _containers.RepeatedCompositeFieldContainer[Probe]
    traveller_id: str
    document: Document
    request_id: str
    lane_id: str
    def __init__(self, probe: _Optional[_Union[Probe, _Mapping]] = ..., frames: _Optional[_Iterable[_Union[Probe, _Mapping]]] = ..., traveller_id: _Optional[str] = ..., document: _Optional[_Union[Document, _Mapping]] = ..., request_id: _Optional[str] = ..., lane_id: _Optional[str] = ...) -> None: ...

class ClearRequest(_message.Message):
    __slots__ = ("probe", "frames", "claimed_traveller_id", "document", "top_k", "request_id", "lane_id")
    PROBE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_TRAVELLER_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LANE_ID_FIELD_NUMBER: _ClassVar[int]
    probe: Probe
    frames: _containers.RepeatedCompositeFieldContainer[Probe]
    claimed_traveller_id: str
    document: Document
    top_k: int
    request_id: str
    lane_id: str
    def __init__(self, probe: _Optional[_Union[Probe, _Mapping]] = ..., frames: _Optional[_Iterable[_Union[Probe, _Mapping]]] = ..., claimed_traveller_id: _Optional[str] = ..., document: _Optional[_Union[Document, _Mapping]] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ..., lane_id: _Optional[str] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("traveller_id", "score")
    TRAVELLER_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    traveller_id: str
    score: float
    def __init__(self, traveller_id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class FaceInfo(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2", "det_score", "landmarks", "inter_eye_px", "sharpness", "yaw_deg", "pitch_deg", "roll_deg", "quality_reasons")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    DET_SCORE_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    INTER_EYE_PX_FIELD_NUMBER: _ClassVar[int]
    SHARPNESS_FIELD_NUMBER: _ClassVar[int]
    YAW_DEG_FIELD_NUMBER: _ClassVar[int]
    PITCH_DEG_FIELD_NUMBER: _ClassVar[int]
    ROLL_DEG_FIELD_NUMBER: _ClassVar[int]
    QUALITY_REASONS_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    det_score: float
    landmarks: _containers.RepeatedScalarFieldContainer[float]
    inter_eye_px: float
    sharpness: float
    yaw_deg: float
    pitch_deg: float
    roll_deg: float
    quality_reasons: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ..., det_score: _Optional[float] = ..., landmarks: _Optional[_Iterable[float]] = ..., inter_eye_px: _Optional[float] = ..., sharpness: _Optional[float] = ..., yaw_deg: _Optional[float] = ..., pitch_deg: _Optional[float] = ..., roll_deg: _Optional[float] = ..., quality_reasons: _Optional[_Iterable[str]] = ...) -> None: ...

class FaceMatch(_message.Message):
    __slots__ = ("face", "decision", "reason", "traveller_id", "score", "candidates", "beyond_calibration")
    FACE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TRAVELLER_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    BEYOND_CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    face: FaceInfo
    decision: Decision
    reason: str
    traveller_id: str
    score: float
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    beyond_calibration: bool
    def __init__(self, face: _Optional[_Union[FaceInfo, _Mapping]] = ..., decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[str] = ..., traveller_id: _Optional[str] = ..., score: _Optional[float] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., beyond_calibration: _Optional[bool] = ...) -> None: ...

class FrameOutcome(_message.Message):
    __slots__ = ("index", "status", "quality_reasons", "faces_found", "face")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    QUALITY_REASONS_FIELD_NUMBER: _ClassVar[int]
    FACES_FOUND_FIELD_NUMBER: _ClassVar[int]
    FACE_FIELD_NUMBER: _ClassVar[int]
    index: int
    status: str
    quality_reasons: _containers.RepeatedScalarFieldContainer[str]
    faces_found: int
    face: FaceInfo
    def __init__(self, index: _Optional[int] = ..., status: _Optional[str] = ..., quality_reasons: _Optional[_Iterable[str]] = ..., faces_found: _Optional[int] = ..., face: _Optional[_Union[FaceInfo, _Mapping]] = ...) -> None: ...

class MatchResponse(_message.Message):
    __slots__ = ("request_id", "decision", "reason", "quality_reasons", "traveller_id", "score", "threshold", "candidates", "gallery_version", "model_id", "face", "faces_found", "faces", "timings_ms", "claimed_traveller_id", "fallback_used", "beyond_calibration", "frames_used", "frames", "document", "checks_passed")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    QUALITY_REASONS_FIELD_NUMBER: _ClassVar[int]
    TRAVELLER_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    GALLERY_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FACE_FIELD_NUMBER: _ClassVar[int]
    FACES_FOUND_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_TRAVELLER_ID_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_USED_FIELD_NUMBER: _ClassVar[int]
    BEYOND_CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    FRAMES_USED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    CHECKS_PASSED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    decision: Decision
    reason: str
    quality_reasons: _containers.RepeatedScalarFieldContainer[str]
    traveller_id: str
    score: float
    threshold: float
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    gallery_version: int
    model_id: str
    face: FaceInfo
    faces_found: int
    faces: _containers.RepeatedCompositeFieldContainer[FaceMatch]
    timings_ms: _containers.ScalarMap[str, float]
    claimed_traveller_id: str
    fallback_used: bool
    beyond_calibration: bool
    frames_used: int
    frames: _containers.RepeatedCompositeFieldContainer[FrameOutcome]
    document: DocumentCheck
    checks_passed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[str] = ..., quality_reasons: _Optional[_Iterable[str]] = ..., traveller_id: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., gallery_version: _Optional[int] = ..., model_id: _Optional[str] = ..., face: _Optional[_Union[FaceInfo, _Mapping]] = ..., faces_found: _Optional[int] = ..., faces: _Optional[_Iterable[_Union[FaceMatch, _Mapping]]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., claimed_traveller_id: _Optional[str] = ..., fallback_used: _Optional[bool] = ..., beyond_calibration: _Optional[bool] = ..., frames_used: _Optional[int] = ..., frames: _Optional[_Iterable[_Union[FrameOutcome, _Mapping]]] = ..., document: _Optional[_Union[DocumentCheck, _Mapping]] = ..., checks_passed: _Optional[_Iterable[str]] = ...) -> None: ...

class DocumentCheck(_message.Message):
    __slots__ = ("decision", "reason", "score", "threshold", "sha256", "face")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FACE_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    reason: str
    score: float
    threshold: float
    sha256: str
    face: FaceInfo
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., sha256: _Optional[str] = ..., face: _Optional[_Union[FaceInfo, _Mapping]] = ...) -> None: ...

class LaneRequest(_message.Message):
    __slots__ = ("identify", "verify", "clear")
    IDENTIFY_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    identify: IdentifyRequest
    verify: VerifyRequest
    clear: ClearRequest
    def __init__(self, identify: _Optional[_Union[IdentifyRequest, _Mapping]] = ..., verify: _Optional[_Union[VerifyRequest, _Mapping]] = ..., clear: _Optional[_Union[ClearRequest, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class LaneResponse(_message.Message):
    __slots__ = ("request_id", "result", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    result: MatchResponse
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., result: _Optional[_Union[MatchResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("traveller_id", "photos", "valid_from", "valid_to", "accept_low_quality", "request_id")
    TRAVELLER_ID_FIELD_NUMBER: _ClassVar[int]
    PHOTOS_FIELD_NUMBER: _ClassVar[int]
    VALID_FROM_FIELD_NUMBER: _ClassVar[int]
    VALID_TO_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_LOW_QUALITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    traveller_id: str
    photos: _containers.RepeatedCompositeFieldContainer[Probe]
    valid_from: _timestamp_pb2.Timestamp
    valid_to: _timestamp_pb2.Timestamp
    accept_low_quality: bool
    request_id: str
    def __init__(self, traveller_id: _Optional[str] = ..., photos: _Optional[_Iterable[_Union[Probe, _Mapping]]] = ..., valid_from: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., valid_to: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., accept_low_quality: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("request_id", "traveller_id", "gallery_version", "added_templates", "changed", "error", "photos")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRAVELLER_ID_FIELD_NUMBER: _ClassVar[int]
    GALLERY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDED_TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PHOTOS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    traveller_id: str
    gallery_version: int
    added_templates: int
    changed: bool
    error: Error
    photos: _containers.RepeatedCompositeFieldContainer[PhotoOutcome]
    def __init__(self, request_id: _Optional[str] = ..., traveller_id: _Optional[str] = ..., gallery_version: _Optional[int] = ..., added_templates: _Optional[int] = ..., changed: _Optional[bool] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., photos: _Optional[_Iterable[_Union[PhotoOutcome, _Mapping]]] = ...) -> None: ...

class PhotoOutcome(_message.Message):
    __slots__ = ("index", "enrolled", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    enrolled: bool
    reason: str
    def __init__(self, index: _Optional[int] = ..., enrolled: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class RemoveRequest(_message.Message):
    __slots__ = ("traveller_id", "request_id")
    TRAVELLER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    traveller_id: str
    request_id: str
    def __init__(self, traveller_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RemoveResponse(_message.Message):
    __slots__ = ("gallery_version",)
    GALLERY_VERSION_FIELD_NUMBER: _ClassVar[int]
    gallery_version: int
    def __init__(self, gallery_version: _Optional[int] = ...) -> None: ...

class GetTravellerRequest(_message.Message):
    __slots__ = ("traveller_id",)
    TRAVELLER_ID_FIELD_NUMBER: _ClassVar[int]
    traveller_id: str
    def __init__(self, traveller_id: _Optional[str] = ...) -> None: ...

class TravellerInfo(_message.Message):
    __slots__ = ("traveller_id", "valid_from", "valid_to", "templates", "photo_sha256", "model_id")
    TRAVELLER_ID_FIELD_NUMBER: _ClassVar[int]
    VALID_FROM_FIELD_NUMBER: _ClassVar[int]
    VALID_TO_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    PHOTO_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    traveller_id: str
    valid_from: _timestamp_pb2.Timestamp
    valid_to: _timestamp_pb2.Timestamp
    templates: int
    photo_sha256: _containers.RepeatedScalarFieldContainer[str]
    model_id: str
    def __init__(self, traveller_id: _Optional[str] = ..., valid_from: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., valid_to: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., templates: _Optional[int] = ..., photo_sha256: _Optional[_Iterable[str]] = ..., model_id: _Optional[str] = ...) -> None: ...

class GetGalleryInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GalleryInfo(_message.Message):
    __slots__ = ("gallery_version", "travellers", "templates", "model_id", "index_kind", "role", "snapshot", "threshold_1to1", "threshold_1ton", "fmr_1to1", "fpir_1ton", "max_supported_gallery_size", "one_to_many_supported", "score_model", "searchable_travellers", "index_entries")
    GALLERY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAVELLERS_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_KIND_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_1TO1_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_1TON_FIELD_NUMBER: _ClassVar[int]
    FMR_1TO1_FIELD_NUMBER: _ClassVar[int]
    FPIR_1TON_FIELD_NUMBER: _ClassVar[int]
    MAX_SUPPORTED_GALLERY_SIZE_FIELD_NUMBER: _ClassVar[int]
    ONE_TO_MANY_SUPPORTED_FIELD_NUMBER: _ClassVar[int]
    SCORE_MODEL_FIELD_NUMBER: _ClassVar[int]
    SEARCHABLE_TRAVELLERS_FIELD_NUMBER: _ClassVar[int]
    INDEX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    gallery_version: int
    travellers: int
    templates: int
    model_id: str
    index_kind: str
    role: str
    snapshot: str
    threshold_1to1: float
    threshold_1ton: float
    fmr_1to1: float
    fpir_1ton: float
    max_supported_gallery_size: int
    one_to_many_supported: bool
    score_model: str
    searchable_travellers: int
    index_entries: int
    def __init__(self, gallery_version: _Optional[int] = ..., travellers: _Optional[int] = ..., templates: _Optional[int] = ..., model_id: _Optional[str] = ..., index_kind: _Optional[str] = ..., role: _Optional[str] = ..., snapshot: _Optional[str] = ..., threshold_1to1: _Optional[float] = ..., threshold_1ton: _Optional[float] = ..., fmr_1to1: _Optional[float] = ..., fpir_1ton: _Optional[float] = ..., max_supported_gallery_size: _Optional[int] = ..., one_to_many_supported: _Optional[bool] = ..., score_model: _Optional[str] = ..., searchable_travellers: _Optional[int] = ..., index_entries: _Optional[int] = ...) -> None: ...

class PublishSnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PublishSnapshotResponse(_message.Message):
    __slots__ = ("snapshot", "gallery_version")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    GALLERY_VERSION_FIELD_NUMBER: _ClassVar[int]
    snapshot: str
    gallery_version: int
    def __init__(self, snapshot: _Optional[str] = ..., gallery_version: _Optional[int] = ...) -> None: ...
