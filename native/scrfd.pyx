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


def count_candidates(tuple scores, float threshold):
    """How many anchors over all strides score >= threshold (float32 comparison)."""
    cdef Py_ssize_t total = 0, i, j, n
    cdef const float[::1] s
    cdef const float* p
    for i in range(len(scores)):
        s = scores[i]
        n = s.shape[0]
        if n == 0:
            continue
        p = &s[0]
        with nogil:
            for j in range(n):
                total += p[j] >= threshold
    return total


cdef inline Py_ssize_t decode_stride(StrideOutputs so, Py_ssize_t num_anchors, float threshold,
                              float inv_scale, float* out_s, float* out_b,
                              float* out_k) noexcept nogil:
    cdef Py_ssize_t j, cell, p, found = 0
    cdef float stride = <float>so.stride
    cdef float cx, cy
    cdef const float* b
    cdef const float* k
    for j in range(so.n):
        if not so.scores[j] >= threshold:
            continue
        cell = j // num_anchors
        cx = <float>((cell % so.width) * so.stride)
        cy = <float>((cell // so.width) * so.stride)
        b = so.boxes + j * 4
        k = so.kps + j * 10
        out_s[found] = so.scores[j]
        out_b[found * 4 + 0] = (cx - b[0] * stride) * inv_scale
        out_b[found * 4 + 1] = (cy - b[1] * stride) * inv_scale
        out_b[found * 4 + 2] = (cx + b[2] * stride) * inv_scale
        out_b[found * 4 + 3] = (cy + b[3] * stride) * inv_scale
        for p in range(5):
            out_k[found * 10 + 2 * p] = (cx + k[2 * p] * stride) * inv_scale
            out_k[found * 10 + 2 * p + 1] = (cy + k[2 * p + 1] * stride) * inv_scale
        found += 1
    return found


def decode_candidates(tuple scores, tuple boxes, tuple kps, tuple strides, Py_ssize_t input_w,
                      Py_ssize_t num_anchors, float threshold, float inv_scale,
                      float[::1] out_s, float[:, ::1] out_b, float[:, :, ::1] out_k):
    """Write every anchor scoring >= threshold, stride by stride, into the outputs.

    The outputs hold exactly ``count_candidates(scores, threshold)`` rows. One nogil pass
    over all strides.
    """
    cdef Py_ssize_t n_strides = len(strides), i, found = 0
    cdef Py_ssize_t capacity = out_s.shape[0]
    if capacity == 0:
        return
    cdef StrideOutputs* views = <StrideOutputs*>malloc(n_strides * sizeof(StrideOutputs))
    if views == NULL:
        raise MemoryError()
    cdef float* ps = &out_s[0]
    cdef float* pb = &out_b[0, 0]
    cdef float* pk = &out_k[0, 0, 0]
    try:
        read_strides(scores, boxes, kps, strides, input_w, views)
        with nogil:
            for i in range(n_strides):
                found += decode_stride(views[i], num_anchors, threshold, inv_scale,
                                       ps + found, pb + found * 4, pk + found * 10)
    finally:
        free(views)


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
