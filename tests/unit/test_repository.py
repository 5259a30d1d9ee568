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
    assert ci_lines == ["command -v chromedriver >/dev/null || .ci/browser", tests]  # the browser tests' Chromium
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


JOB_COMMANDS = {"jobs.train": "train", "jobs.run": "run", "jobs.sweep": "sweep", "jobs.data": "data",
                "jobs.evaluate": "eval", "jobs.segment": "segment", "jobs.convert": "convert"}


def _readme_commands() -> list[tuple[list[str], str]]:
    """Every command line of the README's shell blocks (continuations joined): (words, its trailing comment)."""
    import shlex

    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append((words, line.rpartition(" # ")[2] if " # " in line else ""))
    return lines


def test_every_readme_command_names_options_and_files_that_exist(capsys):
    from jobs.cli import build_parser, main

    parser, checked = build_parser(), 0
    for words, comment in _readme_commands():
        args = None
        if words[0] == ".venv/bin/pgseg":
            args = words[1:]
        elif "-m" in words and words[words.index("-m") + 1] in JOB_COMMANDS:
            i = words.index("-m")
            args = [JOB_COMMANDS[words[i + 1]], *words[i + 2:]]
        elif "-m" in words and words[words.index("-m") + 1].startswith("benchmarks."):
            module = words[words.index("-m") + 1]
            assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
            checked += 1
            continue
        if args is None:
            continue
        try:
            parser.parse_args(args)
        except SystemExit:
            raise AssertionError(f"README: {' '.join(words)}: {capsys.readouterr().err}") from None
        for word in args:
            if word.startswith("configs/"):
                assert (REPO / word).is_file(), f"README: {' '.join(words)}: {word} is not in the repository"
        if args[0] == "config":  # quick to run: what the README says it prints
            code = main(args)
            expected = comment.split("error: ", 1)[1] if "error: " in comment else None
            err = capsys.readouterr().err
            assert (code == 2 and expected in err) if expected else code == 0, (args, err)
        checked += 1
    assert checked >= 20, checked  # the README's commands were found
