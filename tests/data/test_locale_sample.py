import json
import struct
import warnings

import pytest

from coom.data.languages import base_language
from coom.data.locale_sample import (
    DEFAULT_ROOT,
    translated_texts,
    write_sample,
)
from coom.errors import Skipped, UserError

MO_MAGIC = 0x950412DE
MO_HEAD = struct.Struct("<7I")
HEADER = ("Content-Type: text/plain; charset=UTF-8\n"
          "Plural-Forms: nplurals=2; plural=(n != 1);\n")


def mo_bytes(messages: dict[str, str]) -> bytes:
    """A GNU .mo catalog of messages, msgid to msgstr, after a header
    entry. A plural entry is "singular\\0plural" to "form0\\0form1"."""
    entries = sorted({"": HEADER, **messages}.items())
    count = len(entries)
    originals_at = MO_HEAD.size
    translations_at = originals_at + 8 * count
    strings_at = translations_at + 8 * count
    tables = {originals_at: b"", translations_at: b""}
    blob = b""
    for side, table_at in enumerate(tables):
        for entry in entries:
            encoded = entry[side].encode()
            tables[table_at] += struct.pack(
                "<2I", len(encoded), strings_at + len(blob))
            blob += encoded + b"\0"
    head = MO_HEAD.pack(MO_MAGIC, 0, count, originals_at, translations_at,
                        0, strings_at)
    return head + tables[originals_at] + tables[translations_at] + blob


def write_catalog(root, folder, domain, messages):
    path = root / folder / "LC_MESSAGES" / f"{domain}.mo"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(mo_bytes(messages))
    return path


def sentence(number: int) -> str:
    return f"English sentence number {number}"


def satz(number: int) -> str:
    return f"Deutscher Satz für die Nummer {number}"


def test_translations_per_language_and_english_from_msgids(tmp_path):
    write_catalog(tmp_path, "de", "tool", {sentence(1): satz(1),
                                           sentence(2): satz(2)})
    write_catalog(tmp_path, "fr", "tool",
                  {sentence(1): "Phrase française numéro un"})
    assert translated_texts(tmp_path) == {
        "de": [satz(1), satz(2)],
        "en": [sentence(1), sentence(2)],
        "fr": ["Phrase française numéro un"]}


def test_header_empty_untranslated_and_short_strings_are_left_out(
        tmp_path):
    write_catalog(tmp_path, "de", "tool", {
        sentence(1): satz(1),
        sentence(2): "",
        sentence(3): sentence(3),
        sentence(4): "Zu kurz",
        "Short": "Eine lange Übersetzung eines kurzen Wortes",
        sentence(5): "   Nur Leerzeichen  \n   ",
        sentence(6): " \n "})
    texts = translated_texts(tmp_path)
    assert texts["de"] == [satz(1),
                           "Eine lange Übersetzung eines kurzen Wortes"]
    assert texts["en"] == [sentence(number) for number in range(1, 7)]
    assert translated_texts(tmp_path, min_chars=0)["de"] == [
        satz(1), "Zu kurz", "   Nur Leerzeichen  \n   ",
        "Eine lange Übersetzung eines kurzen Wortes"]


def test_strings_are_kept_once_in_catalog_order(tmp_path):
    write_catalog(tmp_path, "de", "b", {sentence(3): satz(3),
                                        sentence(1): satz(1)})
    write_catalog(tmp_path, "de", "a", {sentence(2): satz(2),
                                        sentence(4): satz(1)})
    write_catalog(tmp_path, "en", "a", {sentence(2): "An English line "
                                        "in the en folder",
                                        sentence(5): sentence(1)})
    texts = translated_texts(tmp_path)
    assert texts["de"] == [satz(2), satz(1), satz(3)]
    assert texts["en"] == [sentence(2), sentence(4), sentence(1),
                           sentence(3), sentence(5),
                           "An English line in the en folder"]


def test_regional_variants_merge_under_their_language(tmp_path):
    write_catalog(tmp_path, "pt_BR", "tool", {
        sentence(1): "Frase em português do Brasil",
        sentence(2): "Frase comum aos dois países"})
    write_catalog(tmp_path, "pt", "tool", {
        sentence(1): "Frase em português de Portugal",
        sentence(2): "Frase comum aos dois países"})
    write_catalog(tmp_path, "sr@latin", "tool",
                  {sentence(1): "Rečenica na srpskoj latinici"})
    assert translated_texts(tmp_path)["pt"] == [
        "Frase em português de Portugal", "Frase comum aos dois países",
        "Frase em português do Brasil"]
    separate = translated_texts(tmp_path, merge_regions=False)
    assert sorted(separate) == ["en", "pt", "pt_BR", "sr@latin"]
    assert separate["pt_BR"] == ["Frase em português do Brasil",
                                 "Frase comum aos dois países"]


def test_english_in_other_dress_is_left_out(tmp_path):
    write_catalog(tmp_path, "de", "tool", {sentence(1): satz(1)})
    write_catalog(tmp_path, "en@quot", "tool",
                  {sentence(2): "\u201cEnglish\u201d sentence, quoted"})
    write_catalog(tmp_path, "en_GB", "tool",
                  {sentence(3): "English sentence, British colour"})
    english = translated_texts(tmp_path)["en"]
    assert "English sentence, British colour" in english
    assert not [text for text in english if "\u201c" in text]


@pytest.mark.parametrize("folder, language", [
    ("de", "de"), ("pt_BR", "pt"), ("sr@latin", "sr"), ("zh_CN", "zh"),
    ("ca@valencia", "ca"), ("de.UTF-8", "de"), ("ast", "ast"),
    ("zh-Hant", "zh")])
def test_language_of_a_folder(folder, language):
    assert base_language(folder) == language


def test_plural_forms_are_kept(tmp_path):
    write_catalog(tmp_path, "de", "tool", {
        "removed one regular file\0removed %d regular files":
            "eine Datei wurde entfernt\0%d Dateien wurden entfernt",
        "copied one directory\0copied %d directories":
            "copied one directory\0copied %d directories"})
    texts = translated_texts(tmp_path)
    assert texts["de"] == ["eine Datei wurde entfernt",
                           "%d Dateien wurden entfernt"]
    assert texts["en"] == ["copied one directory",
                           "removed one regular file"]


def test_an_unreadable_catalog_is_skipped_and_counted(tmp_path):
    write_catalog(tmp_path, "de", "good", {sentence(1): satz(1)})
    (tmp_path / "de" / "LC_MESSAGES" / "bad.mo").write_bytes(b"not a .mo")
    latin1 = mo_bytes({sentence(2): "Deutscher Satz"}).replace(
        "Satz".encode(), "Sätz".encode("latin-1"))
    (tmp_path / "de" / "LC_MESSAGES" / "latin1.mo").write_bytes(latin1)
    with pytest.warns(Skipped, match="skipped 2 unreadable gettext"):
        texts = translated_texts(tmp_path)
    assert texts == {"de": [satz(1)], "en": [sentence(1)]}


def read_jsonl(path):
    return [json.loads(line)
            for line in path.read_text(encoding="utf-8").splitlines()]


def test_write_sample_writes_languages_with_enough_documents(tmp_path):
    root = tmp_path / "locale"
    write_catalog(root, "de", "tool",
                  {sentence(number): satz(number) for number in range(3)})
    write_catalog(root, "fr", "tool", {sentence(0): "Une seule phrase ici"})
    folder = tmp_path / "sample" / "locale"
    assert write_sample(folder, root, min_docs=2) == {"de": 3, "en": 3}
    assert sorted(path.name for path in folder.iterdir()) == [
        "de.jsonl", "en.jsonl"]
    assert read_jsonl(folder / "de.jsonl") == [
        {"text": satz(number), "lang": "de"} for number in range(3)]
    assert "für" in (folder / "de.jsonl").read_text(encoding="utf-8")
    # At most max_docs each, the first ones.
    assert write_sample(folder, root, min_docs=2, max_docs=2) == {
        "de": 2, "en": 2}
    assert read_jsonl(folder / "de.jsonl") == [
        {"text": satz(number), "lang": "de"} for number in range(2)]
    write_catalog(root, "de", "tool", {sentence(0): satz(0)})
    assert write_sample(folder, root, min_docs=1) == {"de": 1, "en": 1,
                                                      "fr": 1}
    assert sorted(path.name for path in folder.iterdir()) == [
        "de.jsonl", "en.jsonl", "fr.jsonl"]
    assert read_jsonl(folder / "de.jsonl") == [{"text": satz(0),
                                                "lang": "de"}]


def assert_one_line_error(call, *words):
    with pytest.raises(UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_a_missing_root_is_a_user_error(tmp_path):
    root = tmp_path / "nowhere"
    assert_one_line_error(lambda: translated_texts(root), str(root),
                          "does not exist", "language packs")
    assert_one_line_error(lambda: write_sample(tmp_path / "out", root),
                          str(root), "language packs")


def test_a_root_without_usable_text_is_a_user_error(tmp_path):
    assert_one_line_error(lambda: translated_texts(tmp_path), str(tmp_path),
                          "no gettext catalogs with translated text")
    write_catalog(tmp_path, "de", "tool", {"Open": "Öffnen"})
    assert_one_line_error(lambda: translated_texts(tmp_path),
                          "no gettext catalogs with translated text")
    write_catalog(tmp_path, "de", "tool", {sentence(1): satz(1)})
    assert_one_line_error(lambda: write_sample(tmp_path / "out", tmp_path),
                          "has 50 translated strings", "lower min_docs")
    assert not (tmp_path / "out").exists()


def test_the_machine_catalogs():
    """The real /usr/share/locale gives text where it holds catalogs, and
    a one-line UserError where it holds none."""
    if not any(DEFAULT_ROOT.glob("*/LC_MESSAGES/*.mo")):
        assert_one_line_error(translated_texts, str(DEFAULT_ROOT))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        texts = translated_texts()
    assert "en" in texts
    for language, strings in texts.items():
        assert language == base_language(language)
        assert len(set(strings)) == len(strings)
        assert all(len(text.strip()) >= 20 for text in strings)
