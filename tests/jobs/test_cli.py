import argparse
import json
import re
import subprocess
import sys

import pytest

from jobs.cli import JOBS, build_parser, main

from ..conftest import ROOT


def test_help_lists_every_job(capsys):
    parser = build_parser()
    help_text = parser.format_help()
    for name in JOBS:
        assert name in help_text
    assert main([]) == 2


def test_info_prints_versions_and_device(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["torch"].startswith("2.")
    assert info["packages"]["zarr"].startswith("3.")
    assert any(d.startswith("cpu") for d in info["devices"])


@pytest.mark.slow
def test_every_job_runs_as_a_module_with_the_same_flags():
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name, module in JOBS.items():
        out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert f"python -m {module}" in out.stdout
        as_module = set(re.findall(r"--[a-z][\w-]*", out.stdout)) - {"--verbose"}
        as_subcommand = set(re.findall(r"--[a-z][\w-]*", subcommands[name].format_help()))
        assert as_module == as_subcommand, f"{module}: {sorted(as_module ^ as_subcommand)}"


def test_a_flag_destination_that_names_no_config_field_fails_loudly():
    from jobs.flags import config_from_args
    from pipeline.stage2.train import TrainConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--stores", nargs="+")
    parser.add_argument("--output")
    parser.add_argument("--bach-size", type=int, default=8)  # misspelt: its value would be dropped silently
    args = parser.parse_args(["--stores", "a", "--output", "b"])
    with pytest.raises(TypeError, match="TrainConfig has no field for the flag destination.*bach_size"):
        config_from_args(TrainConfig, args)
    args = argparse.Namespace(stores=["a"], output="b", batch_size=8, verbose=0)
    assert config_from_args(TrainConfig, args).batch_size == 8


def test_every_config_job_builds_its_config_from_its_own_flags():
    from jobs import apply_denoiser, denoise, distill, train_denoiser
    from jobs.flags import config_from_args, image_job_config
    from pipeline.stage2.apply import ApplyConfig
    from pipeline.denoise.job import DenoiseConfig
    from pipeline.stage3.distill import DistillConfig
    from pipeline.stage2.train import TrainConfig

    cases = [(denoise, DenoiseConfig, [], image_job_config), (apply_denoiser, ApplyConfig, ["--denoiser", "d"],
             image_job_config), (train_denoiser, TrainConfig, ["--stores", "s"], config_from_args),
             (distill, DistillConfig, ["--denoiser", "d"], config_from_args)]
    for module, config_class, required, build in cases:
        parser = build_parser()
        args = parser.parse_args([next(k for k, v in JOBS.items() if v == module.__name__), *required])
        assert isinstance(build(config_class, args), config_class)


def test_decode_placement_flags_reach_the_config_and_the_denoiser_method():
    from jobs.flags import image_job_config
    from pipeline.denoise.job import DenoiseConfig

    parser = build_parser()
    args = parser.parse_args(["denoise", "--images", "i", "--output", "o", "--decode-threads", "3", "--fast-decode"])
    config = image_job_config(DenoiseConfig, args)
    assert (config.decode_threads, config.decode_tasks, config.fast_decode) == (3, None, True)
    applied = image_job_config(DenoiseConfig, parser.parse_args(
        ["denoise", "--images", "i", "--output", "o", "--decode-tasks", "2", "--decode-cpus", "0.5"])).apply_config()
    assert (applied.decode_tasks, applied.decode_cpus, applied.decode_threads) == (2, 0.5, None)
