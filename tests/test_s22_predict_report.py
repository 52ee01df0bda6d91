"""The confusion-matrix PNG shows class names and titles as written, `$` included."""

from __future__ import annotations

import io

from PIL import Image

from imagerec.report import confusion_matrix_png


def test_confusion_png_dollar_names_are_text_not_tex_math() -> None:
    # matplotlib reads text between two `$` as TeX math: "$_$" failed to parse (ValueError, so
    # `imagerec eval` ended in a traceback) and "$0-$9" was drawn as "0 - 9"
    png = confusion_matrix_png([[3, 1], [0, 2]], ["$_$", "$0-$9"], title="run_$^$ - test")
    assert Image.open(io.BytesIO(png)).format == "PNG"
