"""Reading DCP checkpoints safely: the .metadata pickle may name DCP's own classes only, and a checkpoint
that does not fit the state it is loaded into is one ValueError that names it."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from fastlm import checkpoint as ckpt


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "step_00000001"
    ckpt.dcp_io(dcp.save, {"model": {"w": torch.arange(4.0), "b": torch.ones(2, 3)}}, path)
    return path


def test_a_dcp_checkpoint_round_trips_through_the_safe_reader(saved):
    state = {"model": {"w": torch.zeros(4), "b": torch.zeros(2, 3)}}
    ckpt.dcp_io(dcp.load, state, saved)
    assert torch.equal(state["model"]["w"], torch.arange(4.0))
    assert torch.equal(state["model"]["b"], torch.ones(2, 3))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_metadata_that_would_run_code_is_refused_unread(saved, tmp_path):
    marker = tmp_path / "code-ran"
    (saved / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(ValueError, match=r"\.metadata: expected DCP checkpoint metadata, found a reference "
                                         r"to (posix|os|nt)\.system"):
        ckpt.dcp_io(dcp.load, {"model": {"w": torch.zeros(4)}}, saved)
    assert not marker.exists()


@pytest.mark.parametrize("content, found", [(b"not a pickle", "found an unreadable file"),
                                            (pickle.dumps({"a": 1}), "found a dict")])
def test_metadata_that_is_not_dcps_is_a_clear_error(saved, content, found):
    (saved / ".metadata").write_bytes(content)
    with pytest.raises(ValueError, match=f"expected DCP checkpoint metadata, {found}"):
        ckpt.dcp_io(dcp.load, {"model": {"w": torch.zeros(4)}}, saved)


def test_a_checkpoint_that_does_not_fit_is_one_valueerror_naming_it(saved):
    # DCP raises a CheckpointException, a BaseException that `except Exception` would miss
    with pytest.raises(ValueError,
                       match=rf"{saved}: loading the checkpoint failed .* Size mismatch .*model\.w"):
        ckpt.dcp_io(dcp.load, {"model": {"w": torch.zeros(5)}}, saved)
    with pytest.raises(ValueError, match=r"Missing key in checkpoint state_dict: model\.extra"):
        ckpt.dcp_io(dcp.load, {"model": {"w": torch.zeros(4), "extra": torch.zeros(1)}}, saved)
