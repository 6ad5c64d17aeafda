"""Run configs: `train.device` / `train.precision` are checked when a config is built, and run
configs written with the older `train.bf16` flag still load as the precision they meant."""

from __future__ import annotations

import pytest
import yaml

from longrec.config import RunConfig, build_config, resolve
from longrec.errors import UserError


def test_device_and_precision_default_to_auto():
    tc = resolve(None, []).train
    assert (tc.device, tc.precision) == ("auto", "auto")
    tc = resolve(None, ["train.device=cuda:1", "train.precision=bf16"]).train
    assert (tc.device, tc.precision) == ("cuda:1", "bf16")


@pytest.mark.parametrize(("flag", "precision"), [(True, "bf16"), (False, "fp32")])
def test_a_config_with_the_old_bf16_flag_loads_as_its_precision(tmp_path, flag, precision):
    old = {"data": {"path": "d"}, "model": {"name": "din"}, "train": {"bf16": flag, "lr": 0.1}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = resolve(tmp_path / "config.yaml", [])
    assert cfg.train.precision == precision and cfg.train.lr == 0.1
    assert "bf16" not in cfg.to_dict()["train"]
    assert RunConfig.from_dict(old).train.precision == precision  # how a run's config is read
    assert build_config(cfg.to_dict()) == cfg  # and written back


def test_the_old_flag_may_not_contradict_the_precision():
    assert resolve(None, ["train.bf16=true", "train.precision=bf16"]).train.precision == "bf16"
    with pytest.raises(UserError, match=r"train\.bf16 = True contradicts train\.precision"):
        resolve(None, ["train.bf16=true", "train.precision=fp32"])
    with pytest.raises(UserError, match=r"train\.bf16 = 'yes' is not a bool"):
        resolve(None, ["train.bf16='yes'"])
