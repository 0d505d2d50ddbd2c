"""Image kernels: letterbox resize into the detector blob, affine warp into the embedder batch.

Both read (H, W, 3) uint8 RGB and write normalised float32 CHW planes in one pass, with
the same float32 operation order as their numpy twins in ``matcher/_reference.py`` so
the two agree to the last bit or two. Inputs are validated by ``matcher/_native.py``.
"""
from imaging cimport LinearTap
from libc.math cimport floor
from libc.stdlib cimport free, malloc


cdef inline float pixel_or_zero(const unsigned char* image, Py_ssize_t h, Py_ssize_t w,
                                Py_ssize_t y, Py_ssize_t x, Py_ssize_t c) noexcept nogil:
    # cv2.warpAffine BORDER_CONSTANT: taps outside the image read 0.
    if y < 0 or y >= h or x < 0 or x >= w:
        return 0.0
    return <float>image[(y * w + x) * 3 + c]


cdef inline void linear_taps(Py_ssize_t src, Py_ssize_t dst, LinearTap* taps) noexcept nogil:
    # cv2.resize INTER_LINEAR: half-pixel centres, edge taps clamped (weight 0 left of 0).
    cdef double scale = <double>src / <double>dst
    cdef double f, fl
    cdef Py_ssize_t i, i0
    for i in range(dst):
        f = (<double>i + 0.5) * scale - 0.5
        fl = floor(f)
        i0 = <Py_ssize_t>fl
        taps[i].w = <float>(f - fl)
        if i0 < 0:
            taps[i].w = 0.0
            i0 = 0
        if i0 > src - 1:
            i0 = src - 1
        taps[i].i0 = i0
        taps[i].i1 = i0 + 1 if i0 + 1 < src else src - 1


cdef inline void blend_rows(const unsigned char* row0, const unsigned char* row1, float wy,
                            Py_ssize_t n, float* top) noexcept nogil:
    # Vertical pass over a whole source row (contiguous, so the compiler vectorises it).
    cdef float wy0 = <float>1.0 - wy
    cdef Py_ssize_t i
    for i in range(n):
        top[i] = <float>row0[i] * wy0 + <float>row1[i] * wy


cdef inline void resample_row(const float* top, const LinearTap* xtaps, Py_ssize_t new_w,
                              bint same_width, float* plane0, Py_ssize_t plane_stride,
                              float mean, float inv_std) noexcept nogil:
    # Horizontal pass, normalise and HWC -> CHW in one go.
    cdef float wx, wx0
    cdef Py_ssize_t x, c, a, b
    if same_width:
        # taps are (x, x+1, weight 0): top * 1 + top * 0 == top exactly, so skip them
        for x in range(new_w):
            for c in range(3):
                plane0[c * plane_stride + x] = (top[x * 3 + c] - mean) * inv_std
        return
    for x in range(new_w):
        a = xtaps[x].i0 * 3
        b = xtaps[x].i1 * 3
        wx = xtaps[x].w
        wx0 = <float>1.0 - wx
        for c in range(3):
            plane0[c * plane_stride + x] = (top[a + c] * wx0 + top[b + c] * wx - mean) * inv_std


def letterbox_to_blob(const unsigned char[:, :, ::1] image, float[:, :, ::1] out,
                      Py_ssize_t new_h, Py_ssize_t new_w, double mean, double inv_std):
    """Resize (H, W, 3) uint8 into the top-left new_h x new_w of out (3, OH, OW) float32.

    Separable like the twin: blend the two source rows (vertical), then the two columns
    (horizontal), in the same float32 order, so the results are the twin's bit for bit.
    """
    cdef Py_ssize_t src_h = image.shape[0], src_w = image.shape[1]
    cdef Py_ssize_t out_h = out.shape[1], out_w = out.shape[2]
    cdef Py_ssize_t plane = out_h * out_w
    # The twin fills in float64 and stores once; the pixels are float32 throughout.
    cdef float pad = <float>((0.0 - mean) * inv_std)
    cdef float mean_f = <float>mean, inv_std_f = <float>inv_std
    cdef LinearTap* xtaps = <LinearTap*>malloc(new_w * sizeof(LinearTap))
    cdef LinearTap* ytaps = <LinearTap*>malloc(new_h * sizeof(LinearTap))
    cdef float* top = <float*>malloc(src_w * 3 * sizeof(float))
    cdef const unsigned char* src = &image[0, 0, 0]
    cdef float* dst = &out[0, 0, 0]
    cdef Py_ssize_t y, x, c, row_bytes = src_w * 3
    cdef bint same_width = new_w == src_w
    try:
        if xtaps == NULL or ytaps == NULL or top == NULL:
            raise MemoryError()
        with nogil:
            linear_taps(src_w, new_w, xtaps)
            linear_taps(src_h, new_h, ytaps)
            for y in range(out_h):
                if y < new_h:
                    # upscaling reuses the same source pair for several output rows
                    if (y == 0 or ytaps[y].i0 != ytaps[y - 1].i0
                            or ytaps[y].i1 != ytaps[y - 1].i1 or ytaps[y].w != ytaps[y - 1].w):
                        blend_rows(src + ytaps[y].i0 * row_bytes, src + ytaps[y].i1 * row_bytes,
                                   ytaps[y].w, row_bytes, top)
                    resample_row(top, xtaps, new_w, same_width, dst + y * out_w, plane,
                                 mean_f, inv_std_f)
                    x = new_w
                else:
                    x = 0
                for c in range(3):
                    fill(dst + c * plane + y * out_w + x, out_w - x, pad)
    finally:
        free(xtaps)
        free(ytaps)
        free(top)


cdef inline void fill(float* p, Py_ssize_t n, float value) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        p[i] = value


cdef inline void warp_row(const unsigned char* image, Py_ssize_t h, Py_ssize_t w,
                   const double* m, Py_ssize_t y, Py_ssize_t size_w, float* plane0,
                   Py_ssize_t plane_stride, float mean, float inv_std) noexcept nogil:
    cdef double sx, sy
    cdef float fx, fy, fx0, fy0, v
    cdef float outside = (<float>0.0 - mean) * inv_std  # the twin's float32 order
    cdef Py_ssize_t x, c, ix, iy, p
    cdef bint inside
    for x in range(size_w):
        sx = m[0] * x + m[1] * y + m[2]
        sy = m[3] * x + m[4] * y + m[5]
        if sx < -1.0 or sy < -1.0 or sx >= w or sy >= h:
            for c in range(3):
                plane0[c * plane_stride + x] = outside
            continue
        # floor() without a libm call; exact because sx, sy lie in [-1, w) x [-1, h) here
        ix = <Py_ssize_t>sx
        ix = ix - 1 if sx < ix else ix
        iy = <Py_ssize_t>sy
        iy = iy - 1 if sy < iy else iy
        fx = <float>(sx - <double>ix)
        fy = <float>(sy - <double>iy)
        fx0 = <float>1.0 - fx
        fy0 = <float>1.0 - fy
        inside = ix >= 0 and iy >= 0 and ix + 1 < w and iy + 1 < h
        for c in range(3):
            if inside:
                p = (iy * w + ix) * 3 + c
                v = (<float>image[p] * fx0 * fy0 + <float>image[p + 3] * fx * fy0
                     + <float>image[p + w * 3] * fx0 * fy + <float>image[p + w * 3 + 3] * fx * fy)
            else:
                v = (pixel_or_zero(image, h, w, iy, ix, c) * fx0 * fy0
                     + pixel_or_zero(image, h, w, iy, ix + 1, c) * fx * fy0
                     + pixel_or_zero(image, h, w, iy + 1, ix, c) * fx0 * fy
                     + pixel_or_zero(image, h, w, iy + 1, ix + 1, c) * fx * fy)
            plane0[c * plane_stride + x] = (v - mean) * inv_std


def warp_faces_to_batch(const unsigned char[:, :, ::1] image,
                        const double[:, :, ::1] inverse_transforms, float[:, :, :, ::1] out,
                        double mean, double inv_std):
    """One bilinear affine crop per face into out (n, 3, S, S) float32, normalised, CHW."""
    cdef Py_ssize_t n = out.shape[0], size_h = out.shape[2], size_w = out.shape[3]
    cdef Py_ssize_t h = image.shape[0], w = image.shape[1]
    cdef Py_ssize_t plane = size_h * size_w
    cdef float mean_f = <float>mean, inv_std_f = <float>inv_std
    cdef Py_ssize_t face, y
    if n == 0:
        return
    cdef const unsigned char* src = &image[0, 0, 0]
    cdef const double* transforms = &inverse_transforms[0, 0, 0]
    cdef float* dst = &out[0, 0, 0, 0]
    # Serial on purpose: an OpenMP team (prange over rows) halved the time on an idle
    # 2-core box but made it 10-200x slower whenever another process held a core (the
    # team waits for its descheduled thread). Concurrency comes from requests instead:
    # the GIL is released, so other lanes' requests and ORT run meanwhile.
    with nogil:
        for face in range(n):
            for y in range(size_h):
                warp_row(src, h, w, transforms + face * 6, y, size_w,
                         dst + face * 3 * plane + y * size_w, plane, mean_f, inv_std_f)
