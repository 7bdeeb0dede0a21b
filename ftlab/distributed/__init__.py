"""Several processes: the layout's PaddleNLP degrees, launching, the CPU emulation of
tensor and pipeline parallelism, and global batches split exactly across ranks."""
