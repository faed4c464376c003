import json

import pytest

from coom.data.corpus import read_documents
from coom.errors import UserError

# Characters that str.splitlines() breaks at but JSON keeps raw in strings.
UNICODE_BREAKS = ["line\u2028separator", "paragraph\u2029separator",
                  "next\x85line"]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_jsonl_lines_end_only_at_newlines(tmp_path, newline):
    """What json.dumps(ensure_ascii=False) writes reads back intact, as
    Megatron's preprocess_data.py reads it."""
    path = tmp_path / "records.jsonl"
    lines = [json.dumps({"text": text}, ensure_ascii=False)
             for text in UNICODE_BREAKS]
    path.write_bytes(newline.join(lines).encode())
    assert list(read_documents(path, "text")) == UNICODE_BREAKS


def test_jsonl_error_names_the_line_after_unicode_breaks(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"text": "a\u2028b"}\n{broken\n', encoding="utf-8")
    with pytest.raises(UserError, match="records.jsonl:2 is not valid"):
        list(read_documents(path, "text"))
