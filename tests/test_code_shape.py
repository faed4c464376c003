"""Small files and functions (STYLE.md): no file under coom/ passes 600
lines, and no function or method passes 60, counted from its ``def`` line
to the end of its body, docstring included."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 60


def _offences(text: str, name: str) -> list[str]:
    """One line per way the source text of file name is too long: the
    file itself, or one of its functions, as file:line and the length."""
    found = []
    length = len(text.splitlines())
    if length > MAX_FILE_LINES:
        found.append(f"{name}: file of {length} lines")
    for node in ast.walk(ast.parse(text, name)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno}: {node.name} of "
                             f"{length} lines")
    return found


def _offences_of(name: str) -> list[str]:
    """The offences of the file name (relative to the checkout)."""
    return _offences((ROOT / name).read_text(encoding="utf-8"), name)


def test_no_file_or_function_is_too_long():
    names = [path.relative_to(ROOT).as_posix()
             for path in sorted((ROOT / "coom").rglob("*.py"))]
    offences = [line for name in names for line in _offences_of(name)]
    assert not offences, "\n".join(offences)


def test_the_limits_count_from_def_to_the_body_end():
    def function(lines: int) -> str:
        body = "".join(f"    x = {i}\n" for i in range(lines - 2))
        return f'@decorator\ndef f():\n    """Doc."""\n{body}'

    assert _offences(function(60), "a.py") == []
    assert _offences(function(61), "a.py") == ["a.py:2: f of 61 lines"]
    long_file = "x = 0\n" * 601
    assert _offences(long_file, "b.py") == ["b.py: file of 601 lines"]
