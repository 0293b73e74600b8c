"""``latent-vae distill``: a stock AutoencoderTiny learns a teacher AutoencoderKL's scaled latent space.

Teachers are tiny AutoencoderKL networks built here with random weights (no download, no time to train
one): a random encoder's latents still describe the image, so the student's encoder can learn to
reproduce them and its decoder can learn to turn them back into the image. Images are 32 px crops of
the photographs bundled with scikit-image; figures are measured on the held-out validation crops.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_python
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from latent_vae.cli import main
from latent_vae.config import load_config
from latent_vae.distill.loop import distill
from latent_vae.distill.student import Teacher, build_student
from latent_vae.interop.pipelines import LatentDriftWarning, check_images, swap_vae
from latent_vae.presets import PRESETS

SIZE = 32
# Loop-mechanics settings: 32 px, no workers, no trackers, no LPIPS, no GAN unless a test turns it on;
# a student of width 16 with one block per level (AutoencoderTiny's smallest sensible size).
FAST = [
    "data.resolution=32", "data.resize=48", "data.num_workers=0", "data.val_images=2", "data.val_crops=4",
    "train.batch_size=8", "train.max_steps=4", "train.checkpoint_every=1000", "train.val_every=1000",
    "train.learning_rate=3e-3", "train.lr_scaling=none", "train.adam_betas=[0.9,0.9]", "train.amsgrad=true",
    "logging.trackers=[]", "logging.image_every=1000", "reconstruction.perceptual_weight=0", "gan.weight=0",
    "reconstruction.pixel_loss=l2", "reconstruction.reduction=mean", "distill.student=taesd-small",
    "distill.benchmark_images=0", "distill.teacher_latents=mode",
    "distill.student_config.encoder_block_out_channels=[16,16,16,16]",
    "distill.student_config.decoder_block_out_channels=[16,16,16,16]",
    "distill.student_config.num_encoder_blocks=[1,1,1,1]", "distill.student_config.num_decoder_blocks=[1,1,1,1]",
]
LEARNING_STEPS = 60
ENCODER_ERROR_FACTOR = 2.0  # the student encoder's relative latent error falls at least this much
PSNR_MARGIN_DB = 1.0  # the student's decode of the teacher's latents: at most this far below the teacher's own


def make_teacher(folder, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = {**PRESETS["tiny-kl"].kwargs, "scaling_factor": 0.5, **overrides}
    teacher = PRESETS["tiny-kl"].cls(**kwargs)
    teacher.save_pretrained(folder)
    return teacher


def run_distill(output_dir, teacher_dir, *overrides, resume=None):
    config = load_config(None, [*FAST, f"distill.teacher={teacher_dir}", *overrides])
    return distill(config, output_dir, resume=resume)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """One run distilling both halves for LEARNING_STEPS steps, exported with its card (speed measured)."""
    root = tmp_path_factory.mktemp("distill")
    make_teacher(root / "teacher")
    summary = run_distill(root / "run", root / "teacher", f"train.max_steps={LEARNING_STEPS}",
                          f"train.val_every={LEARNING_STEPS}", "distill.benchmark_images=2")
    return root, summary


def test_the_encoder_learns_the_teachers_scaled_latents(distilled):
    _, summary = distilled
    before = summary.initial_val_metrics["encoder_relative_error"]
    after = summary.val_metrics["encoder_relative_error"]
    assert after * ENCODER_ERROR_FACTOR < before, (before, after)


def test_the_decoder_reconstructs_from_teacher_latents_about_as_well_as_the_teacher(distilled):
    _, summary = distilled
    start, end = summary.initial_val_metrics, summary.val_metrics
    assert end["psnr_student"] > start["psnr_student"] + 3.0, (start, end)
    assert end["psnr_student"] >= end["psnr_teacher"] - PSNR_MARGIN_DB, end


def test_the_export_is_a_stock_autoencoder_tiny_with_a_card(distilled, tmp_path):
    root, _ = distilled
    model_dir = root / "run" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderTiny" and config["latent_channels"] == 4
    assert config["scaling_factor"] == 1.0 and config["shift_factor"] == 0.0
    card = (model_dir / "README.md").read_text()
    assert "`teacher`" in card and "z · 0.5" in card and "psnr_student" in card
    assert str(root) not in card  # local teacher and data paths by their last component only
    assert "| decode |" in card and "x |" in card  # the measured speed table
    # Loaded by plain diffusers in a fresh process that never imports latent_vae: identical outputs.
    images = check_images(SIZE)[:2]
    save_file({"images": images}, str(tmp_path / "in.safetensors"))
    code = (
        "import sys, torch\n"
        "from diffusers import AutoencoderTiny\n"
        "from safetensors.torch import load_file, save_file\n"
        "vae = AutoencoderTiny.from_pretrained(sys.argv[1]).eval()\n"
        "x = load_file(sys.argv[2])['images']\n"
        "with torch.no_grad():\n"
        "    z = vae.encode(x).latents\n"
        "    save_file({'latents': z, 'images': vae.decode(z).sample}, sys.argv[3])\n"
        "assert not any(m.startswith('latent_vae') for m in sys.modules)\n"
    )
    result = run_python(code, str(model_dir), str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"))
    assert result.returncode == 0, result.stderr
    out = load_file(str(tmp_path / "out.safetensors"))
    vae = AutoencoderTiny.from_pretrained(model_dir).eval()
    with torch.no_grad():
        latents = vae.encode(images).latents
        assert torch.equal(out["latents"], latents) and torch.equal(out["images"], vae.decode(latents).sample)


def tiny_sd_pipeline(vae):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, output_type="pt"):
    prompt_embeds = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(1))
    return pipe(prompt_embeds=prompt_embeds, height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0), output_type=output_type).images


def test_the_student_swaps_into_the_teachers_stable_diffusion_pipeline(distilled):
    root, _ = distilled
    teacher = AutoencoderKL.from_pretrained(root / "teacher").eval()
    student = AutoencoderTiny.from_pretrained(root / "run" / "model").eval()
    pipe = tiny_sd_pipeline(teacher)
    probe = check_images(SIZE)
    with pytest.warns(LatentDriftWarning) as caught:  # 60 steps: close to the teacher, not a drop-in yet
        report = swap_vae(pipe, student, probe_images=probe)
    assert pipe.vae is student and report["scaling_changes"] == {}  # its scaling is the identity by design
    assert not any("latent scaling differs" in str(w.message) for w in caught)
    images = generate(pipe)
    assert images.shape == (1, 3, SIZE, SIZE) and torch.isfinite(images).all()
    # The pipeline hands the student the denoised (scaled) latents unchanged ...
    latents = generate(pipe, output_type="latent")
    with torch.no_grad():
        assert torch.equal((student.decode(latents).sample / 2 + 0.5).clamp(0, 1), images)
        # ... and the student's latents follow the teacher's convention: near the scaled latents z · 0.5,
        # far from the unscaled z.
        z = teacher.encode(probe).latent_dist.mode()
        ours = student.encode(probe).latents
    to_scaled, to_unscaled = (ours - 0.5 * z).norm(), (ours - z).norm()
    assert to_scaled < 0.8 * to_unscaled, (to_scaled, to_unscaled)
    assert report["drift"]["scaled_relative_l2"] < 0.8


def test_eval_and_compare_accept_the_student(distilled, photo_folder, tmp_path, capsys):
    root, _ = distilled
    student, teacher = str(root / "run" / "model"), str(root / "teacher")
    common = ["--data", str(photo_folder), "--resolution", str(SIZE), "--no-lpips", "--no-fid", "--num-workers", "0",
              "--limit", "4"]
    assert main(["eval", "--model", student, *common, "--json", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"]["psnr"] > 5
    assert main(["compare", "--model-a", teacher, "--model-b", student, *common,
                 "--json", str(tmp_path / "compare.json")]) == 0
    report = json.loads((tmp_path / "compare.json").read_text())
    # the drift is measured on the scaled latents: the teacher's z · 0.5 against the student's own latents
    drift = report["latent_drift"]
    assert drift["scaled_relative_l2"] < 0.8 * drift["relative_l2"], drift
    assert report["cross_decode"]["psnr"] > 5
    capsys.readouterr()


def weights(folder):
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_resume_continues_exactly(tmp_path):
    make_teacher(tmp_path / "teacher")
    gan = ["gan.weight=0.5", "gan.start=1", "gan.channels=8", "gan.layers=2", "train.ema_decay=0.9",
           "distill.teacher_latents=sample"]
    run_distill(tmp_path / "straight", tmp_path / "teacher", *gan)
    run_distill(tmp_path / "split", tmp_path / "teacher", *gan, "train.max_steps=2")
    run_distill(tmp_path / "split", tmp_path / "teacher", *gan, resume="latest")
    straight, split = weights(tmp_path / "straight" / "model"), weights(tmp_path / "split" / "model")
    assert straight.keys() == split.keys()
    assert all(torch.equal(straight[k], split[k]) for k in straight)
    checkpoints = tmp_path / "split" / "checkpoints"
    discriminator = [load_file(str(sorted((tmp_path / run / "checkpoints").iterdir())[-1]
                                   / "discriminator.safetensors")) for run in ("straight", "split")]
    assert all(torch.equal(discriminator[0][k], discriminator[1][k]) for k in discriminator[0])
    assert sorted(p.name for p in checkpoints.iterdir())[-1] == "checkpoint-00000004"


def initial_student(teacher_dir, *overrides):
    """The student a run starts from (the run seeds torch with train.seed before building it)."""
    config = load_config(None, [*FAST, *overrides])
    torch.manual_seed(config.train.seed)
    return build_student(config.distill, Teacher(AutoencoderKL.from_pretrained(teacher_dir)))


def test_decoder_only_distillation_leaves_the_encoder_untouched(tmp_path):
    make_teacher(tmp_path / "teacher")
    run_distill(tmp_path / "run", tmp_path / "teacher", "distill.parts=decoder", "train.max_steps=2")
    trained, start = weights(tmp_path / "run" / "model"), initial_student(tmp_path / "teacher").state_dict()
    encoder = [k for k in start if k.startswith("encoder.")]
    decoder = [k for k in start if k.startswith("decoder.")]
    assert encoder and all(torch.equal(trained[k], start[k]) for k in encoder)
    assert any(not torch.equal(trained[k], start[k]) for k in decoder)
    assert "encoder was NOT trained" in (tmp_path / "run" / "model" / "README.md").read_text()


def test_a_16_channel_shifted_teacher_encoder_only(tmp_path):
    """An SD3/FLUX-style teacher: 16 latent channels, scaling and shift; only the student's encoder trains."""
    make_teacher(tmp_path / "teacher", latent_channels=16, scaling_factor=0.6, shift_factor=0.1)
    teacher = Teacher(AutoencoderKL.from_pretrained(tmp_path / "teacher"))
    images = check_images(SIZE)
    with torch.no_grad():
        expected = (teacher.vae.encode(images).latent_dist.mode() - 0.1) * 0.6
    assert torch.allclose(teacher.scaled_latents(images), expected)
    summary = run_distill(tmp_path / "run", tmp_path / "teacher", "distill.parts=encoder", "train.max_steps=30",
                          "train.val_every=30")
    assert summary.val_metrics["encoder_relative_error"] < 0.75 * summary.initial_val_metrics["encoder_relative_error"]
    trained = weights(tmp_path / "run" / "model")
    start = initial_student(tmp_path / "teacher").state_dict()
    student = AutoencoderTiny.from_pretrained(tmp_path / "run" / "model")
    with torch.no_grad():
        assert student.encode(images).latents.shape == expected.shape  # the teacher's 16 channels, its grid
    assert all(torch.equal(trained[k], start[k]) for k in start if k.startswith("decoder."))
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "(z − 0.1) · 0.6" in card and "decoder was NOT trained" in card


def test_cli_help_and_one_line_errors(tmp_path, capsys, monkeypatch):
    from test_run_start import offline_lpips

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = capsys.readouterr().out
    assert "--teacher" in text and "distill.parts" in text and "pipe.vae = AutoencoderTiny" in text
    torch.manual_seed(0)
    PRESETS["tiny-vq"].cls(**PRESETS["tiny-vq"].kwargs).save_pretrained(tmp_path / "vq")
    make_teacher(tmp_path / "teacher")
    teacher = str(tmp_path / "teacher")
    cases = [
        ([], [], "no teacher: give --teacher"),
        (["--teacher", str(tmp_path / "missing")], [], "missing"),
        (["--teacher", str(tmp_path / "vq")], [], "needs an AutoencoderKL teacher"),
        (["--teacher", teacher], ["distill.parts=all"], "distill.parts='all' is not valid"),
        (["--teacher", teacher], ["distill.student=taesd-tiny"], "did you mean"),
        (["--teacher", teacher], ["distill.student_config.decoder_block_out_channels=[64,32,32,32]"],
         "one width for all levels"),
        (["--teacher", teacher], ["distill.student_config.scaling_factor=0.18"], "cannot be set"),
    ]
    for flags, overrides, message in cases:
        code = main(["distill", "--output-dir", str(tmp_path / "run"), "--overwrite", *flags, *FAST, *overrides])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()  # a refused start leaves no run folder behind
    # refused after the run folder is claimed (no LPIPS weights): the start takes the folder back
    offline_lpips(monkeypatch, tmp_path)
    code = main(["distill", "--output-dir", str(tmp_path / "run"), "--teacher", teacher, *FAST,
                 "reconstruction.perceptual_weight=1.0"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(errors) == 1 and "reconstruction.perceptual_weights=" in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


SPY = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_distill import FAST
from latent_vae.config import load_config
from latent_vae.distill.loop import distill

records = []

class Spy(torch.optim.Adam):
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        records.append([p.grad.clone() if p.grad is not None else None for p in params])
        return super().step(closure)

torch.optim.Adam = Spy
out, batch, teacher = sys.argv[1:4]
distill(load_config(None, [*FAST, f"train.batch_size={{batch}}", f"distill.teacher={{teacher}}", *sys.argv[4:]]), out)
torch.save(records, os.path.join(out, f"records-{{os.environ.get('RANK', '0')}}.pt"))
"""


@pytest.mark.multiprocess
def test_two_processes_compute_the_gradients_of_one_with_the_combined_batch(tmp_path):
    make_teacher(tmp_path / "teacher")
    script = tmp_path / "spy_distill.py"
    script.write_text(SPY.format(tests=str(Path(__file__).parent)))
    overrides = ["train.max_steps=1", "gan.weight=0.5", "gan.start=0", "gan.channels=8", "gan.layers=2",
                 "distill.teacher_latents=sample", "distill.teacher_decode_weight=0.5", "data.val_images=0"]
    records = {}
    for nproc, batch in ((1, 4), (2, 2)):
        out = tmp_path / f"run{nproc}"
        command = [str(script), str(out), str(batch), str(tmp_path / "teacher"), *overrides]
        if nproc > 1:
            command = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *command]
        result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        records[nproc] = torch.load(out / "records-0.pt")
    # student and discriminator updates: the all-reduced gradients are the 4-image batch's
    for single, multi in zip(records[1], records[2]):
        scale = max(g.abs().max().item() for g in single if g is not None)
        for g1, g2 in zip(single, multi):
            assert (g1 is None) == (g2 is None)
            assert g1 is None or (g1 - g2).abs().max().item() <= 1e-5 * scale
    assert len(records[1]) == 2
