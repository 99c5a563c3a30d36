"""The process group: a world of one without torchrun, and a dead rank ending the others cleanly."""

from __future__ import annotations

import pytest
import torch

from splice.distributed.process import RankFailure, all_reduce_sum, collective_errors, launched, start, stop
from tests.distributed.ranks import run_ranks


def test_no_torchrun_no_group(monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert not launched()
    assert start(device_type="cpu") is None
    assert all_reduce_sum([1, 2.5], None, device=torch.device("cpu")) == [1.0, 2.5]


def test_world_of_one_opens_and_closes(monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    env = start(device_type="cpu", timeout_s=30, single=True)
    try:
        assert env is not None and (env.rank, env.world_size, env.backend) == (0, 1, "gloo")
        assert env.is_main and torch.distributed.is_initialized()
        assert all_reduce_sum([3.0], env, device=torch.device("cpu")) == [3.0]
        again = start(device_type="cpu", single=True)  # an open group is adopted, not re-opened
        assert again is not None and not again.owned
        stop(again)
        assert torch.distributed.is_initialized()
    finally:
        stop(env)
    assert not torch.distributed.is_initialized()


def test_collective_errors_name_the_rank_and_leave_other_errors_alone() -> None:
    from splice.distributed.process import DistEnv

    env = DistEnv(rank=1, world_size=4, local_rank=1, backend="gloo", timeout_s=30)
    with pytest.raises(RankFailure, match=r"rank 1 of 4 \(gloo\): a collective failed.*Connection closed by peer"):
        with collective_errors(env):
            raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1")
    with pytest.raises(ValueError, match="bad option"):
        with collective_errors(env):
            raise ValueError("bad option")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with collective_errors(env):
            raise RuntimeError("shape mismatch")


def test_a_rank_that_dies_ends_the_others_with_a_clear_error(tiny_run_inputs, tmp_path) -> None:
    job = {"inputs": [str(p) for p in tiny_run_inputs],
           "runs": [{"out": str(tmp_path / "run"), "die_at": 2,
                     "options": dict(steps=50, device="cpu", save_every=0, dist_timeout=60)}]}
    rank0, rank1 = run_ranks(job, world=2, timeout=300)  # a hang fails here, with a message
    assert rank1.returncode == 3  # died after its step 2
    assert rank0.returncode == 1, rank0.stderr[-3000:]
    assert "splice train: error: rank 0 of 2 (gloo): a collective failed, so another rank died" in rank0.stderr
    assert "Traceback" not in rank0.stderr
    assert not (tmp_path / "run" / "adapter").exists()  # no final adapter from a broken run
