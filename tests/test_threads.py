"""CPU threads: on a busy machine the OpenMP wait policy is set before torch loads; --threads / `threads` reach torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hesscli.config import resolve
from hesscli.errors import InputError
from hesscli.threads import WAIT_POLICY, prepare_environment

REPO = Path(__file__).resolve().parents[1]

# A fresh interpreter: record the wait policy in the environment at the moment torch is first
# imported, then run three commands in this process and read the thread count torch ends up with.
CHILD = r"""
import builtins, json, os, sys
seen = {}
_import = builtins.__import__
def spy(name, *args, **kwargs):
    if name.split(".")[0] == "torch" and "torch" not in sys.modules and "policy" not in seen:
        seen["policy"] = os.environ.get("OMP_WAIT_POLICY")
    return _import(name, *args, **kwargs)
builtins.__import__ = spy
import hesscli.threads
hesscli.threads.others_runnable = lambda: 99  # a busy machine, whatever the load of the test machine
from hesscli.cli import main
import torch  # the CLI loads torch lazily: the spy stays until torch is loaded
builtins.__import__ = _import
seen["default"] = torch.get_num_threads()
base = [sys.argv[1], "trace", sys.argv[2], "--model", sys.argv[3], "--data", sys.argv[4], "--probes", "3", "--json"]
for label, extra in (("flag", ["--threads", "1"]), ("config", ["--config", sys.argv[5]]),
                     ("flag_over_config", ["--config", sys.argv[5], "--threads", "2"])):
    try:
        main(base[1:] + ["--out", os.path.join(sys.argv[1], label)] + extra)
    except SystemExit as e:
        seen[label + "_exit"] = e.code
    seen[label] = torch.get_num_threads()
print("RESULT " + json.dumps(seen))
"""


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_cli_sets_the_wait_policy_before_torch_loads_and_applies_threads(tiny):
    config = tiny.folder / "threads.toml"
    config.write_text("threads = 3\n")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tiny.folder), str(tiny.ckpt), tiny.spec, tiny.data,
                           str(config)], cwd=tiny.folder, env=_child_env(), capture_output=True, text=True,
                          timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-2000:]
    seen = json.loads(line[len("RESULT "):])
    assert seen["policy"] == WAIT_POLICY  # in the environment when torch (and libgomp) loaded
    assert seen["flag_exit"] == seen["config_exit"] == seen["flag_over_config_exit"] == 0
    assert seen["flag"] == 1
    assert seen["config"] == 3  # `threads = 3` in the config file
    assert seen["flag_over_config"] == 2  # the flag wins over the file


def test_passive_waiting_only_when_the_machine_is_oversubscribed():
    two = {"OMP_NUM_THREADS": "2"}
    for others, cpus, expected in ((0, 2, None), (1, 2, WAIT_POLICY), (3, 2, WAIT_POLICY), (3, 8, None),
                                   (6, 8, None), (7, 8, WAIT_POLICY), (None, 2, None)):
        env = dict(two)
        prepare_environment(env, others=others, cpus=cpus)
        assert env.get("OMP_WAIT_POLICY") == expected, (others, cpus)
        assert env["OMP_NUM_THREADS"] == "2"


def test_a_wait_policy_the_user_chose_is_kept():
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"}):  # libgomp's own spin setting too
        env = dict(chosen)
        assert "environment" in prepare_environment(env, others=10, cpus=2)
        assert env == chosen


def test_threads_setting_is_validated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve({}).threads is None
    assert resolve({"threads": 4}).threads == 4
    with pytest.raises(InputError, match="--threads must be at least 1"):
        resolve({"threads": 0})
    (tmp_path / "hesscli.toml").write_text('threads = "many"\n')
    with pytest.raises(InputError, match="threads must be an integer"):
        resolve({})


def test_python_api_refuses_threads_instead_of_ignoring_it():
    import torch

    import hesscli

    X, y = torch.randn(8, 3), torch.randn(8, 1)
    with pytest.raises(InputError, match="torch.set_num_threads"):
        hesscli.trace(torch.nn.Linear(3, 1), "mse", (X, y), threads=2)
