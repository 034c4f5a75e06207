"""Every shell block of README.md and docs/*.md runs as written on a fresh checkout with the tiny offline model,
or says on its first line what it needs (`# needs: hub|gpu|cluster|server`); every relative link resolves; what
the blocks write is ignored by git.

How a page's blocks run, cheaply: in one bash per page, in a folder that stands for a fresh checkout (a link to
each of the repository's top-level entries) holding what earlier steps of the docs would have made: the tiny model
(`python -m softbio_hf.tiny tiny`), a tiny checkpoint at `runs/lora/best`, the three benchmarks prepared at 32 px
under `data/` (left out for a page that prepares them itself), and raw benchmark folders
(tests/datasets_fixtures.py) for `train.data prepare`. The big CLIP's name
is replaced by the tiny one. The test's own environment stands for the installed one: `python`, `python3`,
`.venv/bin/python` run it; `pip install` and `python -m venv` install nothing but check that what they name
exists (a requirements file, an extra of pyproject.toml, an installed package); `python -m pytest` is the suite
itself, so it is checked to be .ci/run's command rather than run again.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from doc_pages import FENCE, NEEDS, REPO, SHELL_LANGUAGES, Block, blocks, pages

BIG_CLIP = "openai/clip-vit-large-patch14-336"
# The template's folders that stand for what the docs' earlier commands write (the raw benchmarks are the
# reader's downloads, .stubs and .venv the test's environment).
WRITTEN_BEFORE = ("tiny", "runs", "data")
SECONDS_PER_BLOCK = 600  # generous: only a hang should reach it
# What a page's blocks print that says they did what the page claims (beyond exit status 0): patterns.
EXPECTED_OUTPUT = {"docs/evaluation.md": (r"\| zs \|", r"\| lora \|", r"\([+-]")}  # compare's rows and differences

# `python`: the test's interpreter, except for the two commands that would install or run the suite.
PYTHON_STUB = """#!{python}
import os, sys
args = sys.argv[1:]
if args[:2] == ["-m", "venv"]:
    sys.exit(0)  # the test's environment is the installed one
if args[:2] == ["-m", "pytest"]:
    if args[2:] != {pytest_args!r}:
        sys.exit(f"the docs' test command `python -m pytest {{' '.join(args[2:])}}` is not .ci/run's")
    sys.exit(0)  # the suite itself, already running
os.execv({python!r}, [{python!r}, *args])
"""

# `pip`: installs nothing; what it names must exist.
PIP_STUB = """#!{python}
import re, sys, tomllib
from importlib import metadata
args = sys.argv[1:]
if not args or args[0] != "install":
    sys.exit(f"pip stub: only `pip install` is documented, not {{args}}")
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
skip = False
for i, arg in enumerate(args[1:], start=1):
    if skip:
        skip = False
        continue
    if arg in ("-r", "--requirement"):
        open(args[i + 1]).close()  # the requirements file exists
        skip = True
    elif arg in ("--index-url", "--extra-index-url"):
        skip = True
    elif arg.startswith("-"):
        continue  # -e, -q, --no-deps, ...
    elif arg.startswith(".") or arg.startswith("softbio"):
        named = re.search(r"\\[(.*)\\]", arg)
        missing = [e for e in (named.group(1).split(",") if named else []) if e.strip() not in extras]
        if missing:
            sys.exit(f"pip stub: pyproject.toml has no extra {{missing}}")
    else:
        metadata.version(re.split(r"[<>=!\\[ ]", arg)[0])  # a package the environment has
"""


def ci_test_command() -> list[str]:
    """The arguments of `python -m pytest` on .ci/run's last line."""
    last = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    found = re.search(r"python -m pytest(.*)$", last)
    assert found, f".ci/run's last line is not the test command: {last}"
    return found.group(1).split()


def write_stub(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture(scope="module")
def checkout_template(tmp_path_factory) -> Path:
    """A folder standing for a fresh checkout after the docs' earlier steps (see the module's docstring)."""
    from datasets_fixtures import make_fairface, make_folder, make_rafdb, make_utkface, make_vggface2

    from softbio_hf.tiny import make_tiny_models
    from train.data import prepare

    root = tmp_path_factory.mktemp("checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for entry in sorted({line.split("/", 1)[0] for line in tracked.splitlines()}):
        (root / entry).symlink_to(REPO / entry)
    make_tiny_models(root / "tiny")
    shutil.copytree(root / "tiny" / "softbio", root / "runs" / "lora" / "best")
    raw = tmp_path_factory.mktemp("raw")
    for name, make in (("utkface", make_utkface), ("fairface", make_fairface), ("rafdb", make_rafdb)):
        make(raw / name)
        prepare(name, raw / name, root / "data" / name, image_size=32)
    make_utkface(root / "UTKFace")
    make_fairface(root / "fairface")
    make_rafdb(root / "RAF-DB" / "basic")
    shutil.move(make_vggface2(root / "VGGFace2"), root / "ages.csv")
    make_folder(root / "my_faces")
    python = sys.executable
    stubs = {
        "python": PYTHON_STUB.format(python=python, pytest_args=ci_test_command()),
        "pip": PIP_STUB.format(python=python),
    }
    for folder in (root / ".stubs", root / ".venv" / "bin"):
        for name, text in stubs.items():
            write_stub(folder / name, text)
        (folder / "python3").symlink_to("python")
    return root


def run_page(template: Path, workspace: Path, page_blocks: list[Block]) -> subprocess.CompletedProcess:
    """The page's runnable blocks in one bash, in a copy of the template; each block announced on stderr."""
    shutil.copytree(template, workspace, symlinks=True)
    for block in page_blocks:  # a page that prepares a benchmark starts without it, as its reader does
        for prepared in re.findall(r"train\.data prepare .*?--out (\S+)", block.text):
            shutil.rmtree(workspace / prepared, ignore_errors=True)
    script = ["set -eo pipefail"]
    for block in page_blocks:
        script += [f"echo '@@ block {block.where}' >&2", block.text.replace(BIG_CLIP, str(workspace / "tiny" / "clip"))]
    env = {
        **os.environ,
        "PATH": f"{workspace / '.stubs'}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(workspace.parent / "hf-home"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYTHONPATH", None)  # the checkout's own folders import from the working directory, as a reader's do
    process = subprocess.Popen(
        ["bash", "-c", "\n".join(script)],
        cwd=workspace,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a block's background process (a server) ends with the page
    )
    try:
        stdout, stderr = process.communicate(timeout=SECONDS_PER_BLOCK * len(page_blocks))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += f"\n(timed out after {SECONDS_PER_BLOCK} s a block)"
    finally:
        with contextlib.suppress(ProcessLookupError):  # none of the page's processes is left: nothing to end
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def shell_pages() -> list[Path]:
    return [page for page in pages() if blocks(page, SHELL_LANGUAGES)]


@pytest.mark.parametrize("page", shell_pages(), ids=lambda page: str(page.relative_to(REPO)))
def test_the_shell_blocks_run_as_written(page, checkout_template, tmp_path):
    page_blocks = blocks(page, SHELL_LANGUAGES)
    for block in page_blocks:
        assert block.needs is None or block.needs in NEEDS, (
            f"{block.where}: `# needs: {block.needs}` is not one of {', '.join(NEEDS)}"
        )
    runnable = [block for block in page_blocks if block.needs is None]
    if not runnable:
        return  # every block needs what a test does not have; their markers are checked above
    workspace = tmp_path / "checkout"
    done = run_page(checkout_template, workspace, runnable)
    announced = re.findall(r"^@@ block (\S+)$", done.stderr, flags=re.MULTILINE)
    failing = announced[-1] if announced else "before the first block"
    assert done.returncode == 0, f"{failing} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    for expected in EXPECTED_OUTPUT.get(str(page.relative_to(REPO)), ()):
        assert re.search(expected, done.stdout), (expected, done.stdout[-2000:])
    before = {entry.name for entry in checkout_template.iterdir()}
    written = [entry for entry in workspace.iterdir() if entry.name not in before or entry.name in WRITTEN_BEFORE]
    for entry in written:
        name = f"{entry.name}/x" if entry.is_dir() else entry.name
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", name], cwd=REPO)
        assert ignored.returncode == 0, f"{page.name}'s blocks write {entry.name}, which .gitignore does not ignore"


def test_a_failing_block_fails_its_page_and_the_stand_ins_check_what_they_stand_for(checkout_template, tmp_path):
    """The harness is no rubber stamp: a failing command stops the page, named by its block; `pip install` of an
    extra pyproject.toml lacks, or a test command that is not .ci/run's, fails as a real failure would."""
    cases = {
        "echo fine\nfalse\necho never": "",
        'pip install ".[train,no-such-extra]"': "pyproject.toml has no extra",
        "python -m pytest -x": "is not .ci/run's",
    }
    for number, (text, said) in enumerate(cases.items()):
        done = run_page(checkout_template, tmp_path / str(number), [Block("page.md", 7, "bash", text)])
        assert done.returncode != 0 and "@@ block page.md:7" in done.stderr and said in done.stderr, done
        assert "never" not in done.stdout  # nothing after the failing command ran
    done = run_page(
        checkout_template, tmp_path / "ok", [Block("page.md", 1, "bash", 'pip install -r requirements.txt ".[demo]"')]
    )
    assert done.returncode == 0, done.stderr


def test_the_block_markers_are_read_as_the_docs_say():
    """A block is skipped only for a known need on its first line; a typo or a later line is not a marker."""
    fenced = (
        "```bash\n# needs: hub\nhf auth login\n```\n```sh\n# needs: gpus\nx\n```\n```shell\necho\n# needs: gpu\n```\n"
    )
    found = [Block("x.md", 1, match.group(1), match.group(2)) for match in FENCE.finditer(fenced)]
    assert [block.needs for block in found] == ["hub", "gpus", None]
    assert found[0].needs in NEEDS and found[1].needs not in NEEDS


# ------------------------------------------------------------------------------------------------------ links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", page.read_text())
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...: not ours to resolve offline
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target} (no heading #{anchor})")
    return broken


def test_every_relative_link_resolves():
    broken = {str(page.relative_to(REPO)): broken_links(page) for page in pages()}
    assert not {page: links for page, links in broken.items() if links}


def test_the_link_check_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## A section: with punctuation\n")
    page.write_text(
        "[ok](other.md#a-section-with-punctuation) [here](#top) [web](https://example.com)\n"
        "[gone](missing.md) [no anchor](other.md#nowhere)\n```bash\n[in code](not-a-link.md)\n```\n# Top\n"
    )
    assert broken_links(page) == ["missing.md (no such file)", "other.md#nowhere (no heading #nowhere)"]


def readme_sections_kept(readme: str) -> list[str]:
    """README's sections but those that move to their own docs/ page when the branches meet."""
    moving = ("## Serving", "## Speed")  # to docs/serving.md and docs/speed.md
    return [section for section in re.split(r"(?m)^(?=## )", readme) if not section.startswith(moving)]


def test_the_readme_is_a_landing_page():
    """Under 200 lines, not counting the sections whose own docs/ page replaces them when the branches meet."""
    readme = (REPO / "README.md").read_text()
    moving = ("## Serving", "## Speed")  # to docs/serving.md and docs/speed.md
    kept = [section for section in re.split(r"(?m)^(?=## )", readme) if not section.startswith(moving)]
    assert len("".join(kept).splitlines()) < 200
    assert "python -m softbio_hf.tiny" in readme.split("## Run the tests")[0]  # the offline route, named first


def test_the_pages_speak_to_a_reader_not_of_how_they_were_made():
    readme = (REPO / "README.md").read_text()
    texts = {"README.md": "".join(readme_sections_kept(readme))}
    texts |= {str(page.relative_to(REPO)): page.read_text() for page in pages()[1:]}
    for name, text in texts.items():
        said = re.search(r".{0,60}\b(these machines|this session|the issue)\b.{0,60}", text, flags=re.IGNORECASE)
        assert not said, f"{name}: {said.group(0)!r}"
