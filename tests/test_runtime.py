"""The ground floor's file writes: atomic, cleaned up on failure, readable like any file the user writes."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from latent_vae.runtime import DIR_MODE, FILE_MODE, atomic_write, atomic_write_json, replace_dir


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_get_the_permissions_of_an_ordinary_file(tmp_path):
    """safetensors writes 0600 files; a model folder must be readable by a WebUI service or a team."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    target = atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
    assert mode(target) == mode(plain) == FILE_MODE

    staging = tmp_path / "staging"
    staging.mkdir(mode=0o700)
    save_file({"a": torch.zeros(2)}, str(staging / "model.safetensors"))
    assert mode(staging / "model.safetensors") == 0o600  # what the library does on its own
    final = replace_dir(staging, tmp_path / "model")
    assert mode(final / "model.safetensors") == FILE_MODE and mode(final) == DIR_MODE


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"step": 1})

    def fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, fail)
    assert target.read_text() == '{\n "step": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_replace_dir_swaps_a_folder_whole(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staging = tmp_path / ".model.tmp"
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    replace_dir(staging, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"] and not staging.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cpu_threads_leave_room_for_workers_and_other_processes(monkeypatch, restore_threads):
    """torch's one-thread-per-core default, with workers beside it, ran encode 7x slower on a busy 2-core machine."""
    from latent_vae import runtime

    for name in runtime.THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "available_cpus", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    torch.set_num_threads(8)
    assert runtime.configure_cpu_threads(torch.device("cpu"), num_workers=1) == 3 == torch.get_num_threads()
    monkeypatch.setattr(runtime, "available_cpus", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert runtime.configure_cpu_threads(torch.device("cpu"), num_workers=4) == 1  # at least one
    torch.set_num_threads(2)
    assert runtime.configure_cpu_threads(torch.device("cpu"), num_workers=0) == 2  # never raised or lowered in vain
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice (torchrun sets 1) is kept
    assert runtime.configure_cpu_threads(torch.device("cpu"), num_workers=1) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert runtime.configure_cpu_threads(torch.device("cuda"), num_workers=1) == 2  # GPU jobs: left alone
    assert runtime.default_num_workers() == 1
