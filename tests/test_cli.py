"""The command line: complete help, clear one-line errors, the quickstart path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST

from latent_vae.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def subcommands():
    parser = build_parser()
    return sorted(parser._subparsers._group_actions[0].choices)


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in subcommands():
        assert name in text


@pytest.mark.parametrize("name", subcommands())
def test_each_subcommand_has_a_complete_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text.lower() and len(text) > 400


def test_console_script_module_and_train_script_entry_points():
    script = str(Path(sys.executable).parent / "latent-vae")
    for command in ([script, "train", "--help"], [sys.executable, "-m", "latent_vae", "train", "--help"],
                    [sys.executable, str(ROOT / "train_scripts" / "train_autoencoder.py"), "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "--resume" in result.stdout


@pytest.mark.parametrize("override, message", [
    ("train.batchsize=4", "did you mean 'train.batch_size'"),
    ("train.batch_size=many", "expected int"),
    ("model.preset=kl-f9", "did you mean 'kl-f8'"),
])
def test_bad_arguments_give_one_clear_error(tmp_path, capsys, override, message):
    assert main(["train", "--output-dir", str(tmp_path), override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_empty_data_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--output-dir", str(tmp_path / "run"), f"data.path={tmp_path / 'empty'}"]) == 2
    assert "no images found in" in capsys.readouterr().err


def test_unwritable_output_directory_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--output-dir", str(blocker / "run"), *FAST]) == 1
    assert "not writable" in capsys.readouterr().out


def test_quickstart_command_trains_and_exports(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path), *FAST, "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "model in" in out and 'AutoencoderTiny.from_pretrained("' in out  # the quickstart's model
    assert json.loads((tmp_path / "model" / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    # Overrides make it a configured run, not the bare quickstart: missing LPIPS weights would stop it.
    assert "perceptual_if_unavailable: error" in (tmp_path / "config.yaml").read_text()


def test_resume_without_config_uses_the_run_config(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path), *FAST, "train.max_steps=2"]) == 0
    assert main(["train", "--output-dir", str(tmp_path), "--resume", "latest", "train.max_steps=3"]) == 0
    assert "done: 3 steps" in capsys.readouterr().out
