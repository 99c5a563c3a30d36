from __future__ import annotations

import pytest

from splice.core.allocator import EXPANDABLE, allocator_setting, default_to_expandable, expandable_segments_on


def test_the_default_fills_only_an_unset_allocator() -> None:
    environ: dict[str, str] = {}
    default_to_expandable(environ)
    assert environ == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} and EXPANDABLE == "expandable_segments:True"
    # the user's choice, under either name torch reads, is left alone: setting the CUDA name over
    # PYTORCH_ALLOC_CONF would hide the user's value from torch's CUDA allocator
    for given in ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"},
                  {"PYTORCH_ALLOC_CONF": "max_split_size_mb:512"},
                  {"PYTORCH_CUDA_ALLOC_CONF": ""}):
        environ = dict(given)
        default_to_expandable(environ)
        assert environ == given


def test_the_cuda_name_wins_as_in_torch() -> None:
    both = {"PYTORCH_ALLOC_CONF": "expandable_segments:True", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}
    assert allocator_setting(both) == "max_split_size_mb:512"
    assert not expandable_segments_on(both)
    assert allocator_setting({}) is None


@pytest.mark.parametrize(("value", "on"), [
    ("expandable_segments:True", True),
    ("max_split_size_mb:512, expandable_segments:True", True),
    ("expandable_segments : True,garbage_collection_threshold:0.8", True),
    ("expandable_segments:False", False),
    ("expandable_segments:true", False),  # torch accepts True / False only
    ("roundup_power2_divisions:[256:1,>:4]", False),
    ("", False),
])
def test_expandable_segments_on_reads_the_setting(value: str, on: bool) -> None:
    assert expandable_segments_on({"PYTORCH_ALLOC_CONF": value}) is on
