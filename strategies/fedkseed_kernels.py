"""FedKSeed's zeroth-order kernels: the seed pool, the seeded perturbation z(s), the two-point step
and FedKSeed-Pro's seed probabilities (Qin et al., ICML 2024, arXiv:2312.06353; docs/algorithms.md §3).

- Seed pool: K seeds `hash_seed(run seed, "fedkseed-pool", k)`, derived by everyone from the run
  seed, so the pool never travels. K defaults to 4096, the reference code's default (the README's
  example commands pass 1024).
- Perturbation z(s): the trained parameters in canonical order (sorted names), each cut into
  chunks of `PERTURBATION_CHUNK` values; chunk c of parameter p is `torch.randn` in float32 from
  its own CPU `torch.Generator` (mt19937) seeded with `hash_seed(s, p, c)`. Independent streams
  let chunks be generated on all cores at once (torch's normal generator is single-threaded, and
  regenerating z three times a step is FedKSeed's main overhead), and z does not depend on the
  thread count. A perturbation holds one chunk per thread (4 MB), never a copy of the model.
  Bit-identical across processes on the same CPU kind; torch picks its vectorised normal kernel by
  CPU capability, so across machines pin `ATEN_CPU_CAPABILITY` to one value.
- Client step (MeZO pattern, Malladi et al. arXiv:2305.17333, Alg. 1; docs/algorithms.md §3.3): w += εz,
  L+; w −= 2εz, L−; g = (L+ − L−)/2ε; then w += (ε − ηg)z, the restore and the update fused in one
  pass. Losses in fp32 under model.eval(); a NaN (or over-clip) loss difference only restores and
  records nothing.
- FedKSeed-Pro (§3.6): the K min-max normalised amplitudes quantised to uint8 levels (4 KB for
  K = 4096, not 16 KB of float32 π); clients take the softmax themselves, and the rounding moves
  any π_j by a factor of at most e^(1/255).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from fedtune.strategies.api import hash_seed

PERTURBATION_CHUNK = 1 << 20  # values per z stream: part of z's definition, never tied to a thread count
PRO_LEVELS = 255

NamedParameters = list[tuple[str, nn.Parameter]]


def seed_pool(run_seed: int, size: int) -> list[int]:
    """The K candidate seeds, the same for every party of a run."""
    pool = [hash_seed(run_seed, "fedkseed-pool", k) for k in range(size)]
    if len(set(pool)) != size:
        raise ValueError(f"seed_pool_size: {size} seeds from run seed {run_seed} collide")
    return pool


def chunk_noise(seed: int, parameter_index: int, chunk_index: int, size: int) -> torch.Tensor:
    """One chunk of z(seed): standard normal float32 from its own CPU mt19937 stream."""
    generator = torch.Generator(device="cpu").manual_seed(hash_seed(seed, parameter_index, chunk_index))
    return torch.randn(size, generator=generator, dtype=torch.float32)


def chunk_bounds(numel: int) -> list[tuple[int, int]]:
    return [(start, min(start + PERTURBATION_CHUNK, numel)) for start in range(0, numel, PERTURBATION_CHUNK)]


def perturbation(parameters: NamedParameters, seed: int) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
    """z(seed) one whole parameter at a time (for checks; `perturb` works chunk by chunk)."""
    for index, (_, parameter) in enumerate(parameters):
        chunks = [chunk_noise(seed, index, chunk, stop - start)
                  for chunk, (start, stop) in enumerate(chunk_bounds(parameter.numel()))]
        yield parameter, torch.cat(chunks).view(parameter.shape)


_pools: dict[int, ThreadPoolExecutor] = {}  # by thread count, which follows torch.set_num_threads


def _perturbation_pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fedkseed-z")
    return _pools[threads]


def _forget_pool_after_fork() -> None:
    """A forked child (a fedsim worker) inherits the pool objects but not their threads."""
    _pools.clear()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


@torch.no_grad()
def perturb(parameters: NamedParameters, seed: int, scale: float) -> None:
    """w ← w + scale·z(seed), in place, chunks spread over torch's thread count."""
    chunks = [(parameter, index, chunk, start, stop)
              for index, (_, parameter) in enumerate(parameters)
              for chunk, (start, stop) in enumerate(chunk_bounds(parameter.numel()))]

    def add_chunk(task: tuple[nn.Parameter, int, int, int, int]) -> None:
        parameter, index, chunk, start, stop = task
        z = chunk_noise(seed, index, chunk, stop - start)
        parameter.view(-1)[start:stop].add_(z.to(device=parameter.device, dtype=parameter.dtype), alpha=scale)

    threads = torch.get_num_threads()
    if threads == 1 or sum(stop - start for *_, start, stop in chunks) < 2 * PERTURBATION_CHUNK:  # small models:
        for task in chunks:  # the thread hand-off would cost more than it saves
            add_chunk(task)
    else:
        list(_perturbation_pool(threads).map(add_chunk, chunks))


@dataclass(frozen=True)
class ZerothOrderStep:
    scalar_grad: float
    loss: float


def zeroth_order_step(
    parameters: NamedParameters,
    seed: int,
    eps: float,
    learning_rate: float,
    loss_fn: Callable[[], float],
    loss_diff_clip: float | None = None,
) -> ZerothOrderStep | None:
    """One two-point step (docs/algorithms.md §3.3 steps 2-7); None (weights restored) when skipped."""
    perturb(parameters, seed, eps)
    loss_plus = loss_fn()
    perturb(parameters, seed, -2 * eps)
    loss_minus = loss_fn()
    difference = loss_plus - loss_minus
    if not math.isfinite(difference) or (loss_diff_clip is not None and abs(difference) > loss_diff_clip):
        perturb(parameters, seed, eps)
        return None
    scalar_grad = difference / (2 * eps)
    perturb(parameters, seed, eps - learning_rate * scalar_grad)
    return ZerothOrderStep(scalar_grad=scalar_grad, loss=(loss_plus + loss_minus) / 2)


@torch.no_grad()
def batch_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> float:
    return float(model(**batch).loss.float())


def amplitude_levels(amplitudes: torch.Tensor) -> torch.Tensor:
    """FedKSeed-Pro's min-max normalised mean |g| (docs/algorithms.md §3.6), as uint8 levels 0..255."""
    amplitudes = amplitudes.to(torch.float64)
    normalised = (amplitudes - amplitudes.min()) / (amplitudes.max() - amplitudes.min() + 1e-10)
    return torch.round(normalised * PRO_LEVELS).to(torch.uint8)


def seed_probabilities(levels: torch.Tensor) -> torch.Tensor:
    """π = softmax(levels / 255) in float64; the normalised values lie in [0, 1], so max π / min π ≤ e."""
    return torch.softmax(levels.to(torch.float64) / PRO_LEVELS, dim=0)
