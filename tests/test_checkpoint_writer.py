"""The background checkpoint writer, as a process (shared memory + socket) and as a thread: what it writes
is the state at save time, its errors reach the training loop, and a dead worker is reported by step."""

import os
import signal

import pytest
import torch

from kotodama_core.model.io import CheckpointError, load_pt_zst
from kotodama_core.train import checkpoint as ckpt
from kotodama_core.train.checkpoint_writer import (CheckpointWriter, materialize, plan_slots,
                                                   process_writer_available)

KINDS = ["thread"] + (["process"] if process_writer_available() else [])


def state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step)), "b": torch.arange(6, dtype=torch.bfloat16).view(2, 3)},
            "optimizer": {"state": {0: {"step": torch.tensor(float(step)), "empty": torch.zeros(0)}}},
            "step": step, "rng": ckpt.rng_state(), "pair": (torch.ones(2, dtype=torch.int64), "x")}


def writer_of(kind: str, folder, **kw) -> CheckpointWriter:
    return CheckpointWriter(folder, process=kind == "process", **{"keep_last": 2, **kw})


def test_slots_round_trip_through_a_block():
    original = state(3)
    original["model"]["t"] = torch.arange(12.0).view(3, 4).t()  # not contiguous
    skeleton, pairs, nbytes = plan_slots(original)
    assert all(slot.offset % 64 == 0 for _, slot in pairs) and nbytes >= sum(t.numel() * t.element_size()
                                                                             for t, _ in pairs)
    block = bytearray(nbytes)
    for tensor, slot in pairs:
        torch.frombuffer(block, dtype=slot.dtype, count=slot.numel, offset=slot.offset).view(slot.shape).copy_(tensor)
    back = materialize(skeleton, block)
    assert torch.equal(back["model"]["t"], original["model"]["t"]) and back["model"]["b"].dtype == torch.bfloat16
    assert back["optimizer"]["state"][0]["empty"].shape == (0,) and back["pair"][1] == "x"
    assert isinstance(back["pair"], tuple) and back["rng"] == original["rng"]
    # every tensor has a storage of its own, so torch.save writes each as the original tensor
    assert back["model"]["w"].untyped_storage().nbytes() == 3 * 4


@pytest.mark.parametrize("kind", KINDS)
def test_writer_saves_a_snapshot_not_the_live_tensors(tmp_path, kind):
    writer = writer_of(kind, tmp_path)
    assert writer.kind == kind
    live = state(1)
    blocked = writer.save(1, live)
    live["model"]["w"].add_(100.0)  # the loop goes on updating the weights in place
    writer.wait()
    assert blocked >= 0.0
    loaded = load_pt_zst(tmp_path / ckpt.checkpoint_name(1))
    assert torch.equal(loaded["model"]["w"], torch.full((3,), 1.0))
    assert torch.equal(loaded["model"]["b"], state(1)["model"]["b"]) and loaded["pair"][1] == "x"
    assert loaded["model"]["w"].untyped_storage().nbytes() == 3 * 4
    for step in (2, 3):
        writer.save(step, state(step))
    writer.close()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    assert [p.name for p in writer.written] == [ckpt.checkpoint_name(s) for s in (1, 2, 3)]
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("kind", KINDS)
def test_write_error_reaches_the_training_loop(tmp_path, kind):
    folder = tmp_path / "checkpoints"
    writer = writer_of(kind, folder)
    writer.save(1, state(1))
    writer.wait()
    in_the_way = folder / ckpt.checkpoint_name(2)
    in_the_way.mkdir()  # the rename onto a folder fails in the writer
    writer.save(2, state(2))
    with pytest.raises(OSError):
        writer.wait()
    in_the_way.rmdir()
    writer.save(3, state(3))  # the writer goes on after a failed write
    writer.close()
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [1, 3]


@pytest.mark.skipif("process" not in KINDS, reason="the process writer needs Linux memfd")
def test_a_dead_writer_process_is_reported_with_its_step(tmp_path):
    writer = writer_of("process", tmp_path)
    writer.save(1, state(1))
    writer.wait()
    proc = writer._process._proc
    os.kill(proc.pid, signal.SIGSTOP)  # the worker takes the request for step 2 but never gets to it
    writer.save(2, state(2))
    os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(CheckpointError, match=r"writer process exited \(code -9\) while writing step 2"):
        writer.wait()
    writer.save(3, state(3))  # a new worker takes over
    writer.close()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 3]


@pytest.mark.skipif("process" not in KINDS, reason="the process writer needs Linux memfd")
def test_the_worker_stops_with_the_writer(tmp_path):
    writer = writer_of("process", tmp_path)
    writer.save(1, state(1))
    proc = writer._process._proc
    writer.close()
    assert proc.poll() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_writer_pins_its_block_and_writes_gpu_state(tmp_path, kind):
    live = {"model": {"w": torch.randn(1024, 256, device="cuda"),
                      "h": torch.randn(64, device="cuda", dtype=torch.bfloat16)}, "step": 1}
    expected = {k: v.cpu() for k, v in live["model"].items()}
    writer = writer_of(kind, tmp_path)
    writer.save(1, live)
    assert writer._block.pinned  # page-locked: the device-to-host copies run asynchronously
    live["model"]["w"].zero_()
    writer.close()
    loaded = load_pt_zst(tmp_path / ckpt.checkpoint_name(1))
    assert all(torch.equal(loaded["model"][k], v) for k, v in expected.items())
    assert loaded["model"]["w"].device.type == "cpu"


@pytest.mark.skipif("process" not in KINDS, reason="the process writer needs Linux memfd")
def test_a_save_that_waits_names_the_write_in_flight(tmp_path, capsys):
    import threading

    from kotodama_core.train.engine import SlowWrites

    writer = writer_of("process", tmp_path)
    writer.save(1, state(1))
    writer.wait()
    assert writer.waited_for is None and writer.last_wait_s >= 0
    proc = writer._process._proc
    os.kill(proc.pid, signal.SIGSTOP)  # the step-2 write cannot finish until the worker resumes
    writer.save(2, state(2))
    threading.Timer(0.3, os.kill, (proc.pid, signal.SIGCONT)).start()
    writer.save(3, state(3))
    assert writer.waited_for == 2 and writer.last_wait_s >= 0.3
    slow = SlowWrites(every_steps=1)
    slow.THRESHOLD_S = 0.2
    slow.report(writer, 3)
    slow.report(writer, 3)  # once per run
    out = capsys.readouterr().out
    assert out.count("waited") == 1 and "for the step-2 write still in flight" in out
    assert "train.checkpoint.every_steps=1" in out
    writer.close()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]


@pytest.mark.skipif("process" not in KINDS, reason="the process writer needs Linux memfd")
def test_a_state_that_grows_gets_a_new_shared_block(tmp_path):
    # weight averaging adds its tensors to the checkpoint once its first snapshot is taken
    writer = writer_of("process", tmp_path, keep_last=3)
    writer.save(1, state(1))
    first = writer._block
    grown = state(2)
    grown["averaging"] = {"avg": torch.arange(4096.0)}
    writer.save(2, grown)
    assert writer._block is not first and writer._block.nbytes > first.nbytes
    writer.save(3, state(3))  # and shrinks back
    writer.close()
    assert torch.equal(load_pt_zst(tmp_path / ckpt.checkpoint_name(2))["averaging"]["avg"], torch.arange(4096.0))
    assert "averaging" not in load_pt_zst(tmp_path / ckpt.checkpoint_name(3))
