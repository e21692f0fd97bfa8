"""The package as users get it: the wheel installed outside the checkout, and the cluster image.

CI builds the wheel, installs it with its CPU extras into a fresh virtual environment and runs
train, export and predict from an empty folder; launch/Containerfile must install the same
wheel the same way, with the ``cuda`` extra instead (no container runtime runs here).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT

CPU_EXTRAS = ("deploy",)  # onnx, openvino, onnxruntime: export writes model.onnx, predict runs it
GPU_EXTRAS = ("cuda",)
# What a clean clone holds: the build must not see local environments, caches or old builds.
NOT_SOURCE = (".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "runs", ".*_cache")


def wheel_name() -> str:
  """The file name ``pip wheel`` gives this project's wheel at pyproject's version."""
  version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
  return f"resfuse_jax-{version.group(1)}-py3-none-any.whl"


def pip_install(python: str, wheel: str, extras: tuple[str, ...]) -> list[str]:
  """The one line that installs the wheel: CI's (CPU extras) and launch/Containerfile's (cuda)."""
  return [python, "-m", "pip", "install", f"{wheel}[{','.join(extras)}]"]


def parts(command: list[str]) -> tuple[list[str], str, set[str]]:
  """An install line -> (its words, the wheel's folder and interpreter left out), file, extras."""
  *words, target = command
  match = re.fullmatch(r"(.+\.whl)\[([\w,]+)\]", target)
  assert match, f"the last argument installs no wheel with extras: {target}"
  return [Path(words[0]).name, *words[1:]], Path(match[1]).name, set(match[2].split(","))


def containerfile_lines() -> list[str]:
  """launch/Containerfile's instructions, continuation lines joined, comments dropped."""
  text = (ROOT / "launch" / "Containerfile").read_text()
  text = re.sub(r"\\\n\s*", " ", re.sub(r"(?m)^\s*#.*\n", "", text))
  return [line.strip() for line in text.splitlines() if line.strip()]


def test_the_containerfile_installs_the_ci_wheel_with_the_cuda_extra_and_nothing_else():
  lines = containerfile_lines()
  (base,) = [line.split()[1] for line in lines if line.startswith("FROM ")]
  assert re.fullmatch(r"nvcr\.io/nvidia/jax:\d\d\.\d\d-py3", base)  # a dated NGC tag
  (install,) = [shlex.split(line[4:]) for line in lines if line.startswith("RUN ")]
  words, wheel, extras = parts(install)
  ci_words, ci_wheel, ci_extras = parts(pip_install("python", f"dist/{wheel_name()}", CPU_EXTRAS))
  assert (words, wheel) == (ci_words, ci_wheel)
  assert (extras, ci_extras) == (set(GPU_EXTRAS), set(CPU_EXTRAS))
  (copy,) = [line.split()[1:] for line in lines if line.startswith("COPY ")]
  assert copy[0] == f"dist/{wheel_name()}"  # the file pip wheel writes to dist/
  assert install[-1].startswith(copy[1] + wheel_name())  # and the one installed


def test_the_jobset_and_the_readme_name_the_image_the_containerfile_builds():
  header = (ROOT / "launch" / "Containerfile").read_text()
  (tag,) = re.findall(r"docker build -f launch/Containerfile -t (\S+) \.", header)
  assert tag.endswith(":" + wheel_name().split("-")[1])  # the image carries the wheel's version
  spec = yaml.safe_load((ROOT / "launch" / "k8s-jobset.yaml").read_text())
  pod = spec["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
  assert pod["containers"][0]["image"] == tag
  assert f"-t {tag}" in (ROOT / "README.md").read_text()


def run(command, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
  proc = subprocess.run(
    [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
  )
  assert proc.returncode == 0, f"{command} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
  return proc


def build_and_install_the_wheel(tmp_path: Path) -> Path:
  """The wheel of a copy of the checkout, installed in a fresh venv: that venv's python."""
  source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside its files
  shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
  run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", source],
      cwd=tmp_path)  # fmt: skip
  (wheel,) = (tmp_path / "dist").glob("*.whl")
  assert wheel.name == wheel_name()  # the file launch/Containerfile copies
  run([sys.executable, "-m", "venv", tmp_path / "venv"], cwd=tmp_path)
  python = tmp_path / "venv" / "bin" / "python"
  run(pip_install(str(python), str(wheel), CPU_EXTRAS), cwd=tmp_path, timeout=1200)
  return python


def test_the_installed_wheel_trains_exports_and_predicts_from_an_empty_folder(tmp_path):
  python = build_and_install_the_wheel(tmp_path)
  here, cache = tmp_path / "empty", tmp_path / "cache"
  here.mkdir()
  # Nothing of the checkout on the path; the phantom, the preprocessed cache and any home-folder
  # files inside tmp_path (the XLA cache is the session's temporary one, conftest.py).
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env |= {
    "RESFUSE_CACHE": str(cache), "HOME": str(tmp_path / "home"), "JAX_PLATFORMS": "cpu",
    "XDG_CACHE_HOME": str(tmp_path / "home" / ".cache"), "MPLCONFIGDIR": str(tmp_path / "mpl"),
  }  # fmt: skip
  where = run([python, "-c", "import resfuse_jax; print(resfuse_jax.__file__)"], here, env)
  assert Path(where.stdout.strip()).is_relative_to(tmp_path / "venv")  # not the checkout

  train = run([python, "-m", "resfuse_jax.main", "--config=phantom:resfuse,smoke", "--workdir=W"],
              here, env)  # fmt: skip
  assert "Validation Dice over 2 cases (resfuse, step 4)" in train.stdout
  export = run([python, "-m", "resfuse_jax.export", "--workdir=W", "--output=E"], here, env)
  assert export.stdout.strip() == "exported W to E with model.onnx"
  (cases,) = cache.glob("phantom-*")  # the phantom the run wrote, in the BraTS layout
  predict = run([python, "-m", "resfuse_jax.predict", "--model=E", f"--input={cases}",
                 "--output=OUT"], here, env)  # fmt: skip
  names = sorted(f"{case.name}.nii.gz" for case in cases.iterdir() if case.is_dir())
  assert f"wrote {len(names)} label maps to OUT (checkpoint step 4, openvino)" in predict.stdout
  assert sorted(p.name for p in (here / "OUT").iterdir()) == names
  assert sorted(p.name for p in here.iterdir()) == ["E", "OUT", "W"]  # nothing else written
