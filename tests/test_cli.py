import json
import re
import subprocess
import sys

from jobs.cli import JOBS, build_parser, main

from .conftest import ROOT


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
