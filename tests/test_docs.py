"""The README documents every flag of both scripts, and the CI script runs the README's test command."""
import re

import distill
import train_teacher
from conftest import REPO


def option_strings(parser):
    return {s for action in parser._actions for s in action.option_strings if s.startswith("--") and s != "--help"}


def test_readme_lists_every_flag(monkeypatch):
    readme = (REPO / "README.md").read_text()
    flags = set()
    for module in (train_teacher, distill):
        parser = None

        def capture(self, argv=None, namespace=None):
            nonlocal parser
            parser = self
            raise SystemExit(0)
        monkeypatch.setattr("argparse.ArgumentParser.parse_args", capture)
        try:
            module.parse_args([])
        except SystemExit:
            pass
        flags |= option_strings(parser)
    missing = sorted(f for f in flags if f"`{f}" not in readme and f"{f}/" not in readme and f"/{f}" not in readme)
    assert not missing, f"README.md does not document {missing}"


def test_ci_runs_readme_commands():
    readme = (REPO / "README.md").read_text()
    setup = re.search(r"## Set up.*?```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    install, test = (line.split("#")[0].strip() for line in setup[:2])
    ci = (REPO / ".ci" / "run").read_text()
    assert install.replace("pip install", "") in ci and "pip install" in ci
    assert any(line.strip() == test for line in ci.splitlines())
