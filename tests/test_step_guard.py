"""A bad step changes nothing: the rollback of everything a training step touches (train/rollback.py).

Each run trains a few steps with one NaN sample in the batch of one step (or a learning rate whose
update overflows float32) and records the complete training state around every step: weights,
both Adam states, the weight EMA, the VQ codebook with its EMA statistics, usage counters and
restart buffer, the LeCam anchors. The bad step must leave all of it bit for bit as it was, and the
next step must train.
"""

import pytest
import torch
from conftest import fast_config
from test_reliability import poison
from test_training import all_tensors

from latent_vae.errors import ConfigError, TrainingError
from latent_vae.train import checkpoint as ckpt
from latent_vae.train import loop

VQ = ["model.preset=tiny-vq", "regularizer.kind=vq", "regularizer.vq.ema_decay=0.9", "regularizer.vq.restart_dead=true",
      "regularizer.vq.dead_after=1", "regularizer.vq.restart_buffer=64"]
GAN = ["gan.start=0", "gan.lecam_weight=0.1", "train.ema_decay=0.9"]


def everything(state) -> dict:
    """Every tensor of the training state that a step may change, by name, copied."""
    tensors = {}
    for part, values in state.state_dict()["weights"].items():
        tensors.update({f"{part}/{k}": v.detach().clone() for k, v in values.items()})
    for name, optimizer in (("opt_ae", state.opt_ae), ("opt_d", state.opt_d)):
        for i, group in enumerate(optimizer.param_groups):
            for j, p in enumerate(group["params"]):
                tensors.update({f"{name}/{i}/{j}/{k}": v.detach().clone()
                                for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)})
    return tensors


def record_steps(monkeypatch) -> list:
    """(state before, state after, skipped-before-count) of every step train() takes."""
    records = []
    original = loop.train_step

    def train_step(state, batches, step, guard, *args, **kwargs):
        before = everything(state)
        out = original(state, batches, step, guard, *args, **kwargs)
        records.append((before, everything(state)))
        return out

    monkeypatch.setattr(loop, "train_step", train_step)
    return records


def assert_unchanged(before: dict, after: dict) -> None:
    # Adam creates its state at its first step: a first bad step leaves it as created, all zeros.
    created = [k for k in after if k not in before]
    assert all(not after[k].any() for k in created), created
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []


def assert_trains(before: dict, after: dict) -> None:
    floats = [k for k in after if after[k].is_floating_point()]
    assert all(torch.isfinite(after[k]).all() for k in floats)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("autoencoder/vae.decoder"))


@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_nan_sample_leaves_every_piece_of_state_bitwise_unchanged(tmp_path, monkeypatch, kind, fused):
    poison(monkeypatch, seed=0, batch_size=2, positions=[4])  # one sample of step 2
    records = record_steps(monkeypatch)
    extra = (VQ if kind == "vq" else []) + (["train.fused_optimizer=true"] if fused else [])
    summary = loop.train(fast_config("train.max_steps=4", "export.scaling_images=0", *GAN, *extra), tmp_path)
    assert summary.skipped_steps == 1
    assert_unchanged(*records[2])
    assert_trains(*records[3])
    window = [line for line in (tmp_path / "train.log").read_text().splitlines() if "step 4/4" in line]
    assert window and "nan" not in window[0]  # the bad step's logged values are left out of the means
    if kind == "vq":  # what the forward pass maintains moved in the good steps: the test sees it
        before, after = records[1]
        for name in ("ema_cluster_size", "ema_embed_sum", "recent", "num_forwards"):
            key = f"autoencoder/regularizer.{name}"
            assert not torch.equal(before[key], after[key]), name
    before, after = records[1]
    assert not torch.equal(before["loss/lecam_ema_real"], after["loss/lecam_ema_real"])


def test_a_first_step_that_is_bad_leaves_adam_as_new(tmp_path, monkeypatch):
    poison(monkeypatch, seed=0, batch_size=2, positions=[1])
    records = record_steps(monkeypatch)
    summary = loop.train(fast_config("train.max_steps=2", "export.scaling_images=0", *GAN, *VQ), tmp_path)
    assert summary.skipped_steps == 1
    assert_unchanged(*records[0])
    assert_trains(*records[1])


def overflow_adam_state(monkeypatch):
    return ["train.weight_decay=1e30"]  # Adam's L2 term: finite gradients, exp_avg_sq = inf


def write_inf_into_a_weight(monkeypatch):
    """Any optimiser whose update is non-finite: the first weight of each model becomes inf."""
    original = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return []


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("cause", [overflow_adam_state, write_inf_into_a_weight])
def test_finite_losses_and_gradients_with_a_non_finite_update_are_rolled_back(tmp_path, monkeypatch, fused, cause):
    """The loss and gradients are finite, the state after the update is not: the step is rolled back
    (first steps: Adam's state left as new), the run stops, and its checkpoint is finite."""
    records = record_steps(monkeypatch)
    extra = cause(monkeypatch) + (["train.fused_optimizer=true"] if fused else [])
    with pytest.raises(TrainingError, match="2 consecutive non-finite steps"):
        loop.train(fast_config("train.max_steps=6", "train.max_bad_steps=2", "logging.log_every=1", *GAN, *VQ,
                               *extra), tmp_path)
    assert len(records) == 2
    for before, after in records:
        assert_unchanged(before, after)
    saved = all_tensors(ckpt.list_checkpoints(tmp_path / "checkpoints")[-1])
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())


def test_a_learning_rate_beyond_float32_is_refused_before_the_first_step(tmp_path, monkeypatch):
    """1e38 passes the config's finiteness check, but × batch 2 (lr_scaling=linear) it is beyond
    float32, where torch's Adam fails mid-step with an overflow traceback."""
    records = record_steps(monkeypatch)
    with pytest.raises(ConfigError, match="beyond float32's range; lower train.learning_rate"):
        loop.train(fast_config("train.learning_rate=1e38"), tmp_path)
    assert records == []


def test_the_snapshot_restores_bit_patterns_whatever_the_step_wrote():
    """inf, NaN and -0.0 written by a step come back bit for bit in every dtype; a good verdict keeps
    the new values; a tensor created during the step (Adam's lazy state) is zeroed by a bad one."""
    from latent_vae.train.rollback import StepSnapshot

    tensors = [torch.randn(5), torch.randn(3).bfloat16(), torch.arange(4), torch.randn(2, dtype=torch.float64)]
    originals = [t.clone() for t in tensors]
    snapshot = StepSnapshot()
    for bad, expected in ((1.0, originals), (0.0, None)):
        snapshot.save(tensors)
        for t in tensors:
            t.copy_(torch.tensor([float("inf"), float("nan"), -0.0, 7.0, 1.0][:len(t)]).to(t.dtype))
        written = [t.clone() for t in tensors]
        created = torch.ones(3)
        assert snapshot.all_finite([*tensors, created], torch.device("cpu")) == 0
        snapshot.restore([*tensors, created], torch.tensor(bad))
        for t, e in zip(tensors, expected or written):
            assert torch.equal(t.view(-1).view(torch.uint8), e.view(-1).view(torch.uint8))
        assert torch.equal(created, torch.zeros(3) if bad else torch.ones(3))
    assert snapshot.all_finite(originals, torch.device("cpu")) == 1
