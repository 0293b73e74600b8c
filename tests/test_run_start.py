"""How a run starts: resuming with another global batch, which runs may train without LPIPS,
trackers that are not installed, and what a failed start leaves behind."""

from conftest import FAST

from latent_vae.cli import main


def test_a_resume_with_another_global_batch_needs_confirmation(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--output-dir", out, *FAST, "train.max_steps=2"]) == 0
    # batch 1 × accumulation 2: the same global batch, the same stream and learning rate: no question asked
    assert main(["train", "--output-dir", out, "--resume", "latest", "train.max_steps=3", "train.batch_size=1",
                 "train.grad_accum_steps=2"]) == 0
    capsys.readouterr()
    assert main(["train", "--output-dir", out, "--resume", "latest", "train.max_steps=4", "train.batch_size=4",
                 "train.grad_accum_steps=1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "confirm with --accept-changed-batch" in err
    assert "global batch of 2" in err and "continue at sample 12, not 6 (6 samples skipped)" in err
    assert "learning rate changes from 0.0002 to 0.0004" in err
    assert main(["train", "--output-dir", out, "--resume", "latest", "--accept-changed-batch", "train.max_steps=4",
                 "train.batch_size=4", "train.grad_accum_steps=1"]) == 0
    assert "done: 4 steps" in capsys.readouterr().out
    assert "resuming with a changed batch layout (accepted)" in (tmp_path / "run" / "train.log").read_text()
