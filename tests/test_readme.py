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


def _toy_run(args, threads, tmp, name):
    """A short --toy run of a script with OMP_NUM_THREADS=threads -> its stdout lines with numbers (times dropped)."""
    import subprocess
    import sys
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, *args, f"--out_dir={tmp}/{name}_{threads}"], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    return [re.sub(r"[\d.]+s\b|[\d.]+ \w+/s", "", l) for l in out.splitlines() if re.search(r"\d\.\d{3}", l)]


def test_toy_figures_do_not_depend_on_the_thread_count(tmp_path):
    """The README's toy numbers hold on any core count: under --toy each script pins torch's intra-op threads, so a
    run with OMP_NUM_THREADS=1 and one with 2 print the same losses, accuracies and rewards, digit for digit."""
    from data import make_toy
    toy = tmp_path / "toy"
    make_toy(str(toy), n_train=8, n_val=3, n_rl=2, n_rl_test=2, n_editor=4)
    rm = ["rewardmodel.py", "--toy", f"--train={toy}/pairs_train.jsonl", f"--val={toy}/pairs_val.jsonl",
          "--max_steps=4", "--log_interval=1", "--eval_interval=4", "--batch_size=4", "--micro_batch=4"]
    grpo = ["grpo.py", "--toy", f"--train_prompts={toy}/rl_train.jsonl", f"--test_prompts={toy}/rl_test.jsonl",
            f"--sft_data={toy}/editor_train.jsonl", "--sft_steps=4", "--steps=2", "--eval_every=2", "--eval_prompts=2",
            "--prompts_per_step=2", "--group_size=2"]
    for args, name in ((rm, "rm"), (grpo, "grpo")):
        one, two = _toy_run(args, 1, tmp_path, name), _toy_run(args, 2, tmp_path, name)
        assert one and one == two, (name, one, two)
