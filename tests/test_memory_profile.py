"""benchmarks/memory_profile.py: reading the profiler's memory view, and one real run."""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))

import memory_profile  # noqa: E402

SMALL = os.path.join(os.path.dirname(HERE), "configs", "small.yaml")


def allocation(size, name, shape="[2,3]"):
    return {
        "activityMetadata": {"allocationBytes": str(size), "tfOpName": name, "tensorShape": shape}
    }


def test_live_allocations_are_read_counted_and_grouped_with_numbers_folded():
    profile = {
        "memoryProfilePerAllocator": {
            "mklcpu": {
                "profileSummary": {"peakStats": {"peakBytesInUse": "7000"}},
                "memoryProfileSnapshots": [
                    allocation(1000, "nvae_1/cell_3/mul_2"),
                    allocation(3000, "nvae_1/cell_12/mul"),
                    allocation(500, "gradient_tape/spectral_1/MatMul"),
                ],
                "specialAllocations": [
                    {
                        "allocationBytes": "2000",
                        "tfOpName": "preallocated",
                        "tensorShape": "unknown",
                    }
                ],
                "activeAllocations": [
                    {"snapshotIndex": "0", "specialIndex": "-1", "numOccurrences": "1"},
                    {"snapshotIndex": "1", "specialIndex": "-1", "numOccurrences": "1"},
                    {"snapshotIndex": "2", "specialIndex": "-1", "numOccurrences": "2"},
                    {"snapshotIndex": "-1", "specialIndex": "0", "numOccurrences": "1"},
                ],
            }
        }
    }
    peak, rows = memory_profile.live_at_peak(profile)
    assert peak == 7000
    assert [size for size, _, _ in rows] == [3000, 2000, 1000, 1000]  # largest first
    groups = memory_profile.grouped(rows, depth=4)
    assert groups[0] == (4000, 2, "nvae/cell/mul")
    assert (1000, 1, "gradient_tape/spectral/MatMul") in groups


def test_a_missing_config_is_one_line_and_exit_2(capsys):
    assert memory_profile.main(["--config", "no/such.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: no config file no/such.yaml"]


@pytest.mark.slow
def test_a_real_step_lists_the_models_tensors(capsys):
    assert memory_profile.main(["--config", SMALL, "--batch-size", "4", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("allocator peak ")
    assert "nvae" in out and "largest:" in out
