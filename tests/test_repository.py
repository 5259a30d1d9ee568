"""The README starts with the quickstart and the test command, which is exactly what CI runs; and the science package never imports Ray or MLflow."""
import re
import subprocess
import sys

from conftest import REPO


def test_readme_starts_with_the_quickstart_and_the_test_command_ci_runs():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.+?)\n```", readme, re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    quickstart, tests = first_block
    assert quickstart.endswith("pgseg quickstart") and "pip install -e" in quickstart
    ci_lines = [l for l in (REPO / ".ci/run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd ", "export "))]
    assert ci_lines == [tests]
    assert "pytest" in tests


def test_readme_figures_are_the_results_files():
    """Every generated block of the README is what its results file gives (and a changed figure would show)."""
    from benchmarks.readme import render

    readme = (REPO / "README.md").read_text()
    assert "<!-- generated: device_check -->" in readme
    assert render(readme) == readme
    emptied = re.sub(r"(<!-- generated: device_check -->\n).*?(<!-- end: device_check -->)", r"\1\2", readme, flags=re.S)
    assert emptied != readme and render(emptied) == readme


def test_pgseg_imports_without_ray_or_mlflow():
    code = ("import sys, pgseg, pgseg.model, pgseg.checkpoint, pgseg.losses, pgseg.text, pgseg.distributed; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'pipelines', 'jobs')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pgseg_command_help():
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("convert", "run", "quickstart", "eval", "segment"))
