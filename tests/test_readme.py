"""README.md is the truth: every command it shows names a script that exists and only flags that script's
parser defines, and every local link points at a file in the repository."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def defined_flags(script):
    """The flags a script defines: argparse add_argument calls, or rewardmodel.py's short alias arg()."""
    return set(re.findall(r'(?:add_argument|\barg)\(\s*"(--\w+)"', open(os.path.join(ROOT, script)).read()))


def readme_commands():
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                m = re.search(r"(\w+\.py)\b(.*)", part.split("#")[0])
                if m and m[1] != "pytest.py":
                    yield m[1], set(re.findall(r"(?<![\w-])(--\w+)", m[2]))


def test_readme_commands_use_only_defined_flags():
    commands = list(readme_commands())
    assert len(commands) >= 20 and {s for s, _ in commands} == {"data.py", "rewardmodel.py", "bench.py", "grpo.py"}
    undefined = [(s, sorted(used - defined_flags(s))) for s, used in commands if used - defined_flags(s)]
    assert not undefined, f"README commands use flags their script does not define: {undefined}"


def test_readme_local_links_exist():
    links = re.findall(r"\]\(((?!https?:)[^)#]+)\)", README)
    assert links and all(os.path.exists(os.path.join(ROOT, p)) for p in links), links
