"""recbole_mm.compat: after ``import recbole_mm``, RecBole's OWN quick start and trainer run and
load their checkpoints on torch >= 2.6, while ``torch.load`` everywhere else keeps its default."""

import glob
import os
import pickle
import subprocess
import sys
import types

import pytest
import torch

import recbole_mm  # noqa: F401 - compat first
from recbole_mm import compat
from conftest import FAST, REPO, write_tiny_dataset


class NotATensor:
    """A pickled object that ``weights_only=True`` refuses (like RecBole's pickled Config)."""

    def __init__(self, value):
        self.value = value


def test_import_pulls_in_neither_ray_nor_recboles_trainer():
    code = ("import sys, recbole_mm; "
            "print(sorted(m for m in ('ray', 'recbole.quick_start', 'recbole.trainer.trainer') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_recboles_own_run_recbole_and_load_data_and_model(workdir):
    from recbole.quick_start import load_data_and_model, run_recbole
    from recbole.trainer import Trainer

    write_tiny_dataset(workdir / "data")
    # RecBole's own Config, without recbole_mm's defaults: CE loss needs no negative sampling,
    # and RecBole loads only user_id/item_id unless told otherwise.
    config_dict = dict(FAST, data_path=str(workdir / "data"), checkpoint_dir=str(workdir / "saved"),
                       train_neg_sample_args=None,
                       load_col={"inter": ["user_id", "item_id", "timestamp"]})
    # saved=True: Trainer.evaluate(load_best_model=True) reloads the checkpoint (trainer.py:583)
    result = run_recbole(model="SASRec", dataset="tiny", config_dict=config_dict, saved=True)
    assert set(result) >= {"best_valid_score", "best_valid_result", "test_result"}
    assert "hit@10" in result["test_result"] or "recall@10" in result["test_result"]

    (model_file,) = glob.glob(str(workdir / "saved" / "SASRec-*.pth"))
    config, model, dataset, train_data, valid_data, test_data = load_data_and_model(model_file)
    assert config["model"] == "SASRec" and config["dataset"] == "tiny"
    state = compat.torch_load(model_file)["state_dict"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name

    trainer = Trainer(config, model)
    trainer.resume_checkpoint(model_file)  # trainer.py:323
    assert trainer.start_epoch == 1
    again = trainer.evaluate(test_data, load_best_model=True, model_file=model_file,
                             show_progress=False)
    assert again == pytest.approx(dict(result["test_result"]))


def test_torch_load_outside_recbole_is_untouched(tmp_path):
    import torch.serialization

    assert torch.load is torch.serialization.load
    assert torch.load.__module__ == "torch.serialization"
    path = str(tmp_path / "obj.pth")
    torch.save({"obj": NotATensor(3)}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)  # weights_only defaults to True, as without recbole_mm

    import recbole.trainer.trainer as recbole_trainer

    assert recbole_trainer.torch.load(path)["obj"].value == 3  # RecBole's scope only
    with pytest.raises(pickle.UnpicklingError):  # an explicit weights_only is obeyed
        recbole_trainer.torch.load(path, weights_only=True)
    assert recbole_trainer.torch.nn is torch.nn and recbole_trainer.torch.Tensor is torch.Tensor


def test_both_torch_load_forms_are_redirected(tmp_path):
    """The module-level ``torch`` (trainer.py) and a function-local ``import torch``
    (quick_start.py:248), on a module built here."""
    path = str(tmp_path / "obj.pth")
    torch.save({"obj": NotATensor(5)}, path)
    module = types.ModuleType("fake_recbole_module")
    exec("import torch\n"
         "def global_load(p):\n    return torch.load(p)\n"
         "def local_load(p):\n    import torch\n    return torch.load(p)\n"
         "def other(p):\n    return p\n", vars(module))
    package = types.ModuleType("fake_package")
    sys.modules["fake_package"] = package
    module.__name__ = "fake_package.fake_recbole_module"
    package.local_load = module.local_load
    try:
        for fn in (module.global_load, module.local_load):
            with pytest.raises(pickle.UnpicklingError):
                fn(path)
        other = module.other
        compat._trust_torch_load(module)
        compat._trust_torch_load(module)  # idempotent
        assert module.global_load(path)["obj"].value == 5
        assert module.local_load(path)["obj"].value == 5
        assert package.local_load is module.local_load  # the package's name is rebound too
        assert module.other is other  # functions that do not name torch are left alone
        assert torch.load is torch.serialization.load
    finally:
        del sys.modules["fake_package"]
