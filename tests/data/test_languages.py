"""Language codes and their names."""
import pytest

from coom.data.languages import language_name
from coom.errors import UserError


@pytest.mark.parametrize("code, name", [
    ("en", "English"), ("de", "German"), ("zh", "Chinese"),
    ("yue", "Chinese, Yue"), ("ast", "Asturian"), ("deu", "German")])
def test_iso_639_codes_have_their_names(code, name):
    assert language_name(code) == name


@pytest.mark.parametrize("code", ["xx", "english", "", "EN"])
def test_an_unknown_code_is_refused_in_one_line(code):
    with pytest.raises(UserError, match="unknown language code") as error:
        language_name(code)
    assert "\n" not in str(error.value)
