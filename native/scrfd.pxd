# Types shared by the SCRFD kernels in scrfd.pyx (cimported there).
#
# The compiled module is ``matcher._scrfd``; Cython would look for its own .pxd at
# ``matcher/_scrfd.pxd``, so this file is cimported by name instead and holds only
# types (no function declarations, so nothing is imported at run time).

cdef struct StrideOutputs:
    # One stride's raw detector outputs for one image (borrowed pointers).
    const float* scores    # (n,)
    const float* boxes     # (n, 4) distances in stride units
    const float* kps       # (n, 10) offsets in stride units
    Py_ssize_t n           # anchors at this stride
    Py_ssize_t stride      # pixels per grid cell
    Py_ssize_t width       # grid cells per row: input_w // stride
