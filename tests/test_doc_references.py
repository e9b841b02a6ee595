"""Every reference the code makes to the repository's own docs can be followed in a fresh clone:
a cited docs/*.md or benchmarks/RESULTS.md exists, a cited "docs/MODEL.md section N" is a numbered
section of docs/MODEL.md, and a quoted RESULTS.md section title is one of its headings."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("vlmo_large", "launchers", "tools", "benchmarks", "tests")
CITED_FILE = re.compile(r"\b(docs/[A-Za-z_]+\.md|benchmarks/RESULTS\.md)")
MODEL_SECTIONS = re.compile(r"docs/MODEL\.md\s+sections?\s+(\d+)(?:\s+and\s+(\d+))?")
RESULTS_SECTION = re.compile(r"benchmarks/RESULTS\.md,\s+[\"']([^\"']+)[\"']")


def source_texts():
    for top in SOURCES:
        for folder, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith((".py", ".sh", ".md")):
                    path = os.path.join(folder, name)
                    with open(path, encoding="utf-8") as f:
                        # a reference may wrap onto the next comment line: join lines, drop the '#'
                        yield os.path.relpath(path, REPO), re.sub(r"\s*\n\s*#?\s*", " ", f.read())


def headings(path: str) -> list[str]:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return [line.lstrip("#").strip() for line in f if line.startswith("#")]


def test_cited_docs_exist_and_cited_sections_are_headings():
    model_numbers = {m.group(1) for h in headings("docs/MODEL.md") if (m := re.match(r"(\d+)\.", h))}
    results_titles = set(headings("benchmarks/RESULTS.md"))
    assert {"1", "2", "3", "4", "5", "6", "7", "8"} <= model_numbers
    problems, cited_sections = [], 0
    for path, text in source_texts():
        if path == os.path.relpath(__file__, REPO):
            continue  # this file names the patterns, not real references
        for cited in set(CITED_FILE.findall(text)):
            if not os.path.isfile(os.path.join(REPO, cited)):
                problems.append(f"{path}: {cited} does not exist")
        for match in MODEL_SECTIONS.finditer(text):
            cited_sections += 1
            for number in filter(None, match.groups()):
                if number not in model_numbers:
                    problems.append(f"{path}: docs/MODEL.md has no section {number}")
        for match in RESULTS_SECTION.finditer(text):
            cited_sections += 1
            if match.group(1) not in results_titles:
                problems.append(f"{path}: benchmarks/RESULTS.md has no section '{match.group(1)}'")
    assert not problems, "\n".join(problems)
    assert cited_sections >= 10  # the patterns do find the code's references


ARCHITECTURE = "docs/ARCHITECTURE.md"
# a repository path (globs allowed), optionally followed by ":Name" or ":Class.method" defined in it
NAMED_PATH = re.compile(r"\b((?:vlmo_large|launchers|tools|tests|benchmarks|docs|ds_configs|configs|scripts)"
                        r"/[\w/.*-]*\w)(?::([A-Za-z_][\w.]*))?")


def defined_names(path: str) -> set[str]:
    """Top-level functions and classes of a Python file, and Class.method for their methods."""
    import ast
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{item.name}" for item in node.body
                          if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def architecture_references(text: str) -> list[tuple[str, str | None]]:
    return [(m.group(1), m.group(2)) for m in NAMED_PATH.finditer(text)]


def test_paths_and_names_in_architecture_exist():
    """Every path docs/ARCHITECTURE.md names exists, and every `file.py:name` is defined in that file
    (a newcomer follows these to trace a step; a rename must update the document)."""
    import glob
    with open(os.path.join(REPO, ARCHITECTURE), encoding="utf-8") as f:
        references = architecture_references(f.read())
    assert len(references) >= 30 and sum(name is not None for _, name in references) >= 15
    problems = []
    for path, name in references:
        if not glob.glob(os.path.join(REPO, path)):
            problems.append(f"{path} does not exist")
        elif name is not None and name not in defined_names(path):
            problems.append(f"{path} defines no {name}")
    assert not problems, "\n".join(problems)


def test_the_architecture_check_catches_a_wrong_path_and_name():
    refs = architecture_references("see `vlmo_large/model/block.py:MoMEBlock.forward` and vlmo_large/nope.py")
    assert refs == [("vlmo_large/model/block.py", "MoMEBlock.forward"), ("vlmo_large/nope.py", None)]
    assert "MoMEBlock.forward" in defined_names("vlmo_large/model/block.py")
    assert "MoMEBlock.nope" not in defined_names("vlmo_large/model/block.py")
    assert not os.path.exists(os.path.join(REPO, "vlmo_large/nope.py"))
