"""A job started on its own starts a local Ray, without the dashboard unless asked for."""

import json
import os
import subprocess
import sys

import pytest

from ..conftest import ROOT

SCRIPT = """
import json, sys
import ray
from pipeline.runtime.ray_session import init_ray
context = init_ray(dashboard=sys.argv[1] == "on")
again = init_ray(dashboard=True)
print(json.dumps({"dashboard": context.dashboard_url or "", "again": again is None,
                  "cpus": ray.cluster_resources()["CPU"]}))
ray.shutdown()
"""


@pytest.mark.parametrize("dashboard", ["off", "on"])
def test_a_local_ray_starts_the_dashboard_only_when_asked(dashboard):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, dashboard], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert bool(result["dashboard"]) == (dashboard == "on"), result
    assert result["again"] and result["cpus"] >= 1  # a second call leaves the running Ray alone
