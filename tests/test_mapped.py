"""Mapped update tensors give their pages back (`strategies.mapped`) without changing what they hold."""

from __future__ import annotations

import gc
from pathlib import Path

import psutil
import pytest
import torch

from fedtune.strategies.api import weighted_mean
from fedtune.strategies.mapped import CAN_RELEASE, PAGE, map_file, release

MiB = 1 << 20
pytestmark = pytest.mark.skipif(not CAN_RELEASE, reason="MADV_PAGEOUT is Linux's")


def resident_file_pages() -> int:
    """This process's resident pages that are backed by files (psutil's `shared`: RssFile + RssShmem)."""
    return psutil.Process().memory_info().shared


def written(path: Path, tensors: list[torch.Tensor]) -> Path:
    path.write_bytes(b"".join(t.numpy().tobytes() for t in tensors))
    return path


def test_a_released_tensor_leaves_resident_memory_and_reads_back_the_same(tmp_path: Path):
    values = torch.randn(16 * MiB // 4, generator=torch.Generator().manual_seed(0))
    mapped = map_file(written(tmp_path / "payload", [values]), values.nbytes).view(torch.float32)
    before = resident_file_pages()
    assert torch.equal(mapped, values)  # reads every page
    assert resident_file_pages() - before >= 15 * MiB
    release(mapped)
    assert resident_file_pages() - before < 1 * MiB
    assert torch.equal(mapped, values)  # read again from the file


def test_pages_written_through_the_mapping_are_kept(tmp_path: Path):
    path = written(tmp_path / "payload", [torch.zeros(4 * MiB // 4)])
    mapped = map_file(path, 4 * MiB).view(torch.float32)
    mapped[:: PAGE // 4] = 7.0  # one value in every page: each becomes this process's own copy
    release(mapped)
    assert (mapped[:: PAGE // 4] == 7.0).all() and mapped.sum() == 7.0 * (4 * MiB // PAGE)
    assert not any(path.read_bytes())  # the file never changes


def test_only_whole_pages_inside_the_tensor_are_released(tmp_path: Path):
    """Its neighbours' bytes share the edge pages: those stay, and every value reads back."""
    values = torch.arange(3 * MiB // 4, dtype=torch.float32)
    whole = map_file(written(tmp_path / "payload", [values]), values.nbytes).view(torch.float32)
    middle = whole[1000 : 1000 + MiB // 4]  # starts and ends inside a page
    assert torch.equal(whole, values)
    release(middle)
    assert torch.equal(whole, values)


def test_weighted_mean_releases_each_mapped_input_and_leaves_others_alone(tmp_path: Path):
    updates = [torch.full((8 * MiB // 4,), float(i)) for i in range(4)]
    mapped = [map_file(written(tmp_path / f"u{i}", [t]), t.nbytes).view(torch.float32) for i, t in enumerate(updates)]
    before = resident_file_pages()
    mean = weighted_mean(mapped, [1, 1, 1, 1])
    assert torch.equal(mean, torch.full((8 * MiB // 4,), 1.5))
    assert resident_file_pages() - before < 2 * MiB  # 32 MiB of inputs were read
    on_heap = torch.ones(10)
    release(on_heap)  # not a mapping: nothing happens
    assert torch.equal(on_heap, torch.ones(10))


def test_a_mapping_is_forgotten_with_its_last_tensor(tmp_path: Path):
    from fedtune.strategies import mapped as module

    before = len(module._starts)
    tensor = map_file(written(tmp_path / "payload", [torch.ones(1024)]), 4096)
    view = tensor[100:]
    assert len(module._starts) == before + 1
    del tensor
    gc.collect()
    assert len(module._starts) == before + 1  # a view still holds it
    release(view)
    del view
    gc.collect()
    assert len(module._starts) == before
