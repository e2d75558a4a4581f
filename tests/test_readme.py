"""The README's two set-up commands stay true: CI runs the test command verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    parts = text.split("```bash\n")[1:]
    return [p.split("```", 1)[0].strip() for p in parts]


def test_ci_runs_the_readme_test_command():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    test_command = blocks[1]
    assert "pytest" in test_command and "\n" not in test_command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_readme_main_command_uses_the_bundled_default():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    assert "smollm2-135m-instruct" in blocks[0] and blocks[0].startswith("pip install .")
