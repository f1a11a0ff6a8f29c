"""Settings for every test process."""
from __future__ import annotations

import torch

# In-process training (the 1-process references, the unit tests) runs in the pytest process while the
# other xdist worker's ranks use the two cores. With torch's default of one intra-op thread per core,
# OpenMP's spinning threads fought them. Measured with two workers on test_compression, test_hf_models
# and test_examples_train: 183 s -> 143 s, the distillation test 35 s -> under 9 s (2 s on an idle
# machine); tests/unit 89 s -> 79 s. One thread changes no comparison: launched ranks get their
# OMP_NUM_THREADS from the plan as before, and references are compared with them within a tolerance.
torch.set_num_threads(1)
