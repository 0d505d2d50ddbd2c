# placeholder replaced by the native kernels
