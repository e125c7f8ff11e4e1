"""Tests run torch single-threaded: on a shared 2-core machine two threads were several times slower."""

import torch

torch.set_num_threads(1)
