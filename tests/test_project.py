"""The project's promises about itself: CI runs README's test command; no torch at run time."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    return re.findall(r"```bash\n(python3 -m venv .*?)\n```", (ROOT / "README.md").read_text())


def extras(command):
    return re.findall(r'pip install -e "\.\[(\w+)\]"', command)


def test_ci_runs_readme_test_command_verbatim():
    commands = readme_commands()
    assert len(commands) == 3, commands
    main_job, test_job, torch_free_job = commands
    assert "npmnv3 predict" in main_job
    assert test_job.endswith("python -m pytest -q") and extras(test_job) == ["dev"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_job in ci


def test_readme_torch_free_test_command_installs_no_torch():
    torch_free_job = readme_commands()[2]
    assert torch_free_job.endswith("python -m pytest -q") and extras(torch_free_job) == ["test"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    test_extra = " ".join(project["optional-dependencies"]["test"]).lower()
    assert "pytest" in test_extra and "torch" not in test_extra


def test_runtime_dependencies_are_numpy_pillow_and_threadpoolctl():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = sorted(re.split(r"[<>=!~ ]", d)[0].lower() for d in project["dependencies"])
    assert names == ["numpy", "pillow", "threadpoolctl"]
    dev = " ".join(project["optional-dependencies"]["dev"])
    assert "torch" in dev and "torchvision" in dev


def test_package_runs_with_torch_unimportable(tmp_path):
    """Build, run, save, load and predict with torch and torchvision made unimportable."""
    script = f"""
import sys
sys.modules["torch"] = None
sys.modules["torchvision"] = None
import numpy as np, npmnv3
m = npmnv3.mobilenet_v3_small(seed=1)
m.save({str(tmp_path / "m.npz")!r})
m2 = npmnv3.mobilenet_v3_small(weights={str(tmp_path / "m.npz")!r})
x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
assert np.array_equal(m(x), m2(x))
print(npmnv3.predict(np.zeros((40, 50, 3), np.uint8), model=m2, topk=1)[0]["label"])
print(sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "torchvision") and sys.modules[k] is not None))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "[]"
