"""reasoning.common: the atomic-write helper (crash safety, no temp leftovers, fsync before rename, permissions)
and the runtime helpers every script uses (device/dtype choice and overrides, base dir, seeding, single-process
distributed info, one-line user errors)."""

import contextlib
import json
import os
import random
import sys

import numpy as np
import pytest
import torch

from reasoning import common
from reasoning.common import (DistInfo, UserError, atomic_write, atomic_write_json, atomic_write_text,
                              autocast_context, get_base_dir, get_compute_dtype, get_device, init_distributed,
                              run_main, seed_everything)

# ----------------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_bytes_text_and_json_roundtrip(tmp_path):
    atomic_write(str(tmp_path / "a.bin"), lambda f: f.write(b"\x00\xffraw"))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\xffraw"
    text = "ünïcode ∑ line\nsecond\r\n"
    atomic_write_text(str(tmp_path / "b.txt"), text)
    assert (tmp_path / "b.txt").read_bytes() == text.encode("utf-8")  # UTF-8, newlines written as given
    obj = {"x": [1, 2.5, None], "name": "é"}
    atomic_write_json(str(tmp_path / "c.json"), obj, indent=1, sort_keys=True)
    assert (tmp_path / "c.json").read_text(encoding="utf-8") == json.dumps(obj, indent=1, sort_keys=True)
    atomic_write(str(tmp_path / "a.bin"), lambda f: f.write(b"new"))  # replaces an existing file
    assert (tmp_path / "a.bin").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.txt", "c.json"]  # no temp files


def test_write_fn_gets_a_hidden_temp_file_next_to_the_target(tmp_path):
    seen = {}

    def write(f):
        f.write(b"payload")
        f.flush()
        seen["name"] = f.name
        seen["listing"] = os.listdir(tmp_path)
        with open(f.name, "rb") as back:  # write_fn may read back what it wrote (download validation does)
            seen["content"] = back.read()

    atomic_write(str(tmp_path / "target.pt"), write)
    assert os.path.dirname(seen["name"]) == str(tmp_path)  # same directory: the rename cannot cross filesystems
    name = os.path.basename(seen["name"])
    assert name.startswith(".target.pt.") and name.endswith(".tmp")
    assert seen["listing"] == [name]  # the real name does not exist while writing
    assert seen["content"] == b"payload"
    assert os.listdir(tmp_path) == ["target.pt"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("existed", [True, False])
def test_crash_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path, error, existed):
    path = tmp_path / "state.json"
    if existed:
        atomic_write_text(str(path), "old")

    def half_write(f):
        f.write("partial new cont")
        raise error

    with pytest.raises(type(error)):
        atomic_write(str(path), half_write, mode="w")
    if existed:
        assert path.read_text() == "old"
        assert os.listdir(tmp_path) == ["state.json"]
    else:
        assert os.listdir(tmp_path) == []


def test_crash_at_the_rename_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    atomic_write(str(path), lambda f: f.write(b"old weights"))
    real_replace = os.replace

    def crashing_replace(src, dst):
        assert open(src, "rb").read() == b"new weights"  # fully written: the crash is exactly at the rename
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated"):
        atomic_write(str(path), lambda f: f.write(b"new weights"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_bytes() == b"old weights"
    assert os.listdir(tmp_path) == ["model.pt"]


def test_data_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_size))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(str(tmp_path / "f.bin"), lambda f: f.write(b"12345"))
    # the file's 5 bytes reach the disk before the rename publishes them; then the directory may be synced too
    assert events[:2] == [("fsync", 5), ("replace", "f.bin")]


def test_json_that_cannot_be_serialised_touches_no_file(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json(str(tmp_path / "meta.json"), {"bad": object()})
    assert os.listdir(tmp_path) == []


def test_bad_mode_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="mode='a'"):
        atomic_write(str(tmp_path / "x"), lambda f: None, mode="a")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_written_files_get_umask_permissions_not_private_temp_ones(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_text(str(tmp_path / "shared.txt"), "readable by the group")
    finally:
        os.umask(previous)
    assert (os.stat(tmp_path / "shared.txt").st_mode & 0o777) == 0o644  # what open() would give, not mkstemp's 0600


# ----------------------------------------------------------------------------------------------- runtime helpers


def test_get_device_override_beats_env_and_env_beats_autodetect(monkeypatch):
    monkeypatch.setenv("REASONING_DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # autodetect would say cuda; the env wins
    assert get_device() == torch.device("cpu")
    monkeypatch.setenv("REASONING_DEVICE", "cuda")
    assert get_device("cpu") == torch.device("cpu")
    monkeypatch.undo()  # the real cuda check, and no REASONING_DEVICE
    assert get_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert get_device() == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a missing GPU")
def test_get_device_cuda_without_cuda_is_a_user_error(monkeypatch):
    monkeypatch.delenv("REASONING_DEVICE", raising=False)
    with pytest.raises(UserError, match="cuda.*not available"):
        get_device("cuda")
    monkeypatch.setenv("REASONING_DEVICE", "cuda:1")
    with pytest.raises(UserError, match="cuda:1"):
        get_device()


@pytest.mark.parametrize("name", ["gpu", "foo", "meta", "cuda:x"])
def test_get_device_rejects_unknown_devices_in_one_line(name):
    with pytest.raises(UserError, match=f"device '{name}': expected cpu, cuda, cuda:N or mps"):
        get_device(name)


@pytest.mark.parametrize("value, dtype", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                          ("fp16", torch.float16), ("float16", torch.float16),
                                          ("fp32", torch.float32), ("float32", torch.float32)])
def test_compute_dtype_env_override(monkeypatch, value, dtype):
    monkeypatch.setenv("REASONING_DTYPE", value)
    assert get_compute_dtype("cpu") == dtype
    assert get_compute_dtype(torch.device("cpu")) == dtype


def test_compute_dtype_default_and_bad_env_value(monkeypatch):
    monkeypatch.delenv("REASONING_DTYPE", raising=False)
    assert get_compute_dtype("cpu") == torch.float32  # CPU runs in fp32
    monkeypatch.setenv("REASONING_DTYPE", "int8")
    with pytest.raises(UserError, match=r"REASONING_DTYPE='int8'.*bf16, fp16, fp32"):
        get_compute_dtype("cpu")


def test_autocast_is_a_no_op_on_cpu():
    assert isinstance(autocast_context("cpu", torch.bfloat16), contextlib.nullcontext)


def test_base_dir_from_env_or_home_and_created(monkeypatch, tmp_path):
    target = tmp_path / "runs" / "a"
    monkeypatch.setenv("REASONING_BASE_DIR", str(target))
    assert get_base_dir() == str(target)
    assert target.is_dir()
    monkeypatch.delenv("REASONING_BASE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("USERPROFILE", str(tmp_path / "home"))  # expanduser's source on Windows
    expected = tmp_path / "home" / ".cache" / "reasoning"
    assert get_base_dir() == str(expected)
    assert expected.is_dir()


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_seed_everything_makes_python_numpy_and_torch_repeatable():
    seed_everything(1234)
    first = _draws()
    seed_everything(1234)
    assert _draws() == first
    seed_everything(1235)
    other = _draws()
    assert all(a != b for a, b in zip(first, other))  # every generator was reseeded, not just one
    seed_everything(2**40 + 7)  # seeds beyond numpy's 32-bit range are accepted


def test_init_distributed_without_torchrun_is_a_single_process(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert init_distributed("cpu") == DistInfo(False, 0, 0, 1, torch.device("cpu"))
    monkeypatch.setenv("RANK", "3")  # a partial torchrun environment is not a distributed launch
    assert init_distributed("cpu") == DistInfo(False, 0, 0, 1, torch.device("cpu"))
    assert common.get_rank() == 0 and common.get_world_size() == 1 and common.is_master()


def test_run_main_turns_user_error_into_one_line_exit_2(capsys):
    def main():
        raise UserError("--steps=-1: expected >= 0")

    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --steps=-1: expected >= 0\n"
    assert run_main(lambda: 7) == 7
