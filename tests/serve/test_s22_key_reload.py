"""ApiKeys.reload on a key file that went wrong after the server started (a rotation replaced it with
a folder, removed it, wrote it in another encoding): one sentence naming the file and the fix, never
Python's raw "[Errno 21] Is a directory", and the keys in force stay in force."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagerec.serve.auth import ApiKeys
from imagerec.utils import ImageRecError

KEY = "a-long-enough-key-1234"


@pytest.fixture
def keys(tmp_path: Path) -> ApiKeys:
    (tmp_path / "keys.txt").write_text(KEY + "\n")
    return ApiKeys(str(tmp_path / "keys.txt"))


@pytest.mark.parametrize(("break_it", "message"), [
    (lambda f: (f.unlink(), f.mkdir()), r"keys.txt is a directory, not a file: give the file inside it"),
    (lambda f: f.unlink(), r"API key file not found: .*keys.txt \(one key per line\)"),
    (lambda f: f.write_bytes(b"\xff\xfe" + KEY.encode("utf-16-le")), r"keys.txt is not UTF-8 text \(byte 0\)"),
])
def test_a_broken_key_file_is_one_clear_sentence_and_the_old_keys_stay(keys: ApiKeys, tmp_path: Path,
                                                                        break_it, message: str) -> None:
    break_it(tmp_path / "keys.txt")
    with pytest.raises(ImageRecError, match=message) as e:
        keys.reload()
    assert "Errno" not in str(e.value)
    assert keys.check(KEY)  # a failed reload changes nothing
