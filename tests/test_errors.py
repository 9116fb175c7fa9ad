"""Bad input: one paragraph on stderr naming what is wrong, exit status 2, no traceback (once through the real
CLI, the other cases in-process through the CLI's task function); and results that stay valid JSON when a ratio is
undefined."""

import copy
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TINY = ["model=tiny", "logger=none", "trainer.enable_progress_bar=false"]


def cli(tmp_path, args):
    env = dict(os.environ, WANDB_MODE="disabled")
    env.pop("ETK_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(ROOT / "run_patching.py"), *args, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def assert_user_error(out, *words):
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("etk:")]
    assert len(lines) == 1, out.stderr
    flat = " ".join(out.stderr.split())
    for w in words:
        assert w in flat, (w, flat)


class Out:
    def __init__(self, code, err):
        self.returncode, self.stderr, self.stdout = code, err, ""


def in_process(tmp_path, capsys, args):
    """The CLI's task function (validation + dispatch + error reporting) on a composed config."""
    from etk.cli import _patching
    from tests.helpers import compose_cfg

    cfg = compose_cfg("patching", tmp_path / "run", args)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _patching(cfg)
    return Out(e.value.code, capsys.readouterr().err)


def test_bad_value_through_the_real_cli_exits_2_with_one_paragraph(tmp_path):
    assert_user_error(cli(tmp_path, TINY + ["data.n_boxes=1"]), "data.n_boxes = 1", "between 2 and 26")
    assert not (tmp_path / "run" / "results.json").exists()


def test_bad_values_and_files_exit_2_with_one_paragraph(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ETK_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert_user_error(in_process(tmp_path, capsys, TINY + ["data.n_examples=0"]), "data.n_examples = 0", ">= 1")
    assert_user_error(in_process(tmp_path, capsys, TINY + ["method=faithfulness", "method.batch_size=0"]),
                      "method.batch_size = 0")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"value_fetchers": [[0, 1]]}))
    assert_user_error(in_process(tmp_path, capsys, TINY + ["method=faithfulness", f"circuit.path={bad}"]),
                      "unknown circuit keys", "value_fetchers")
    broken = tmp_path / "broken.json"
    broken.write_text('{"value_fetcher": [[0, 1]')
    assert_user_error(in_process(tmp_path, capsys, TINY + ["method=faithfulness", f"circuit.path={broken}"]), "broken.json")
    assert_user_error(in_process(tmp_path, capsys, TINY + ["method=faithfulness", "circuit.path=nowhere.json"]), "nowhere.json")
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("var", ["ETK_DEBUG", "HYDRA_FULL_ERROR"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, var):
    """In debug mode the error is raised, not turned into the one-paragraph exit: Hydra then prints its traceback."""
    from etk.cli import _patching
    from etk.errors import ConfigError
    from tests.helpers import compose_cfg

    monkeypatch.delenv("ETK_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv(var, "1")
    cfg = compose_cfg("patching", tmp_path / "run", TINY + ["data.n_boxes=1"])
    with pytest.raises(ConfigError, match="data.n_boxes = 1"):  # not SystemExit(2)
        _patching(cfg)


def test_truncated_adapter_names_the_file(tmp_path, capsys, tiny, tiny_dir, monkeypatch):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(copy.deepcopy(tiny), LoraConfig(r=2, target_modules=["q_proj"]))  # never the shared fixture
    peft.save_pretrained(tmp_path / "lora")
    w = tmp_path / "lora" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    monkeypatch.delenv("ETK_DEBUG", raising=False)
    out = in_process(tmp_path, capsys, ["model=tiny", "model.source=local", f"+model.path={tiny_dir}", f"model.adapters=[{tmp_path / 'lora'}]",
                         "model.name=t", "logger=none", "trainer.enable_progress_bar=false", "data.n_examples=7"])
    assert_user_error(out, "AdapterError", str(tmp_path / "lora"))


def test_undefined_faithfulness_is_null_with_a_reason(tmp_path):
    from etk.cli import _patching
    from tests.helpers import compose_cfg

    circuit = tmp_path / "c.json"
    circuit.write_text(json.dumps({"value_fetcher": [[1, 2]]}))
    _patching(compose_cfg("patching", tmp_path / "run", TINY + [
        "method=faithfulness", f"circuit.path={circuit}", "data.n_boxes=3", "method.n_examples=6", "method.batch_size=6",
        "ablation.n_prompts=6", "method.n_random=2"]))
    text = (tmp_path / "run" / "results.json").read_text()
    doc = json.loads(text)  # valid JSON: no NaN
    assert "NaN" not in text and "Infinity" not in text
    assert doc["accuracy_model"] == 0 and doc["faithfulness"] is None and "no evaluation prompt" in doc["reason"]


def test_an_unknown_task_is_refused_not_run_as_boxes(tmp_path):
    """`task` names the task (it used to be the CLI's name, so `task=ioi` ran boxes): an unknown task fails before any
    model loads, by option (Hydra lists the tasks) or by name (etk's check lists them); the CLI's name is `entry`."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    from etk.errors import ConfigError
    from etk.validate import validate
    from tests.conftest import CONF

    with initialize_config_dir(str(CONF), version_base="1.3"):
        with pytest.raises(MissingConfigException, match="task/telepathy"):
            compose("patching", overrides=["task=telepathy"])
        cfg = compose("patching", overrides=["task.name=telepathy", "model=tiny"])
        assert compose("patching").task.name == "entity_tracking" and compose("patching").entry == "patching"
        assert compose("dcm").entry == "dcm" and compose("dcm").task.name == "entity_tracking"
    with pytest.raises(ConfigError, match="unknown task; tasks: entity_tracking .*; ioi"):
        validate(cfg)
