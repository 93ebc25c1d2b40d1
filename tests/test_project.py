"""The project's promises about itself: CI runs README's test command; no torch at run time."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    return re.findall(r"```bash\n(python3 -m venv .*?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_readme_test_command_verbatim():
    commands = readme_commands()
    assert len(commands) == 2, commands
    main_job, test_job = commands
    assert "pytest" in test_job and "npmnv3 predict" in main_job
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_job in ci


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
