"""README.md and docs/ cannot rot: every relative link and anchor resolves (GitHub's rules), every
command and script they name exists with the flags they use (read from the parsers), the
README's example commands run offline on the demo's data, and docs/api.md is the public
docstrings, each with its shapes and dtypes."""
import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG_TIMEOUT

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))

# Named in the docs but not ours: the CoOp repository's own script (docs/codebase-repos.md) and
# LLaMP's (docs/llamp.md).
FOREIGN_SCRIPTS = {"scripts/coop/main.sh", "scripts/launch/launch.sh"}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def text_of(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def prose(text: str) -> str:
    """The page without its fenced code blocks and inline code (where a link is not a link)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def code_blocks(text: str, languages=("bash", "sh", "")) -> list:
    return [body for lang, body in FENCE.findall(text) if lang in languages]


def github_anchors(text: str) -> set:
    """The heading ids GitHub gives a Markdown page: the heading's text without its Markdown,
    lower-cased, punctuation dropped, spaces as hyphens; repeats get -1, -2, ..."""
    anchors, seen = set(), {}
    for _, title in HEADING.findall(FENCE.sub("", text)):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)         # a link: its text
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_github_anchor_rules():
    text = "# A `textrefiner-train` run\n## Sweeps: the paper's tables\n## Sweeps: the paper's tables\n"
    assert github_anchors(text) == {"a-textrefiner-train-run", "sweeps-the-papers-tables",
                                    "sweeps-the-papers-tables-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in LINK.findall(prose(text_of(page))):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        relative = os.path.relpath(file, REPO)
        if not file.exists():
            broken.append(f"{target}: no file {relative}")
        elif anchor and anchor not in github_anchors(text_of(file)):
            broken.append(f"{target}: no heading #{anchor} in {relative}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


# ----------------------------------------------------------------------------- commands


def console_scripts() -> dict:
    """{command: "module:function"} from setup.py's entry points."""
    setup = (REPO / "setup.py").read_text()
    return dict(re.findall(r'"(textrefiner-[\w-]+)=([\w.]+:\w+)"', setup))


def option_strings(parser: argparse.ArgumentParser) -> set:
    """Every --flag of a parser and its subcommands."""
    flags = set()
    for action in parser._actions:
        flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= option_strings(sub)
    return flags


def command_flags() -> dict:
    """{command as the docs write it: its flags}, from the parser objects themselves."""
    from textrefiner import configs, export, llamp_cache, predict, results, train
    from textrefiner.explain import cli as explain
    from textrefiner.data import prepare
    from textrefiner.demo import build_parser as demo_parser
    from textrefiner.sweep import cli

    parsers = {"textrefiner-train": train.build_parser(), "textrefiner-data": prepare.build_parser(),
               "textrefiner-results": results.build_parser(), "textrefiner-sweep": cli.build_parser(),
               "textrefiner-predict": predict.build_parser(),
               "textrefiner-export": export.build_parser(),
               "textrefiner-explain": explain.build_parser(),
               "textrefiner-llamp-cache": llamp_cache.build_parser(),
               "textrefiner-configs": configs.build_parser(),
               "textrefiner.train": train.build_parser(), "textrefiner.demo": demo_parser()}
    return {name: option_strings(parser) for name, parser in parsers.items()}


def script_flags(script: Path) -> set:
    """The --flags a script's usage header (its leading comment) documents."""
    header = []
    for line in script.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(line)
    return set(re.findall(r"--[\w-]+", "\n".join(header)))


def command_lines(text: str) -> list:
    """Shell command lines of the page: each line of its bash blocks (continuations joined,
    comments dropped) and each inline code span, split at ;, && and |."""
    lines = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(line.split(" #", 1)[0])
    lines += re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
    return [part.strip() for line in lines for part in re.split(r"&&|;|\|", line)]


def uses(line: str):
    """(what is run, its words after it) for a line running one of ours, else None."""
    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()
    for i, word in enumerate(words):
        if word.startswith("textrefiner-") or re.fullmatch(r"scripts/[\w/.-]+\.sh", word):
            return word, words[i + 1:]
        if word == "-m" and i + 1 < len(words) and words[i + 1].startswith("textrefiner."):
            return words[i + 1], words[i + 2:]
    return None


def test_commands_and_flags_exist():
    known = command_flags()
    entry_points = console_scripts()
    problems = []
    for page in PAGES:
        text = text_of(page)
        for name in set(re.findall(r"(?<![#/\w-])textrefiner-[a-z]+(?:-[a-z]+)*(?![\w-])", text)):
            if name not in entry_points:
                problems.append(f"{page.name}: {name} is not a console script in setup.py")
        for script in set(re.findall(r"\bscripts/[\w/.-]+\.sh\b", text)):
            if not (REPO / script).is_file() and script not in FOREIGN_SCRIPTS:
                problems.append(f"{page.name}: no {script}")
        for line in command_lines(text):
            used = uses(line)
            if used is None or used[0] in FOREIGN_SCRIPTS:
                continue
            command, words = used
            if command.startswith("scripts/"):
                allowed = script_flags(REPO / command) if (REPO / command).is_file() else set()
            elif command in known:
                allowed = known[command]
            else:
                continue  # a command whose name test_commands_exist checks
            for word in words:
                flag = word.split("=", 1)[0]
                if re.fullmatch(r"--[a-z][\w-]*", flag) and flag not in allowed:
                    problems.append(f"{page.name}: {command} has no {flag} ({line})")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_wrong_flag():
    """The flag check is not vacuous: a made-up flag on each command is caught."""
    known = command_flags()
    assert "--refiner" in known["textrefiner-train"] and "--cache-size" in known["textrefiner-train"]
    assert "--no-such-flag" not in known["textrefiner-sweep"]
    assert "--seed" in known["textrefiner.demo"]  # a subcommand's flag
    assert uses("FEATURE_STORE=x bash scripts/base2new.sh CoOp dtd --refiner") == (
        "scripts/base2new.sh", ["CoOp", "dtd", "--refiner"])
    assert "--refiner" in script_flags(REPO / "scripts" / "base2new.sh")
    assert "--no-such-flag" not in script_flags(REPO / "scripts" / "base2new.sh")


# ----------------------------------------------------------------------------- README examples


def readme_examples() -> list:
    """The bash blocks of the README's "Ways in" (the set-up commands install; they run in CI)."""
    text = text_of(REPO / "README.md")
    ways_in = text.split("## Ways in", 1)[1].split("\n## ", 1)[0]
    return code_blocks(ways_in, ("bash",))


@pytest.mark.slow
def test_readme_examples_run_offline_on_the_demo_data(tmp_path):
    """Each example, as written, after the demo wrote its data (output/demo), in an empty folder
    (the configs they name are the shipped ones); $DATA names the demo's data for the dry-run of
    a paper sweep."""
    examples = readme_examples()
    assert len(examples) >= 2 and any("textrefiner-train" in e for e in examples) and \
        any("textrefiner-sweep" in e for e in examples)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DATA": "output/demo/data",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    prepared = subprocess.run([sys.executable, "-m", "textrefiner.demo", "prepare", "output/demo"],
                              cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=HANG_TIMEOUT)
    assert prepared.returncode == 0, prepared.stderr
    for example in examples:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", example], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=HANG_TIMEOUT)
        assert done.returncode == 0, f"{example}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    # what the examples say they leave: a base-trained run scored on novel classes, a report
    assert "* accuracy:" in (tmp_path / "output/mine/new/log.txt").read_text()
    report = (tmp_path / "output/cache/report/results.md").read_text()
    assert report.index("CACHE_SIZE=5 ") < report.index("CACHE_SIZE=10 ") < \
        report.index("CACHE_SIZE=25 ") < report.index("CACHE_SIZE=50 ")


# ----------------------------------------------------------------------------- the API page

# Names whose docstrings handle no tensor (no shape or dtype to state), or a model (a dtype only).
NO_TENSORS = {"UserError", "METHODS", "method_class"}
MODEL_ONLY = {"load_clip"}
DTYPE_WORDS = re.compile(r"dtype|float16|float32|int64|integer|fp16|fp32")


def exported():
    import textrefiner
    import textrefiner.methods

    for module in (textrefiner, textrefiner.methods):
        for name in module.__all__:
            yield module, name


def test_every_exported_name_has_shapes_and_dtypes_in_its_docstring():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from api_docs import attribute_comment, own_doc
    finally:
        sys.path.remove(str(REPO / "scripts"))
    missing = []
    for module, name in exported():
        obj = getattr(module, name)
        doc = own_doc(obj) if callable(obj) else attribute_comment(module, name)
        if not doc:
            missing.append(f"{module.__name__}.{name}: no docstring of its own")
        elif name not in NO_TENSORS and not DTYPE_WORDS.search(doc):
            missing.append(f"{module.__name__}.{name}: no dtype")
        elif name not in NO_TENSORS | MODEL_ONLY and not re.search(r"\[[^\]]*\]", doc):
            missing.append(f"{module.__name__}.{name}: no shape")
    assert not missing, "\n".join(missing)


def test_api_page_is_generated_from_the_docstrings():
    done = subprocess.run([sys.executable, "scripts/api_docs.py", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert done.returncode == 0, done.stderr
    page = text_of(REPO / "docs" / "api.md")
    for module, name in exported():
        assert f"`{name}" in page, f"{module.__name__}.{name} is not on docs/api.md"
