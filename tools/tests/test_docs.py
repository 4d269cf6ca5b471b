"""The documentation's commands and links, so that they cannot rot.

- Every ```sh block preceded by a `<!-- doc-test: expect="..." -->` marker in README.md or
  docs/*.md runs with bash (`set -eo pipefail`) in a scratch folder that looks like the repository
  root: `target/release/illmrec` (the real binary), `models/` (a fresh copy of the demo bundle, the
  other model files linked) and `docs/`. It must exit 0 and print every `expect` string (stdout and
  stderr together). Needs target/release/illmrec and the default model.
- docs/cli.md names every subcommand and every option of `illmrec --help`, and every environment
  variable the code under src/ reads.
- Every relative link in README.md and docs/*.md points to an existing file, and every `#anchor`
  to a heading of its page.
"""
import os
import re
import shutil
import subprocess
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release" / "illmrec"
MODEL = ROOT / "models" / "gemma-3-270m-f32.gguf"
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
CLI_PAGE = ROOT / "docs" / "cli.md"

needs_binary = pytest.mark.skipif(
    not (BIN.exists() and MODEL.exists()),
    reason="needs target/release/illmrec and the default model (tools/demo.sh)",
)

MARKER = re.compile(r"^<!--\s*doc-test(?::(?P<attrs>.*?))?\s*-->\s*$")
ATTR = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")


def rel(path):
    return path.relative_to(ROOT).as_posix()


def doc_blocks():
    """(page, line, expects, script) for every marked block; a marker that is not followed by a
    ```sh block is an error, reported as a block that fails."""
    found = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            m = MARKER.match(line.strip())
            if not m:
                continue
            attrs = {}
            expects = []
            for k, v in ATTR.findall(m.group("attrs") or ""):
                v = v.replace('\\"', '"').replace("\\\\", "\\")
                if k == "expect":
                    expects.append(v)
                else:
                    attrs[k] = v
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            fence = FENCE.match(lines[j]) if j < len(lines) else None
            if not fence or fence.group(2) not in ("sh", "bash", "shell"):
                found.append((page, i + 1, expects, None))
                continue
            end = j + 1
            while end < len(lines) and not lines[end].startswith(fence.group(1)):
                end += 1
            found.append((page, i + 1, expects, "\n".join(lines[j + 1:end]) + "\n"))
    return found


BLOCKS = doc_blocks()


def test_there_are_runnable_blocks():
    assert len(BLOCKS) >= 10, [f"{rel(p)}:{n}" for p, n, _, _ in BLOCKS]
    for page, line, expects, script in BLOCKS:
        assert script is not None, f"{rel(page)}:{line}: doc-test marker not followed by a ```sh block"
        assert expects, f"{rel(page)}:{line}: doc-test marker without expect=\"...\""


def scratch_root(tmp):
    """A folder laid out like the repository root for the documented commands."""
    (tmp / "target" / "release").mkdir(parents=True)
    (tmp / "target" / "release" / "illmrec").symlink_to(BIN)
    (tmp / "models").mkdir()
    for entry in (ROOT / "models").iterdir():
        if entry.name == "demo-bundle":
            shutil.copytree(entry, tmp / "models" / entry.name)
        elif not entry.name.startswith("."):
            (tmp / "models" / entry.name).symlink_to(entry)
    (tmp / "docs").symlink_to(ROOT / "docs")
    return tmp


@needs_binary
@pytest.mark.parametrize(
    "page,line,expects,script",
    [b for b in BLOCKS if b[3] is not None],
    ids=[f"{rel(p)}:{n}" for p, n, _, s in BLOCKS if s is not None],
)
def test_documented_command(tmp_path, page, line, expects, script):
    cwd = scratch_root(tmp_path / "repo")
    env = dict(os.environ)
    env.pop("ILLMREC_MODEL", None)
    env.pop("ILLMREC_KERNELS", None)
    out = subprocess.run(["bash", "-c", "set -eo pipefail\n" + script], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    where = f"{rel(page)}:{line}"
    assert out.returncode == 0, f"{where} exited {out.returncode}:\n{script}\n--- output ---\n{out.stdout[-4000:]}"
    for e in expects:
        assert e in out.stdout, f"{where}: {e!r} not in the output:\n{out.stdout[-4000:]}"


# --- docs/cli.md covers the binary ---------------------------------------------------------------

def help_text(*words):
    return subprocess.run([str(BIN), *words, "--help"], check=True, capture_output=True, text=True).stdout


def subcommands(text):
    names, inside = [], False
    for line in text.splitlines():
        if line.startswith("Commands:"):
            inside = True
        elif inside and line.startswith("  ") and line.strip():
            name = line.split()[0]
            if name != "help":
                names.append(name)
        elif inside and not line.startswith(" "):
            inside = False
    return names


def leaf_commands(prefix=()):
    text = help_text(*prefix)
    subs = subcommands(text)
    if not subs:
        return [(prefix, text)]
    return [leaf for s in subs for leaf in leaf_commands(prefix + (s,))]


@needs_binary
def test_cli_page_names_every_subcommand_and_option():
    page = CLI_PAGE.read_text(encoding="utf-8")
    missing = []
    for words, text in leaf_commands():
        if " ".join(words) not in page:
            missing.append(f"command `{' '.join(words)}`")
        for flag in sorted(set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", text)) - {"--help", "--version"}):
            if not re.search(re.escape(flag) + r"(?![a-z0-9-])", page):
                missing.append(f"`{' '.join(words)} {flag}`")
    assert not missing, "docs/cli.md does not mention: " + ", ".join(missing)


def test_cli_page_names_every_environment_variable():
    page = CLI_PAGE.read_text(encoding="utf-8")
    names = set()
    for src in (ROOT / "src").rglob("*"):
        if src.suffix in (".rs", ".cpp", ".c", ".h") and src.is_file():
            text = src.read_text(encoding="utf-8", errors="replace")
            names |= set(re.findall(r'env::var(?:_os)?\(\s*"([A-Z][A-Z0-9_]*)"', text))
            names |= set(re.findall(r'getenv\(\s*"([A-Z][A-Z0-9_]*)"', text))
            names |= set(re.findall(r'"(ILLMREC_[A-Z0-9_]+)"', text))
    assert "ILLMREC_MODEL" in names, "the scan of src/ found nothing: has the layout changed?"
    missing = sorted(n for n in names if f"`{n}`" not in page)
    assert not missing, "docs/cli.md does not document: " + ", ".join(missing)


# --- links ----------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text):
    """The text outside fenced code blocks, with inline code spans blanked (line numbers kept)."""
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line.lstrip())
        if fence is None and m:
            fence = m.group(1)
            out.append("")
        elif fence is not None:
            if line.lstrip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            out.append("")
        else:
            out.append(re.sub(r"(`+)(.+?)\1", lambda c: " " * len(c.group(0)), line))
    return out


def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = text.replace("`", "").lower()
    text = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page):
    seen, result = {}, set()
    for line in heading_lines(page):
        s = slug(line)
        n = seen.get(s, 0)
        seen[s] = n + 1
        result.add(s if n == 0 else f"{s}-{n}")
    return result


def heading_lines(page):
    """The text of every heading of a page, outside code blocks."""
    lines, fence = [], None
    for line in page.read_text(encoding="utf-8").splitlines():
        m = FENCE.match(line.lstrip())
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None:
            if line.lstrip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
        else:
            h = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
            if h:
                lines.append(h.group(1))
    return lines


def test_relative_links_point_to_existing_files_and_headings():
    broken = []
    for page in PAGES + [ROOT / "tools" / "README.md"]:
        for n, line in enumerate(prose(page.read_text(encoding="utf-8")), 1):
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                    continue
                path, _, anchor = target.partition("#")
                dest = (page.parent / path).resolve() if path else page
                where = f"{rel(page)}:{n}: {target}"
                if not dest.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{where} (no heading with that anchor in {dest.name})")
    # docs/architecture.md comes with the restructuring of src/ (issue 26), written beside these
    # pages: until it is committed, links to it are the only ones allowed to dangle.
    pending = ROOT / "docs" / "architecture.md"
    if broken and not pending.exists() and all(f"{pending.name} (no such file)" in b for b in broken):
        pytest.xfail("docs/architecture.md is not written yet: " + "; ".join(broken))
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_setup_commands_are_the_two_scripts():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for script in ("tools/demo.sh", "tools/test.sh"):
        assert re.search(rf"^\./{re.escape(script)}$", readme, re.M), f"README.md lost the set-up command ./{script}"
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"
