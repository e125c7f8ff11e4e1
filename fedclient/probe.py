"""What a device measures about itself for its profile: usable memory, threads, accelerator, and the time
one training step of the run's model takes.

The server sizes the client's adapter from the profile (strategies with `options.capacity`), so the
defaults are measured rather than assumed; `fedclient join --memory-mb/--compute-class/--no-probe`
override them. Memory is what the operating system reports available now (or, when the client trains
on CUDA, the free memory of that GPU): the budget a training step has, beside what is already resident.
"""

from __future__ import annotations

import time

import psutil
import torch
from torch import nn

from fedtune.strategies.definition import DeviceProfile
from fedtune.tasks.config import TrainConfig
from fedtune.tasks.data import TokenDataset

MiB = 1024 * 1024


def measured_profile(profile: DeviceProfile, on_cuda: bool) -> DeviceProfile:
    """`profile` with what it leaves unknown (memory_mb 0, threads 0, no accelerator) measured here."""
    accelerator = profile.accelerator
    if not accelerator and on_cuda and torch.cuda.is_available():
        accelerator = f"cuda: {torch.cuda.get_device_name()}"
    memory = profile.memory_mb
    if not memory:
        cuda = on_cuda and torch.cuda.is_available()
        free = torch.cuda.mem_get_info()[0] if cuda else psutil.virtual_memory().available
        memory = int(free // MiB)
    return profile.model_copy(update={"memory_mb": memory, "threads": profile.threads or torch.get_num_threads(),
                                      "accelerator": accelerator})


def time_training_step(model: nn.Module, data: TokenDataset, train: TrainConfig) -> float:
    """Milliseconds of one forward and backward pass over one batch of the local data, at the run's batch size.
    Nothing changes: no optimizer step, gradients dropped, the RNG (dropout) and the model's mode restored."""
    generator = torch.Generator().manual_seed(0)
    batch = next(iter(data.train_batches(1, train.batch_size, generator)))
    device = next(model.parameters()).device
    training = model.training
    with torch.random.fork_rng(devices=[]):
        model.train()
        try:
            started = time.perf_counter()
            loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
            if loss.requires_grad:  # a zeroth-order strategy (fedkseed) trains nothing by backpropagation
                loss.backward()
            elapsed = time.perf_counter() - started
        finally:
            model.zero_grad(set_to_none=True)
            model.train(training)
    return round(elapsed * 1000, 3)
