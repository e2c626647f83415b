"""Session-wide test settings."""

import torch

# Several pytest processes (and other engineers' runs) share 2 CPU cores; torch's default of
# one intra-op thread per core makes them fight over the cores and slows every run down.
torch.set_num_threads(1)
