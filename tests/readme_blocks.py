"""The README's runnable blocks: found by a marker comment, their placeholders filled, made to fit a test.

A block the README test runs is a fenced ``bash`` or ``python`` block right after a marker line::

    <!-- readme-test: id=train expect="test/auc" expect="logged to MLflow run" -->

Marker keys (shell-quoted values; ``expect`` may repeat):

- ``id``: the block's name (test messages, ``--block`` selection);
- ``expect``: text the block's output must contain;
- ``background``: a URL; the block is a server (run in its own process group): it passes once the URL
  answers, and is stopped then, or, with ``until=<id>``, once block ``<id>`` (its clients) has run;
- ``skip``: why this block cannot run here (the whole suite itself, a CUDA machine); said in the report;
- ``timeout``: seconds (default 600).

``<name>`` placeholders are filled from earlier blocks' output (``PLACEHOLDERS``) or generated
(``GENERATED``); a placeholder the test does not know fails the test, naming it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

MARKER = re.compile(r"^<!--\s*readme-test:(?P<attrs>.*?)-->\s*$")
FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")
PLACEHOLDER = re.compile(r"<([a-z][a-z0-9 _-]*)>")

# placeholder -> (the block whose output holds it, regex; the last match wins)
PLACEHOLDERS = {
    "run id": ("quickstart", r"logged to MLflow run ([0-9a-f]{32})"),
    "best checkpoint": ("quickstart", r"best \S+ = [-\d.]+ \((\S+)\); testing it"),
    "last checkpoint": ("sharded", r"last checkpoint: (\S+)"),
}


@dataclass
class Block:
    """One marked block of the README."""

    id: str
    lang: str
    code: str
    line: int  # 1-based line of the marker
    expect: list[str] = field(default_factory=list)
    background: str | None = None
    until: str | None = None
    skip: str | None = None
    timeout: float = 600


def parse_marker(text: str, line: int) -> dict[str, list[str]]:
    attrs: dict[str, list[str]] = {}
    for token in shlex.split(text):
        key, sep, value = token.partition("=")
        if not sep or key not in ("id", "expect", "background", "until", "skip", "timeout"):
            raise ValueError(f"README.md:{line}: bad readme-test marker item {token!r}")
        attrs.setdefault(key, []).append(value)
    if "id" not in attrs:
        raise ValueError(f"README.md:{line}: readme-test marker without id=")
    return attrs


def readme_blocks(readme: Path) -> list[Block]:
    """Every marked block, in README order."""
    lines = readme.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        marker = MARKER.match(lines[i].strip())
        if not marker:
            i += 1
            continue
        attrs = parse_marker(marker.group("attrs"), i + 1)
        start = i + 1
        while start < len(lines) and not lines[start].strip():
            start += 1
        fence = FENCE.match(lines[start].strip()) if start < len(lines) else None
        if fence is None or fence.group("lang") not in ("bash", "python"):
            raise ValueError(f"README.md:{i + 1}: a readme-test marker must precede a ```bash or ```python block")
        end = start + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        first = {key: values[0] for key, values in attrs.items()}
        blocks.append(Block(id=first["id"], lang=fence.group("lang"), code="\n".join(lines[start + 1 : end]) + "\n",
                            line=i + 1, expect=attrs.get("expect", []), background=first.get("background"),
                            until=first.get("until"), skip=first.get("skip"),
                            timeout=float(first.get("timeout", 600))))
        i = end + 1
    ids = [b.id for b in blocks]
    if len(ids) != len(set(ids)):
        raise ValueError(f"README.md: readme-test ids repeat: {sorted({x for x in ids if ids.count(x) > 1})}")
    return blocks


def unmarked_blocks(readme: Path) -> list[int]:
    """Lines of ```bash / ```python blocks without a marker (each must be marked or explicitly skipped)."""
    lines = readme.read_text().splitlines()
    out, inside, previous = [], False, ""
    for number, raw in enumerate(lines, 1):
        text = raw.strip()
        if text.startswith("```"):
            if not inside and text in ("```bash", "```python") and not MARKER.match(previous):
                out.append(number)
            inside = not inside
        if text:
            previous = text
    return out


def fill_placeholders(code: str, outputs: dict[str, str], generated: dict[str, str], block: Block) -> str:
    """``<name>`` -> what the block named in ``PLACEHOLDERS`` printed (``outputs``: block id -> output),
    or a generated secret."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name in generated:
            return generated[name]
        if name not in PLACEHOLDERS:
            raise AssertionError(f"README block {block.id!r} (line {block.line}): unknown placeholder <{name}>")
        source, pattern = PLACEHOLDERS[name]
        found = re.findall(pattern, outputs.get(source, ""))
        if not found:
            raise AssertionError(f"README block {block.id!r} (line {block.line}): block {source!r} printed no "
                                 f"<{name}> (pattern {pattern!r})")
        return found[-1]

    return PLACEHOLDER.sub(value, code)


def logical_lines(code: str) -> list[str]:
    """Shell lines with ``\\`` continuations joined."""
    out, current = [], ""
    for raw in code.splitlines():
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        out.append(current + raw)
        current = ""
    if current:
        out.append(current)
    return out


def split_comment(line: str) -> tuple[str, str]:
    """``cmd args   # note`` -> (``cmd args``, ``   # note``); quotes respected."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:]
    return line.rstrip(), ""


FAST_EPOCHS = "--trainer.max_epochs 1 --trainer.limit_train_batches 40"


def shorten(code: str) -> str:
    """Less training for the slow commands (the test's fast mode): ``rec-dist fit|tune`` and the Ray jobs
    train 1 epoch of at most 40 batches (validation and test stay whole), a study runs 2 trials. Nothing
    else changes."""
    out = []
    for line in logical_lines(code):
        command, comment = split_comment(line)
        if re.search(r"(rec-dist (fit|tune)|jobs/(train|tune)\.py)\b", command) and "--print_config" not in command:
            command = f"{command} {FAST_EPOCHS}"
        command = re.sub(r"--num_samples \d+", "--num_samples 2", command)
        out.append(command + (" " + comment.strip() if comment else ""))
    return "\n".join(out) + "\n"


def stop_ray(temp_dir: str) -> None:
    """``ray stop`` for the test's own cluster only: the processes whose command line names its temp dir,
    this one excepted (it names the dir too)."""
    import os
    import signal

    import psutil

    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != os.getpid() and any(temp_dir in part for part in proc.info["cmdline"] or []):
            procs.append(proc)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
