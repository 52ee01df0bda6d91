"""A damaged gzipped IDX file is one error naming it, not a zlib traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imagerec.data import read_data
from imagerec.data.idx import write_idx
from imagerec.utils import ImageRecError

# a gzip header, then a deflate block of the reserved type 3: zlib.error "invalid block type"
DAMAGED_GZIP = bytes.fromhex("1f8b0800000000000003") + b"\x07" + bytes(16)


def test_a_damaged_gzipped_idx_file_is_named(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 8, 8), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 0, 1], dtype=np.uint8))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(DAMAGED_GZIP)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1], dtype=np.uint8))
    with pytest.raises(ImageRecError, match=r"t10k-images-idx3-ubyte.gz: cannot read IDX file \(.*invalid block type\); "
                                            r"the file is damaged or incomplete"):
        read_data(str(tmp_path))
