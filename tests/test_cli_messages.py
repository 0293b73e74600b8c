"""What the command line says when a user gets something wrong: one line naming the thing and the fix."""

import pytest

from latent_vae.cli import main

EXPECTED = "expected a diffusers model folder (config.json + diffusion_pytorch_model.safetensors), a Hub id"


def commands(model: str, images: str, out: str):
    """Every command that takes a model, with ``model`` in its model argument."""
    return {
        "eval": ["eval", "--model", model, "--data", images],
        "export": ["export", "--model", model, "--output", f"{out}/vae.safetensors"],
        "compare": ["compare", "--model-a", model, "--model-b", model, "--data", images],
        "encode": ["encode", "--model", model, "--data", images, "--output-dir", f"{out}/latents"],
        "interpolate": ["interpolate", f"{images}/photo_00.png", f"{images}/photo_01.png", "--model", model,
                        "--output-dir", out],
        "sample": ["sample", images, "--model", model, "--output-dir", out],
        "visualize": ["visualize", images, "--model", model, "--output-dir", out],
        "score": ["score", images, "--model", model, "--output-dir", out],
        "train": ["train", f"model.pretrained={model}", "--output-dir", f"{out}/run"],
    }


@pytest.mark.parametrize("command", list(commands("", "", "")))
@pytest.mark.parametrize("kind", ["missing folder", "folder without config", "single file"])
def test_a_bad_model_is_one_line_naming_it_and_what_was_expected(command, kind, tmp_path, photo_folder, capsys,
                                                                 monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = {"missing folder": tmp_path / "runs" / "typo" / "model", "folder without config": photo_folder,
             "single file": photo_folder / "photo_00.png"}[kind]
    argv = commands(str(model), str(photo_folder), str(tmp_path / "out"))[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"latent-vae {command}: error: {model}") and EXPECTED in err[-1]
    assert not any(line.startswith("Traceback") for line in err)


def test_a_hub_id_that_cannot_be_loaded_is_one_line(capsys, monkeypatch, photo_folder):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", "--model", "nobody-here/no-such-vae", "--data", str(photo_folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "nobody-here/no-such-vae: no such local folder, and the Hub id could not be loaded" in err
    assert EXPECTED in err


@pytest.mark.parametrize("argv, hint", [
    (["tran"], "did you mean 'train'?"),
    (["eval", "--model", "m", "--data", "d", "--batch-sze", "3"], "did you mean --batch-size?"),
    (["eval", "--model", "m", "--data", "d", "--precison=bf16", "--jsn", "x"],
     "did you mean --precision (for --precison), --json (for --jsn)?"),
    (["eval", "--model", "m", "--data", "d", "--precision", "bf61"], "did you mean 'bf16'?"),
    (["export", "--model", "m", "--outptu", "x.safetensors"], "did you mean --output?"),
])
def test_a_mistyped_flag_subcommand_or_choice_names_the_nearest(argv, hint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert hint in capsys.readouterr().err


@pytest.mark.parametrize("command, flag", [("eval", "--json"), ("eval", "--csv"), ("eval", "--grid"),
                                           ("compare", "--json")])
def test_an_unwritable_output_is_refused_before_the_evaluation_runs(command, flag, tmp_path, photo_folder, capsys,
                                                                    monkeypatch):
    import latent_vae.models.loading as loading

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(loading, "load_autoencoder", no_model)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = [*commands("unused", str(photo_folder), str(tmp_path))[command], flag, str(blocker / "out.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"cannot write {blocker / 'out.json'}" in err[-1] and "writable path" in err[-1]
    assert not any(line.startswith("Traceback") for line in err)
