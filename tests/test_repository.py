"""The README's test command is exactly what CI runs, and the science package never imports Ray or MLflow."""
import re
import subprocess
import sys

from conftest import REPO


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.+?)\n```", readme, re.S).group(1).strip()
    ci_lines = [l for l in (REPO / ".ci/run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd ", "export "))]
    assert ci_lines == [first_block]
    assert "pytest" in first_block


def test_pgseg_imports_without_ray_or_mlflow():
    code = ("import sys, pgseg, pgseg.model, pgseg.checkpoint, pgseg.losses, pgseg.text, pgseg.distributed; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'pipelines', 'jobs')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pgseg_command_help():
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0 and "convert" in proc.stdout
