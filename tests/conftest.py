"""Suite-wide settings: tiny models run fastest on one thread (2 shared cores: a second intra-op
thread makes tiny steps ~10x slower under contention), and subprocesses inherit it."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
