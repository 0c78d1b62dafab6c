"""device.allocator: freed blocks kept for the next step (no page faults) or returned (a flat peak)."""

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalearn import allocator
from metalearn.algorithms import build_algorithm
from metalearn.allocator import Allocator, chosen, configure
from metalearn.config.compose import compose

CPU, GPU = torch.device("cpu"), torch.device("cuda")
PRELOADABLE = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


@pytest.mark.parametrize(
    "setting, device, flat_peak, expected",
    [
        ("auto", CPU, False, Allocator.keep),
        ("auto", CPU, True, Allocator.release),
        ("auto", GPU, True, Allocator.system),
        ("keep", CPU, True, Allocator.keep),
        ("release", CPU, False, Allocator.release),
        ("system", CPU, False, Allocator.system),
        (Allocator.keep, GPU, False, Allocator.keep),
    ],
)
def test_what_each_setting_resolves_to(setting, device, flat_peak, expected):
    assert chosen(setting, device, flat_peak) is expected


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, parameter, value):
        self.calls.append((parameter, value))
        return 1


@pytest.fixture
def recorded(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(allocator, "_mallopt", lambda: recorder)
    return recorder


def test_keep_maps_nothing_below_a_gibibyte_and_never_trims(recorded):
    said = configure("keep", CPU, False)
    assert recorded.calls == [
        (allocator.M_MMAP_THRESHOLD, 1 << 30),
        (allocator.M_TRIM_THRESHOLD, 2**31 - 1),
    ]
    assert "kept for reuse" in said and "device.allocator=keep" in said


def test_auto_releases_for_a_flat_peak_and_says_why(recorded):
    said = configure("auto", CPU, True)
    assert recorded.calls == [
        (allocator.M_MMAP_THRESHOLD, 1 << 20),
        (allocator.M_TRIM_THRESHOLD, 128 * 1024),
    ]
    assert "returned to the system" in said and "algo.checkpoint_inner" in said


def test_system_leaves_the_allocator_alone(recorded):
    assert "as it is" in configure("system", CPU, False) and recorded.calls == []


def test_another_c_library_is_left_alone_and_named(monkeypatch):
    monkeypatch.setattr(allocator, "_mallopt", lambda: None)
    assert "it is not glibc" in configure("keep", CPU, False)


def test_a_preloaded_malloc_is_left_alone_and_named(recorded, monkeypatch):
    monkeypatch.setattr(allocator, "_malloc_replaced", lambda: True)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    said = configure("keep", CPU, False)
    assert recorded.calls == [] and "libjemalloc.so.2" in said


@pytest.mark.skipif(allocator._mallopt() is None, reason="the C library is not glibc")
def test_glibcs_own_malloc_is_recognised_and_a_preloaded_one_detected():
    assert allocator._malloc_replaced() is False  # this process: glibc's malloc
    preloadable = [p for p in PRELOADABLE if Path(p).is_file()]
    if not preloadable:
        pytest.skip(f"neither jemalloc nor tcmalloc is installed ({', '.join(PRELOADABLE)})")
    probe = "from metalearn import allocator; print(allocator._malloc_replaced())"
    env = {**os.environ, "LD_PRELOAD": preloadable[0]}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


@pytest.mark.parametrize(
    "overrides, flat",
    [(["algo=maml", "algo.checkpoint_inner=true"], True), (["algo=maml"], False), (["algo=protonet"], False)],
)
def test_the_builder_sets_it_from_the_algorithms_need(recorded, overrides, flat):
    algo = build_algorithm(compose([*overrides, "model.hidden=4"]), CPU, 12, (1, 28, 28))
    assert algo.flat_peak is flat
    assert recorded.calls[0] == (allocator.M_MMAP_THRESHOLD, 1 << 20 if flat else 1 << 30)


def page_faults_of_a_second_block(mebibytes: int = 48) -> int:
    """Minor page faults while filling a block of the size just freed (a step's activations, twice)."""
    torch.empty(mebibytes << 18).fill_(1.0)  # float32: 4 bytes each
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(mebibytes << 18).fill_(2.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(allocator._mallopt() is None, reason="the C library is not glibc")
def test_kept_blocks_are_reused_without_page_faults_and_released_ones_fault_again():
    """48 MiB is above glibc's largest dynamic mmap threshold, as ProtoNet's 60-way activations are."""
    pages = (48 << 20) // resource.getpagesize()
    try:
        configure("release", CPU, False)
        assert page_faults_of_a_second_block() > pages // 2
        configure("keep", CPU, False)
        page_faults_of_a_second_block()  # the heap grows to hold it once
        assert page_faults_of_a_second_block() < pages // 20
    finally:
        configure("keep", CPU, False)  # what the runner's default picks for most runs
