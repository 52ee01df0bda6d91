"""imagerec.config: the types train() arguments, config files, the command line and a TrainConfig
passed to train() may give, and messages that say where a wrong value came from (QA aug #9, #10)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import imagerec
from imagerec.config import TrainConfig, apply_overrides, load_config_file
from imagerec.utils import ImageRecError


def test_train_arguments_take_paths_numpy_scalars_and_tuples(tmp_path: Path) -> None:
    cfg = apply_overrides(TrainConfig(), {"data": tmp_path / "digits", "out": Path("runs/a"),
                                          "pretrained": tmp_path / "w.safetensors", "epochs": np.int64(3),
                                          "lr": np.float32(0.5), "cutout": np.uint8(4), "ops": ("median", "sobel"),
                                          "translate": np.int32(2), "weight_decay": np.int64(0)}, "train() arguments")
    assert (cfg.data, cfg.out, cfg.pretrained) == (str(tmp_path / "digits"), "runs/a", str(tmp_path / "w.safetensors"))
    assert (cfg.epochs, cfg.lr, cfg.cutout, cfg.translate, cfg.weight_decay) == (3, 0.5, 4, 2, 0.0)
    assert [type(v) for v in (cfg.epochs, cfg.lr, cfg.cutout, cfg.weight_decay)] == [int, float, int, float]
    assert cfg.ops == ["median", "sobel"]
    cfg.validate()


@pytest.mark.parametrize(("origin", "label"), [
    ("train() arguments", "train() argument 'epochs'"),
    ("the command line", "--epochs (epochs)"),
    ("--resume overrides", "--resume override 'epochs'"),
    ("cfg.yaml", "cfg.yaml: config key 'epochs'"),
])
def test_a_wrong_type_is_named_after_where_it_came_from(origin: str, label: str) -> None:
    with pytest.raises(ImageRecError) as e:
        apply_overrides(TrainConfig(), {"epochs": 2.5}, origin)
    assert str(e.value) == f"{label} must be an integer, got 2.5 (float)"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("epochs", True, "train() argument 'epochs' must be an integer, got True (bool)"),
    ("lr", False, "train() argument 'lr' must be a number, got False (bool)"),
    ("ops", {"median": 3}, "train() argument 'ops' must be a list of strings (or one string), got {'median': 3}"),
    ("ops", b"median", "train() argument 'ops' must be a list of strings (or one string), got b'median'"),
    ("model", Path("cnn"), "train() argument 'model' must be a string, got PosixPath('cnn') (PosixPath)"),
    ("data", 3, "train() argument 'data' must be a path (a string or pathlib.Path), got 3 (int)"),
])
def test_still_refused(key: str, value: object, message: str) -> None:
    with pytest.raises(ImageRecError) as e:
        apply_overrides(TrainConfig(), {key: value}, "train() arguments")
    assert str(e.value) == message


def test_config_file_messages_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("epochs: three\n")
    with pytest.raises(ImageRecError) as e:
        load_config_file(tmp_path / "bad.yaml")
    assert str(e.value) == f"{tmp_path / 'bad.yaml'}: config key 'epochs' must be an integer, got 'three' (str)"


def test_validate_coerces_a_trainconfigs_fields_as_train_arguments_are() -> None:
    cfg = TrainConfig(data=Path("digits"), ops="median", lr=np.float64(0.1), epochs=np.int64(2))
    cfg.validate()
    assert (cfg.data, cfg.ops, cfg.lr, cfg.epochs) == ("digits", ["median"], 0.1, 2)
    assert (type(cfg.lr), type(cfg.epochs)) == (float, int)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("epochs", "1", "TrainConfig field 'epochs' must be an integer, got '1' (str)"),
    ("hflip", "no", "TrainConfig field 'hflip' must be true or false, got 'no'"),
    ("ops", 3, "TrainConfig field 'ops' must be a list of strings (or one string), got 3"),
    ("batch_size", None, "TrainConfig field 'batch_size' cannot be empty"),
])
def test_validate_refuses_a_trainconfig_field_of_the_wrong_type(field: str, value: object, message: str) -> None:
    with pytest.raises(ImageRecError) as e:
        TrainConfig(**{field: value}).validate()
    assert str(e.value) == message


def test_train_with_a_trainconfig_of_wrong_types_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(ImageRecError, match=r"^TrainConfig field 'epochs' must be an integer, got '1'"):
        imagerec.train(TrainConfig(data=str(tmp_path / "nothing"), out=str(tmp_path / "r"), epochs="1"))
    assert not (tmp_path / "r").exists()


def test_a_string_op_in_a_trainconfig_is_one_op(tmp_path: Path, write_digits) -> None:
    write_digits(tmp_path / "d", 6)
    result = imagerec.train(TrainConfig(data=str(tmp_path / "d"), out=str(tmp_path / "r"), model="mlp", epochs=1,
                                        ops="median", val_fraction=0.0, batch_size=4, num_threads=1))
    import json
    meta = json.loads((Path(result.run_dir) / "best.json").read_text())
    assert meta["preprocess"]["ops"] == ["median"]


def test_cutout_bound_in_validate() -> None:
    TrainConfig(cutout=1023).validate()
    with pytest.raises(ImageRecError, match=r"cutout .* between 0 \(off\) and 1023 .* got 1024"):
        TrainConfig(cutout=1024).validate()
    TrainConfig(image_size=32, cutout=31).validate()
    with pytest.raises(ImageRecError, match=r"between 0 \(off\) and 31 \(less than --image-size 32\), got 32"):
        TrainConfig(image_size=32, cutout=32).validate()
