"""Kill-safety, graceful stop, the non-finite guard, failed writes and safe loading."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, fast_config, reset_accelerate
from test_training import all_tensors

from latent_vae.config import load_config, quickstart_overrides
from latent_vae.data.datasets import TrainDataset
from latent_vae.errors import CheckpointError, TrainingError
from latent_vae.seeding import derive_seed
from latent_vae.train import checkpoint as ckpt
from latent_vae.train import loop
from latent_vae.train.loop import train

TESTS = str(Path(__file__).parent)
COMMON = ["train.max_steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=10", "gan.start=3",
          "gan.lecam_weight=0.1", "train.ema_decay=0.9", "export.scaling_images=0"]

# A real training process, instrumented from the outside to pause at a chosen point so the
# test can kill it exactly there. Nothing in latent_vae knows about it.
CHILD = """
import os, sys, time, torch
sys.path.insert(0, {tests!r})
from conftest import FAST
import latent_vae.train.checkpoint as ckpt
from latent_vae.cli import main

mode, pause_step, marker, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
hold = marker + ".hold"

def pause():
    open(hold, "w").close()
    open(marker, "w").close()
    while os.path.exists(hold):  # the test kills us here, or removes the file to let us go on
        time.sleep(0.05)

if mode == "in-checkpoint-write":  # after the first weights file of the checkpoint, before its manifest
    original_save = ckpt.save_tensors
    def save_tensors(tensors, path):
        original_save(tensors, path)
        if ".tmp-checkpoint-%08d" % pause_step in str(path):
            pause()
    ckpt.save_tensors = save_tensors
else:  # "mid-step": after the backward passes of step `pause_step`, before its optimiser update
    autoencoder_optimizer, calls = [], []
    original_step = torch.optim.Adam.step
    def step(self, *args, **kwargs):
        if not autoencoder_optimizer:
            autoencoder_optimizer.append(self)  # created first by the trainer
        if self is autoencoder_optimizer[0]:
            calls.append(1)
            if len(calls) == pause_step + 1:
                pause()
        return original_step(self, *args, **kwargs)
    torch.optim.Adam.step = step
sys.exit(main(["train", "--output-dir", out, *FAST, *sys.argv[5:]]))
"""


def start_child(tmp_path: Path, mode: str, pause_step: int, out: Path, *overrides: str) -> tuple:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=TESTS))
    marker = tmp_path / f"marker-{mode}-{pause_step}"
    process = subprocess.Popen([sys.executable, str(script), mode, str(pause_step), str(marker), str(out), *overrides],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"child exited early:\n{process.stdout.read()[-3000:]}")
        assert time.time() < deadline, "child never reached the pause point"
        time.sleep(0.1)
    return process, marker


def child_config():
    """What the child's `latent-vae train` (no --config) runs: the quickstart's model with these overrides."""
    return load_config(None, quickstart_overrides([*FAST, *COMMON]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(child_config(), out)
    reset_accelerate()
    return all_tensors(ckpt.list_checkpoints(out / "checkpoints")[-1])


@pytest.mark.parametrize("mode, pause_step, newest_complete", [
    ("in-checkpoint-write", 4, 2),   # killed while checkpoint-4 is half written
    ("mid-step", 5, 4),              # killed between backward and optimiser step of step 5
    ("in-checkpoint-write", 8, 6),   # killed while writing the final checkpoint
])
def test_sigkill_anywhere_then_resume_gives_identical_weights(tmp_path, reference, mode, pause_step, newest_complete):
    out = tmp_path / "run"
    process, _ = start_child(tmp_path, mode, pause_step, out, *COMMON)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    complete = ckpt.list_checkpoints(out / "checkpoints")
    assert [int(p.name.split("-")[1]) for p in complete][-1] == newest_complete
    if mode == "in-checkpoint-write":
        assert list((out / "checkpoints").glob(".tmp-*")), "the half-written checkpoint is left aside, not used"
    summary = train(child_config(), out, resume="latest")
    assert summary.steps == 8
    resumed = all_tensors(ckpt.list_checkpoints(out / "checkpoints")[-1])
    assert resumed.keys() == reference.keys()
    assert [k for k in reference if not torch.equal(reference[k], resumed[k])] == []
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_sigterm_stops_cleanly_with_a_checkpoint_and_exit_code_zero(tmp_path):
    out = tmp_path / "run"
    process, marker = start_child(tmp_path, "mid-step", 3, out, "train.max_steps=1000")
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    Path(str(marker) + ".hold").unlink()
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-2000:]
    assert "resume with" in output
    steps = [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(out / "checkpoints")]
    # The signal lands during step 3's update; processes agree on stopping at the next step's
    # shared flag, so the run ends after step 3 or 4 (0-based) with a checkpoint of that step.
    assert steps[-1] in (4, 5)
    assert not (out / "model").exists()  # a stopped run is resumed, not exported


def test_time_limit_stops_like_a_signal(tmp_path):
    summary = train(fast_config("train.max_steps=1000", "train.time_limit_minutes=0.0001"), tmp_path)
    assert summary.stopped_early and summary.steps == 1
    assert ckpt.list_checkpoints(tmp_path / "checkpoints")[-1].name == "checkpoint-00000001"


def poison(monkeypatch, seed: int, batch_size: int, positions):
    """Samples at the given stream positions get NaN pixels (what a corrupt decoder might produce)."""
    bad_seeds = {derive_seed(seed, 0, p) for p in positions}
    original = TrainDataset.__getitem__

    def getitem(self, key):
        sample = original(self, key)
        if key[1] in bad_seeds:
            sample["pixel_values"] = torch.full_like(sample["pixel_values"], float("nan"))
        return sample

    monkeypatch.setattr(TrainDataset, "__getitem__", getitem)


def test_consecutive_non_finite_steps_stop_the_run_with_pre_failure_weights(tmp_path, monkeypatch):
    poison(monkeypatch, seed=0, batch_size=2, positions=range(4, 10_000))  # every sample from step 2 on
    with pytest.raises(TrainingError, match="3 consecutive non-finite steps"):
        train(fast_config("train.max_steps=50", "train.max_bad_steps=3", "gan.start=0", *COMMON[1:3]), tmp_path)
    saved = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in saved] == ["checkpoint-00000002", "checkpoint-00000004", "checkpoint-00000005"]
    before = all_tensors(saved[0])
    for later in saved[1:]:  # skipped steps change nothing: not the weights, not Adam's moments
        after = all_tensors(later)
        assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert "step 2: non-finite" in (tmp_path / "train.log").read_text()



def test_fused_adam_rolls_back_on_the_device_and_the_host_reads_the_verdict_only_at_log_steps(tmp_path, monkeypatch):
    """With fused Adam the step needs no host-device synchronisation: a bad step is rolled back on
    the device by the shared verdict and the host learns of it at the next logging step. Steps 2-9
    are bad, the limit is 3, logging every 10: the host path would stop at step 5, this one stops at
    step 10, with the weights and Adam's moments of step 2."""
    poison(monkeypatch, seed=0, batch_size=2, positions=range(4, 10_000))  # every sample from step 2 on
    after_each_step = []
    original_step = loop.train_step

    def train_step(state, *args, **kwargs):
        out = original_step(state, *args, **kwargs)
        after_each_step.append([t.detach().clone() for p in state.opt_ae.param_groups[0]["params"]
                                for t in (p, *state.opt_ae.state[p].values())])
        return out

    monkeypatch.setattr(loop, "train_step", train_step)
    with pytest.raises(TrainingError, match="8 consecutive non-finite steps"):
        train(fast_config("train.max_steps=50", "train.max_bad_steps=3", "train.fused_optimizer=true",
                          "logging.log_every=10", "train.checkpoint_every=100", *COMMON[4:6]), tmp_path)
    assert len(after_each_step) == 10  # the host did not stop the run before it read the verdict
    good = after_each_step[1]
    assert all(torch.equal(a, b) for later in after_each_step[2:] for a, b in zip(good, later))
    assert ckpt.load_metadata(ckpt.list_checkpoints(tmp_path / "checkpoints")[-1])["skipped_steps"] == 8
    log = (tmp_path / "train.log").read_text()
    assert "step 9: non-finite loss, gradient or update; 8 step(s) skipped since the last report" in log

NAN_CHILD = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from conftest import fast_config
import latent_vae.data.datasets as data
from latent_vae.seeding import derive_seed
from latent_vae.train import loop

bad = derive_seed(0, 0, 6)  # stream position 6 = first sample of rank 1 at step 1 (batch 2, 2 ranks)
original = data.TrainDataset.__getitem__
def getitem(self, key):
    sample = original(self, key)
    if key[1] == bad:
        sample["pixel_values"] = torch.full_like(sample["pixel_values"], float("nan"))
    return sample
data.TrainDataset.__getitem__ = getitem

params = []
original_step = loop.train_step
def train_step(state, *args, **kwargs):
    out = original_step(state, *args, **kwargs)
    params.append([p.detach().clone() for p in state.step_tensors()])
    return out
loop.train_step = train_step
summary = loop.train(fast_config("train.max_steps=3", "gan.start=0", "gan.lecam_weight=0.1"), sys.argv[1])
torch.save({{"params": params, "skipped": summary.skipped_steps}}, os.path.join(sys.argv[1], "r%s.pt" % os.environ["RANK"]))
"""


@pytest.mark.multiprocess
def test_nan_batch_on_one_rank_is_skipped_on_both(tmp_path):
    script = tmp_path / "nan.py"
    script.write_text(NAN_CHILD.format(tests=TESTS))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(tmp_path / "run")], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / "run" / f"r{r}.pt") for r in (0, 1))
    assert rank0["skipped"] == rank1["skipped"] == 1
    # after every step, everything a step changes (weights, Adam states, LeCam, buffers) is identical on
    # both ranks and finite; step 1, bad on rank 1 only, left it all as after step 0 on both
    assert len(rank0["params"]) == len(rank1["params"]) == 3
    for a, b in zip(rank0["params"], rank1["params"]):
        assert all(torch.equal(x, y) and (not x.is_floating_point() or torch.isfinite(x).all()) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(rank0["params"][0], rank0["params"][1]))
    assert not all(torch.equal(x, y) for x, y in zip(rank0["params"][1], rank0["params"][2]))
    assert "step 1: non-finite" in result.stderr


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    original = ckpt.commit

    def full_disk(root, step, *args):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(root, step, *args)

    monkeypatch.setattr(ckpt, "commit", full_disk)
    with pytest.raises(TrainingError, match=r"step 4 failed .*No space left.*checkpoint-00000002 is intact"):
        train(fast_config("train.max_steps=6", "train.checkpoint_every=2"), tmp_path)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-00000002"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(ckpt, "commit", original)
    assert train(fast_config("train.max_steps=6", "train.checkpoint_every=2"), tmp_path, resume="latest").steps == 6


class Payload:
    """Pickling this object makes unpickling run `marker.touch()` — what a hostile file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_files_are_refused_without_executing_them(tmp_path):
    from latent_vae.errors import PerceptualWeightsUnavailable
    from latent_vae.losses.perceptual import build_lpips
    from latent_vae.models.loading import load_autoencoder

    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as handle:
        pickle.dump({"weights": Payload(marker)}, handle)

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    (tmp_path / "model" / "diffusion_pytorch_model.bin").write_bytes(evil.read_bytes())
    with pytest.raises(OSError, match="no safetensors weights"):
        load_autoencoder(str(tmp_path / "model"))
    with pytest.raises(PerceptualWeightsUnavailable, match="refused"):
        build_lpips("vgg", str(evil))

    train(fast_config("train.max_steps=2", "train.checkpoint_every=2"), tmp_path / "run")
    state = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / "training_state.pt"
    size = state.stat().st_size
    payload = evil.read_bytes()
    state.write_bytes(payload + b"\0" * (size - len(payload)))  # same size: the manifest still matches
    with pytest.raises(CheckpointError, match="refused"):
        train(fast_config("train.max_steps=4", "train.checkpoint_every=2"), tmp_path / "run", resume="latest")
    assert not marker.exists()
