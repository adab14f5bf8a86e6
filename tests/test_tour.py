"""The guided tour (docs/tour/) runs as tests, so its code and its printed figures cannot drift from the engine.

Each page is one test. The runner takes the page's fenced ```python blocks in order and executes them in one
namespace per page (a later block uses an earlier block's variables), from the repository root. A ```text block
placed right after a python block (only blank lines between) is that block's expected output: everything the
block printed must equal it, line for line, after trailing spaces and leading/trailing blank lines are dropped.
A python block without one is still run (it must not raise) but its output is not checked. A ```text block
anywhere else is an error, so an expectation cannot silently stop being checked. Other fences (```bash, plain
```) are prose and never run. Tracebacks point at the page's own line numbers. Further tests check that the files,
links and `Class.method` names of nanoserve the pages cite exist, and feed the runner broken pages to show it fails.

Run one page by hand, printing what each block prints: `python tests/test_tour.py docs/tour/04-prefix-caching.md`.
"""
import contextlib
import difflib
import io
import linecache
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOUR = ROOT / "docs" / "tour"
PAGES = sorted(p.name for p in TOUR.glob("[0-9]*.md"))
FENCE = re.compile(r"^```\s*([\w-]*)\s*$")


class TourError(AssertionError):
    """A page's code raised, or printed something other than what the page says."""


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the block's first code line in the page
    expected: "Block | None" = None  # the ```text block that follows a python block


def parse(markdown: str, name: str = "<page>") -> list[Block]:
    """The page's python blocks, each with its expected-output block if it has one."""
    blocks, lines, i, previous_end = [], markdown.splitlines(), 0, -1
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start = i + 1
        end = next((j for j in range(start, len(lines)) if lines[j].rstrip() == "```"), None)
        if end is None:
            raise TourError(f"{name}:{i + 1}: a fenced block that is never closed")
        block = Block(match.group(1), "\n".join(lines[start:end]) + "\n", start + 1)
        if block.lang == "text":
            owner = blocks[-1] if blocks else None
            adjacent = all(not line.strip() for line in lines[previous_end + 1:i])
            if owner is None or not adjacent or owner.expected is not None or owner.lang != "python":
                raise TourError(f"{name}:{i + 1}: a ```text block must follow a ```python block directly "
                                "(it is that block's expected output)")
            owner.expected = block
        blocks.append(block)
        previous_end = i = end
        i += 1
    return [b for b in blocks if b.lang == "python"]


def normalize(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def run_page(markdown: str, name: str = "<page>", echo=None) -> dict:
    """Execute every python block of `markdown` in one namespace and check the outputs; returns the namespace.
    `echo(block, output)` is called after each block (the command line prints with it)."""
    blocks = parse(markdown, name)
    namespace = {"__name__": "__tour__"}
    filename = f"<tour {name}>"
    lines = markdown.splitlines(keepends=True)
    linecache.cache[filename] = (len(markdown), None, lines, filename)  # tracebacks show the page's lines
    saved_path, saved_cwd = list(sys.path), os.getcwd()
    os.chdir(ROOT)
    try:
        for block in blocks:
            out = io.StringIO()
            code = compile("\n" * (block.line - 1) + block.code, filename, "exec")
            try:
                with contextlib.redirect_stdout(out):
                    exec(code, namespace)
            except Exception as exc:
                raise TourError(f"{name}:{block.line}: the python block starting here raised "
                                f"{type(exc).__name__}: {exc}") from exc
            if echo is not None:
                echo(block, out.getvalue())
            if block.expected is not None:
                got, want = normalize(out.getvalue()), normalize(block.expected.code)
                if got != want:
                    diff = "\n".join(difflib.unified_diff(want, got, "the page says", "the code printed", lineterm=""))
                    raise TourError(f"{name}:{block.expected.line}: the output of the python block at line "
                                    f"{block.line} differs from the page:\n{diff}")
    finally:
        os.chdir(saved_cwd)
        sys.path[:] = saved_path
    return namespace


# ----------------------------------------------------------------------------------------------------------------
# The pages
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES)
def test_page(page, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the pages' model directories go where pytest cleans
    run_page((TOUR / page).read_text(), page)


def test_index_lists_every_page():
    index = (TOUR / "README.md").read_text()
    assert len(PAGES) >= 7
    for page in PAGES:
        assert f"]({page})" in index, f"docs/tour/README.md does not link {page}"


def missing_references(markdown: str) -> list[str]:
    """What a page cites that does not exist: `nanoserve/...`, `tests/...`, `docs/...` or `bench/...` paths,
    relative links, and `Class.attribute` names of classes defined in nanoserve (methods, class attributes,
    dataclass fields, attributes their code sets on `self`)."""
    import importlib
    import inspect
    problems = []
    for path in sorted(set(re.findall(r"`((?:nanoserve|tests|docs|bench)/[\w./-]+)`", markdown))):
        if not (ROOT / path).exists():
            problems.append(path)
    for target in sorted(set(re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", markdown))):
        if not (TOUR / target).exists():
            problems.append(target)
    classes = {}
    for module_path in sorted((ROOT / "nanoserve").glob("*.py")):
        module = importlib.import_module(f"nanoserve.{module_path.stem}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                classes[name] = cls
    for name, attr in sorted(set(re.findall(r"`([A-Z]\w*)\.(\w+)`", markdown))):
        cls = classes.get(name)
        if cls is None or hasattr(cls, attr) or attr in getattr(cls, "__dataclass_fields__", {}):
            continue
        if not re.search(rf"self\.{attr}\b", inspect.getsource(cls)):  # nor an attribute set on instances
            problems.append(f"{name}.{attr}")
    return problems


@pytest.mark.parametrize("page", ["README.md", *PAGES])
def test_code_references_exist(page):
    assert missing_references((TOUR / page).read_text()) == []


def test_missing_references_are_found():
    page = ("`nanoserve/scheduler.py`, `nanoserve/nothing.py`, `BlockManager.allocate`, `BlockManager.alocate`, "
            "`Scheduler.max_num_seqs`, `Unknown.thing`, [fine](01-paged-kv-cache.md), [gone](99-gone.md#top)")
    assert missing_references(page) == ["nanoserve/nothing.py", "99-gone.md", "BlockManager.alocate"]


# ----------------------------------------------------------------------------------------------------------------
# The runner can fail: broken pages are caught
# ----------------------------------------------------------------------------------------------------------------

GOOD = """\
Some prose.

```python
x = 6 * 7
```

```python
print(x)
print("  done  ")
```

```text
42
  done
```

```bash
this is not run
```
"""


def test_runner_shares_a_namespace_and_checks_output():
    seen = []
    namespace = run_page(GOOD, "good.md", echo=lambda block, out: seen.append((block.line, out)))
    assert namespace["x"] == 42
    assert seen == [(4, ""), (8, "42\n  done  \n")]


def test_runner_catches_an_exception():
    broken = GOOD.replace("x = 6 * 7", "x = 6 * 7\nx.append(1)")
    with pytest.raises(TourError, match=r"broken\.md:4: the python block starting here raised AttributeError") as info:
        run_page(broken, "broken.md")
    tb = info.value.__cause__.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert tb.tb_lineno == 5  # the page's own line number


def test_runner_catches_wrong_output():
    wrong = GOOD.replace("x = 6 * 7", "x = 6 * 8")
    with pytest.raises(TourError, match=r"wrong\.md:13: the output of the python block at line 8") as info:
        run_page(wrong, "wrong.md")
    assert "-42\n+48" in str(info.value)


def test_runner_catches_missing_and_extra_lines():
    with pytest.raises(TourError, match="differs"):
        run_page(GOOD.replace('print("  done  ")\n', ""), "missing.md")
    with pytest.raises(TourError, match="differs"):
        run_page(GOOD.replace('print("  done  ")', 'print("  done  ")\nprint("more")'), "extra.md")


@pytest.mark.parametrize("markdown", [
    "```text\n42\n```\n",  # nothing to be the output of
    "```python\nprint(1)\n```\n\nProse in between.\n\n```text\n1\n```\n",  # not directly after its block
    "```python\nprint(1)\n```\n```text\n1\n```\n```text\n1\n```\n",  # two expectations for one block
    "```python\nprint(1)\n",  # never closed
])
def test_runner_rejects_stray_or_unclosed_blocks(markdown):
    with pytest.raises(TourError):
        run_page(markdown, "stray.md")


if __name__ == "__main__":
    for arg in sys.argv[1:] or [str(TOUR / p) for p in PAGES]:
        path = Path(arg)
        print(f"==== {path}")
        start = time.perf_counter()

        def echo(block, out):
            print(f"---- line {block.line}{'' if block.expected is None else ' (checked)'}")
            print(out, end="")
        try:
            run_page(path.read_text(), path.name, echo)
        except TourError as exc:
            print(f"FAILED: {exc}")
            if exc.__cause__ is not None:  # the page's code raised
                import traceback
                traceback.print_exception(exc.__cause__)
        print(f"==== {time.perf_counter() - start:.1f} s")
