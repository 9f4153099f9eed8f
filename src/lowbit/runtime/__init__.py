"""Reading packed exports back: the loader (`lowbit.load`), the packed linear and its kernels."""
