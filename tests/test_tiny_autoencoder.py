"""Training a stock AutoencoderTiny from scratch (the quickstart's model): the low-pass start returns each
cell's colour exactly, a run improves on it, exports a folder stock diffusers loads with the same outputs,
and resumes bit-identically; settings that cannot work are refused in one line."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import fast_config, reset_accelerate, run_python, trained_run
from test_training import all_tensors

from latent_vae.config import QUICKSTART, ModelConfig, load_config
from latent_vae.data.datasets import ValidationDataset
from latent_vae.data.sources import sample_photo_sources
from latent_vae.encode.encoder import LatentEncoder
from latent_vae.errors import ConfigError
from latent_vae.models.loading import build_autoencoder
from latent_vae.models.stock import reconstruct
from latent_vae.train.checkpoint import list_checkpoints, load_tensors
from latent_vae.train.loop import train
from latent_vae.train.trainable import build_trainable_vae

# The quickstart's model, for the fast loop-mechanics configs (QUICKSTART would also set its 400 steps).
TINY = ("model.preset=tiny-taesd-f4", "model.init=lowpass", "regularizer.kind=none")


def photo_crops(count: int = 8, resolution: int = 64) -> torch.Tensor:
    _, val = sample_photo_sources()
    data = load_config(None, [f"data.resolution={resolution}"]).data
    dataset = ValidationDataset(val, data, crops=count)
    return torch.stack([dataset[i]["pixel_values"] for i in range(count)])


def cell_means(images: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(F.avg_pool2d(images, factor), scale_factor=factor, mode="nearest")


def test_lowpass_start_returns_every_cells_mean_colour():
    images = photo_crops()
    lowpass = build_autoencoder(ModelConfig(preset="tiny-taesd-f4", init="lowpass")).eval()
    default = build_autoencoder(ModelConfig(preset="tiny-taesd-f4")).eval()
    with torch.no_grad():
        started, random_start = reconstruct(lowpass, images), reconstruct(default, images)
    target = cell_means(images, 4)
    # Within the decoder's 3·tanh(z/3) clamp: below 1 % of the [-1, 1] range.
    assert (started - target).abs().max() < 0.02
    assert (random_start - target).abs().mean() > 0.2  # what the low-pass start replaces


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The quickstart's model and objective on 32 px crops, 100 steps (20 of warm-up), the GAN on from step 90."""
    return trained_run(tmp_path_factory, "tiny", *QUICKSTART, "data.resolution=32", "data.resize=64",
                       "train.max_steps=100", "train.lr_warmup_steps=20", "gan.start=90", "train.val_every=100",
                       "train.checkpoint_every=1000", "reconstruction.perceptual_weight=0", "logging.image_every=1000",
                       "train.ema_decay=0.9")


def test_a_run_improves_on_the_lowpass_start(tiny_run):
    _, summary = tiny_run
    before, after = summary.initial_val_metrics["psnr"], summary.val_metrics["psnr"]
    print(f"validation PSNR {before:.2f} dB (low-pass start) -> {after:.2f} dB")
    assert after > before + 1.0
    assert summary.skipped_steps == 0


STOCK_TINY = """
import sys, torch
from diffusers import AutoencoderTiny
model = AutoencoderTiny.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    out = model.decode(model.encode(torch.load(sys.argv[2])).latents).sample
torch.save(out, sys.argv[3])
assert "latent_vae" not in sys.modules, "the stock load must not need latent_vae"
print("scaling_factor", model.config.scaling_factor)
"""


def test_exported_tiny_model_loads_in_plain_diffusers_with_identical_outputs(tiny_run, tmp_path):
    out, _ = tiny_run
    images = photo_crops(4, 32)
    torch.save(images, tmp_path / "images.pt")
    result = run_python(STOCK_TINY, str(out / "model"), str(tmp_path / "images.pt"), str(tmp_path / "stock.pt"))
    assert result.returncode == 0, result.stderr
    assert "not expected" not in result.stderr  # no config key stock diffusers would warn about

    vae = build_autoencoder(ModelConfig(preset="tiny-taesd-f4")).eval()
    ema = load_tensors(list_checkpoints(out / "checkpoints")[-1] / "ema.safetensors")
    vae.load_state_dict({k[len("shadow."):]: v for k, v in ema.items() if k.startswith("shadow.")})
    with torch.no_grad():
        ours = reconstruct(vae, images)
    assert torch.equal(torch.load(tmp_path / "stock.pt"), ours)
    scaling = float(result.stdout.split("scaling_factor")[1])
    assert scaling != 1.0 and 0.05 < scaling < 20  # 1/std of the trained latents
    card = (out / "model" / "README.md").read_text()
    assert "AutoencoderTiny.from_pretrained" in card and "latent regulariser: none" in card
    assert "preset `tiny-taesd-f4`, started as a low-pass autoencoder" in card
    assert "decode whole images" in card  # diffusers' AutoencoderTiny tiling assumes f8


def test_tiny_run_resumes_with_identical_weights(tmp_path):
    common = [*TINY, "gan.start=2", "train.ema_decay=0.9", "train.lr_warmup_steps=2", "export.scaling_images=0"]
    train(fast_config(*common, "train.max_steps=4"), tmp_path / "straight")
    train(fast_config(*common, "train.max_steps=2"), tmp_path / "resumed")
    train(fast_config(*common, "train.max_steps=4"), tmp_path / "resumed", resume="latest")
    a = all_tensors(list_checkpoints(tmp_path / "straight" / "checkpoints")[-1])
    b = all_tensors(list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1])
    assert a.keys() == b.keys() and len(a) > 50
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_settings_a_tiny_model_cannot_use_are_refused():
    with pytest.raises(ConfigError, match="model.gradient_checkpointing is not supported for AutoencoderTiny"):
        build_trainable_vae(ModelConfig(preset="tiny-taesd-f4", gradient_checkpointing=True))
    with pytest.raises(ConfigError, match="is an AutoencoderTiny .* set regularizer.kind=none"):
        load_config(None, ["model.preset=tiny-taesd-f4"])
    for config, message in (({"encoder_block_out_channels": [16, 32, 32]}, "needs one width for all levels"),
                            ({"decoder_block_out_channels": [32, 32], "num_decoder_blocks": [2, 1]},
                             "the encoder downsamples by 4 and the decoder upsamples by 2"),
                            ({"act_fn": "silu"}, "model.init=lowpass needs act_fn relu"),
                            ({"upsample_fn": "bilinear"}, "upsample_fn nearest")):
        with pytest.raises(ConfigError, match=message):  # diffusers would build each, and fail or mislead later
            build_autoencoder(ModelConfig(preset="tiny-taesd-f4", init="lowpass", config=config))


def test_decoder_only_training_of_a_tiny_model_keeps_its_latents(tmp_path):
    first = train(fast_config(*TINY, "train.max_steps=2"), tmp_path / "base")
    reset_accelerate()
    config = fast_config("model.preset=tiny-taesd-f4", "regularizer.kind=none", f"model.pretrained={first.model_dir}",
                         "model.trainable=decoder", "train.max_steps=3")
    tuned = train(config, tmp_path / "tuned")
    base, after = (build_autoencoder(ModelConfig(pretrained=str(d))).eval() for d in (first.model_dir, tuned.model_dir))
    images = photo_crops(2, 32)
    with torch.no_grad():
        assert torch.equal(base.encode(images).latents, after.encode(images).latents)
        assert not torch.equal(reconstruct(base, images), reconstruct(after, images))


def test_the_tools_take_a_tiny_model_or_refuse_in_one_line(tiny_run, photo_folder, tmp_path, capsys):
    """encode/decode/stats on deterministic latents; what needs a posterior, a prior or the LDM layout says so."""
    import datasets

    from latent_vae.cli import main
    from latent_vae.encode.run import encode_dataset

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_run[0] / "model", model_dir)
    encode_dataset(str(model_dir), str(photo_folder), tmp_path / "latents", resolution=32, num_workers=0,
                   progress=False, layout="diffusers")
    rows = datasets.load_from_disk(str(tmp_path / "latents")).with_format("torch")
    vae = build_autoencoder(ModelConfig(pretrained=str(model_dir))).eval()
    assert rows[0]["latent"].shape == (8, 8, 8)
    assert torch.allclose(rows[0]["model_input"], rows[0]["latent"] * vae.config.scaling_factor, atol=1e-6)
    pixels = photo_crops(2, 32).add(1).mul(127.5).round().to(torch.uint8)
    with torch.no_grad():
        stock = vae.encode(pixels.float() / 127.5 - 1).latents
    assert torch.allclose(LatentEncoder(vae)(pixels)["latent"], stock, atol=1e-5)

    assert main(["decode", "--latents", str(tmp_path / "latents"), "--output-dir", str(tmp_path / "decoded")]) == 0
    assert len(list((tmp_path / "decoded").glob("*.png"))) == len(rows)
    assert main(["stats", "--latents", str(tmp_path / "latents"), "--write-to", str(model_dir),
                 "--fields", "per-channel"]) == 2
    assert "is an AutoencoderTiny" in capsys.readouterr().err
    assert main(["stats", "--latents", str(tmp_path / "latents"), "--write-to", str(model_dir)]) == 0
    config = json.loads((model_dir / "config.json").read_text())
    assert "latents_mean" not in config and config["shift_factor"] != 0.0
    capsys.readouterr()
    for command, message in ((["export", "--model", str(model_dir), "--output", str(tmp_path / "x.safetensors")],
                              "an AutoencoderTiny has none"),
                             (["sample", "--model", str(model_dir), "--count", "2", "--resolution", "32",
                               "--output-dir", str(tmp_path / "s")], "use --distribution fitted"),
                             (["encode", "--model", str(model_dir), "--data", str(photo_folder), "--latent", "sample",
                               "--resolution", "32", "--output-dir", str(tmp_path / "l2")], "use --latent mean"),
                             (["encode", "--model", str(model_dir), "--data", str(photo_folder), "--tiled",
                               "--resolution", "32", "--output-dir", str(tmp_path / "l3")], "drop --tiled"),
                             (["score", "--model", str(model_dir), str(photo_folder), "--score", "kl", "--threshold",
                               "1", "--resolution", "32", "--output-dir", str(tmp_path / "sc")], "has no posterior")):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
