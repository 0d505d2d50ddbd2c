"""SCRFD post-processing kernels: anchor decode with score threshold, and greedy NMS.

Float32 arithmetic in the twins' order (``matcher/_reference.py``), so boxes and
keypoints agree bit for bit and NMS keeps the same faces. Inputs are validated by
``matcher/_native.py``, which also allocates the outputs.
"""
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from scrfd cimport StrideOutputs


cdef inline bint ranks_before(float a, float b) noexcept nogil:
    # Strictly before in numpy's argsort(-scores) order: descending, NaN last.
    return a > b or (b != b and a == a)


cdef inline float max_nan(float a, float b) noexcept nogil:
    # np.maximum: NaN wins.
    return a if (a >= b or a != a) else b


cdef inline float min_nan(float a, float b) noexcept nogil:
    # np.minimum: NaN wins.
    return a if (a <= b or a != a) else b


cdef bint read_strides(tuple scores, tuple boxes, tuple kps, tuple strides, Py_ssize_t input_w,
                       StrideOutputs* views) except 0:
    # Borrow each stride's buffers; the caller's arrays keep them alive for the call.
    cdef const float[::1] s
    cdef const float[:, ::1] b
    cdef const float[:, ::1] k
    cdef Py_ssize_t i
    for i in range(len(strides)):
        s = scores[i]
        b = boxes[i]
        k = kps[i]
        views[i].n = s.shape[0]
        views[i].stride = strides[i]
        views[i].width = input_w // views[i].stride
        views[i].scores = &s[0] if s.shape[0] else NULL
        views[i].boxes = &b[0, 0] if s.shape[0] else NULL
        views[i].kps = &k[0, 0] if s.shape[0] else NULL
    return 1


cdef inline void decode_anchor(StrideOutputs so, Py_ssize_t j, Py_ssize_t num_anchors,
                               float inv_scale, float* out_s, float* out_b,
                               float* out_k) noexcept nogil:
    # Anchor j of this stride -> score, x1y1x2y2 and 5 keypoints in image pixels.
    cdef Py_ssize_t cell = j // num_anchors, p
    cdef float stride = <float>so.stride
    cdef float cx = <float>((cell % so.width) * so.stride)
    cdef float cy = <float>((cell // so.width) * so.stride)
    cdef const float* b = so.boxes + j * 4
    cdef const float* k = so.kps + j * 10
    out_s[0] = so.scores[j]
    out_b[0] = (cx - b[0] * stride) * inv_scale
    out_b[1] = (cy - b[1] * stride) * inv_scale
    out_b[2] = (cx + b[2] * stride) * inv_scale
    out_b[3] = (cy + b[3] * stride) * inv_scale
    for p in range(5):
        out_k[2 * p] = (cx + k[2 * p] * stride) * inv_scale
        out_k[2 * p + 1] = (cy + k[2 * p + 1] * stride) * inv_scale


cdef inline Py_ssize_t select_anchors(StrideOutputs so, float threshold,
                                      Py_ssize_t* hits) noexcept nogil:
    # Indices of the anchors scoring >= threshold (float32 comparison, as numpy does).
    cdef Py_ssize_t j, found = 0
    for j in range(so.n):
        if so.scores[j] >= threshold:
            hits[found] = j
            found += 1
    return found


def decode_candidates(tuple scores, tuple boxes, tuple kps, tuple strides, Py_ssize_t input_w,
                      Py_ssize_t num_anchors, float threshold, float inv_scale, allocate):
    """Every anchor scoring >= threshold, stride by stride, decoded into new arrays.

    One pass over the scores finds the survivors, ``allocate(m)`` (the dispatcher's)
    returns (m,), (m, 4) and (m, 5, 2) float32 C-contiguous outputs, a second pass over
    the m survivors only decodes them. Returns what ``allocate`` returned.
    """
    cdef Py_ssize_t n_strides = len(strides), i, j, total = 0, found = 0, row = 0
    cdef float[::1] out_s
    cdef float[:, ::1] out_b
    cdef float[:, :, ::1] out_k
    for i in range(n_strides):
        total += len(scores[i])
    cdef StrideOutputs* views = <StrideOutputs*>malloc(n_strides * sizeof(StrideOutputs))
    cdef Py_ssize_t* per_stride = <Py_ssize_t*>malloc(n_strides * sizeof(Py_ssize_t))
    cdef Py_ssize_t* hits = <Py_ssize_t*>malloc((total if total else 1) * sizeof(Py_ssize_t))
    try:
        if views == NULL or per_stride == NULL or hits == NULL:
            raise MemoryError()
        read_strides(scores, boxes, kps, strides, input_w, views)
        with nogil:
            for i in range(n_strides):
                per_stride[i] = select_anchors(views[i], threshold, hits + found)
                found += per_stride[i]
        outputs = allocate(found)
        if found == 0:
            return outputs
        out_s, out_b, out_k = outputs
        with nogil:
            for i in range(n_strides):
                for j in range(per_stride[i]):
                    decode_anchor(views[i], hits[row], num_anchors, inv_scale,
                                  &out_s[row], &out_b[row, 0], &out_k[row, 0, 0])
                    row += 1
        return outputs
    finally:
        free(views)
        free(per_stride)
        free(hits)


cdef inline void stable_argsort_desc(const float* scores, Py_ssize_t* order, Py_ssize_t* scratch,
                              Py_ssize_t m) noexcept nogil:
    # Bottom-up merge sort of indices: stable, so equal scores keep index order.
    cdef Py_ssize_t i, width = 1, lo, mid, hi, a, b, k
    cdef Py_ssize_t* src = order
    cdef Py_ssize_t* dst = scratch
    cdef Py_ssize_t* tmp
    for i in range(m):
        order[i] = i
    while width < m:
        lo = 0
        while lo < m:
            mid = lo + width if lo + width < m else m
            hi = lo + 2 * width if lo + 2 * width < m else m
            a = lo
            b = mid
            for k in range(lo, hi):
                if a < mid and (b >= hi or not ranks_before(scores[src[b]], scores[src[a]])):
                    dst[k] = src[a]
                    a += 1
                else:
                    dst[k] = src[b]
                    b += 1
            lo += 2 * width
        tmp = src
        src = dst
        dst = tmp
        width *= 2
    if src != order:
        memcpy(order, src, m * sizeof(Py_ssize_t))


cdef inline Py_ssize_t greedy_nms(const float* boxes, const Py_ssize_t* order, float* areas,
                           char* suppressed, Py_ssize_t m, float iou_threshold,
                           int64_t* keep) noexcept nogil:
    cdef Py_ssize_t a, b, i, j, kept = 0
    cdef float inter, iou
    for i in range(m):
        areas[i] = ((boxes[i * 4 + 2] - boxes[i * 4 + 0] + <float>1.0)
                    * (boxes[i * 4 + 3] - boxes[i * 4 + 1] + <float>1.0))
        suppressed[i] = 0
    for a in range(m):
        if suppressed[a]:
            continue
        i = order[a]
        keep[kept] = i
        kept += 1
        for b in range(a + 1, m):
            if suppressed[b]:
                continue
            j = order[b]
            inter = (max_nan(<float>0.0, min_nan(boxes[i * 4 + 2], boxes[j * 4 + 2])
                             - max_nan(boxes[i * 4 + 0], boxes[j * 4 + 0]) + <float>1.0)
                     * max_nan(<float>0.0, min_nan(boxes[i * 4 + 3], boxes[j * 4 + 3])
                               - max_nan(boxes[i * 4 + 1], boxes[j * 4 + 1]) + <float>1.0))
            iou = inter / (areas[i] + areas[j] - inter)
            # the twin keeps iou <= threshold; NaN compares false and is suppressed
            if not iou <= iou_threshold:
                suppressed[b] = 1
    return kept


def nms(const float[:, ::1] boxes, const float[::1] scores, float iou_threshold,
        int64_t[::1] keep):
    """Greedy NMS of m boxes; writes kept indices (best first) to keep[:k], returns k."""
    cdef Py_ssize_t m = scores.shape[0], kept
    if m == 0:
        return 0
    cdef Py_ssize_t* order = <Py_ssize_t*>malloc(2 * m * sizeof(Py_ssize_t))
    cdef float* areas = <float*>malloc(m * sizeof(float))
    cdef char* suppressed = <char*>malloc(m)
    cdef const float* pb = &boxes[0, 0]
    cdef const float* ps = &scores[0]
    cdef int64_t* pk = &keep[0]
    try:
        if order == NULL or areas == NULL or suppressed == NULL:
            raise MemoryError()
        with nogil:
            stable_argsort_desc(ps, order, order + m, m)
            kept = greedy_nms(pb, order, areas, suppressed, m, iou_threshold, pk)
    finally:
        free(order)
        free(areas)
        free(suppressed)
    return kept
