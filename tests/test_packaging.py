"""What the package promises about itself: the Python versions it runs on.

setup.cfg says ``python_requires = >=3.10`` (Debian 12 has 3.11, some
archive hosts older).  This reads every module the way Python 3.10 would
parse it and refuses names that appeared in 3.11 (issue 11 item 9: the code
imported ``datetime.UTC``).
"""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
# module -> names first available in Python 3.11
NEW_IN_311 = {
    "datetime": {"UTC"}, "typing": {"Self", "LiteralString", "Never", "assert_never",
                                    "reveal_type", "Required", "NotRequired", "TypeVarTuple",
                                    "Unpack", "dataclass_transform"},
    "enum": {"StrEnum", "ReprEnum", "verify", "member", "nonmember", "global_enum"},
    "asyncio": {"TaskGroup", "timeout", "Runner"}, "hashlib": {"file_digest"},
    "operator": {"call"}, "contextlib": {"chdir"},
}
NEW_MODULES_311 = {"tomllib", "wsgiref.types"}
NEW_BUILTINS_311 = {"ExceptionGroup", "BaseExceptionGroup"}


def _modules() -> list[Path]:
    return sorted((PROJECT / "spoolops").rglob("*.py"))


def test_python_requires_is_3_10() -> None:
    parser = configparser.ConfigParser()
    parser.read(PROJECT / "setup.cfg")
    assert parser["options"]["python_requires"].strip() == ">=3.10"


def test_every_module_parses_and_imports_as_python_3_10_would() -> None:
    problems = []
    for path in _modules():
        source = path.read_text()
        tree = ast.parse(source, str(path), feature_version=(3, 10))  # e.g. except*
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            where = f"{path.relative_to(PROJECT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    aliases[alias.asname or alias.name] = alias.name
                    if alias.name in NEW_MODULES_311:
                        problems.append(f"{where}: import {alias.name}")
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module in NEW_MODULES_311:
                    problems.append(f"{where}: from {node.module}")
                for alias in node.names:
                    if alias.name in NEW_IN_311.get(node.module, ()):
                        problems.append(f"{where}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                module = aliases.get(node.value.id)
                if module and node.attr in NEW_IN_311.get(module, ()):
                    problems.append(f"{where}: {node.value.id}.{node.attr}")
            elif isinstance(node, ast.Name) and node.id in NEW_BUILTINS_311:
                problems.append(f"{where}: {node.id}")
    assert problems == [], "new in Python 3.11:\n" + "\n".join(problems)
