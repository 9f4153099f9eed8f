"""What lowbit's files look like on disk, shared by the writers (export/) and the readers (runtime/): file names and
the bit packing of codes."""
