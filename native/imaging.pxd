# Types shared by the image kernels in imaging.pyx (cimported there).
#
# The compiled module is ``matcher._imaging``; Cython would look for its own .pxd at
# ``matcher/_imaging.pxd``, so this file is cimported by name instead and holds only
# types (no function declarations, so nothing is imported at run time).

cdef struct LinearTap:
    # One output position of a cv2 INTER_LINEAR resize along one axis.
    Py_ssize_t i0      # first source index (already clamped)
    Py_ssize_t i1      # second source index (already clamped)
    float w            # weight of i1; (1 - w) goes to i0
