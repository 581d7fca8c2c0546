"""Shared test settings: one torch thread per test process (the machines are 2-core and shared;
oversubscribed BLAS threads make small-model tests many times slower)."""

import torch

torch.set_num_threads(1)
