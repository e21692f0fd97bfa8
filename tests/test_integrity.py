"""Issue 26, class 6: every file the predictor reads from an export is covered by a digest.

The cache's first-open hash check is in test_faults.py
(``test_a_tampered_cached_array_is_found_the_first_time_a_process_opens_it``).
"""

import json
import shutil

import numpy as np
import pytest

from resfuse_jax import files
from resfuse_jax.errors import CheckpointError
from resfuse_jax.inference import integrity, onnx_runtime
from resfuse_jax.inference.predictor import Predictor
from resfuse_jax.serving import exporting


@pytest.fixture(scope="module")
def export(trained_workdir, tmp_path_factory):
  return exporting.export_model(
    trained_workdir, tmp_path_factory.mktemp("integrity") / "E", onnx="no"
  )


@pytest.fixture
def copy(export, tmp_path):
  out = tmp_path / "E"
  shutil.copytree(export, out)
  return out


def test_the_export_records_a_digest_of_every_file_the_predictor_reads(export):
  meta = json.loads((export / "export.json").read_text())
  assert set(meta[integrity.FILES_KEY]) == {
    "config.json",
    "postprocessing.json",
    "serving/window.jax_export",
  }
  assert meta[integrity.RECORD_KEY] == integrity.record_sha256(meta)
  assert Predictor.load(export).rules is not None  # intact: loads, with its rules


def test_a_changed_threshold_in_config_json_is_refused(copy):
  config = json.loads((copy / "config.json").read_text())
  config["eval"]["thresholds"] = [0.9, 0.9, 0.9]
  (copy / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  with pytest.raises(CheckpointError, match=r"config.json does not match the SHA-256") as e:
    Predictor.load(copy)
  assert "\n" not in str(e.value) and str(copy / "config.json") in str(e.value)


def test_a_changed_rule_in_postprocessing_json_is_refused(copy):
  text = (copy / "postprocessing.json").read_text()
  rules = json.loads(text)
  changed = json.dumps(rules).replace("0", "1", 1)  # one digit of a rule
  assert changed != json.dumps(rules)
  (copy / "postprocessing.json").write_text(changed)
  with pytest.raises(CheckpointError, match=r"postprocessing.json does not match the SHA-256"):
    Predictor.load(copy)
  (copy / "postprocessing.json").unlink()  # a missing file is refused too
  with pytest.raises(CheckpointError, match=r"postprocessing.json is missing"):
    Predictor.load(copy)


def test_an_edited_or_unsealed_export_json_is_refused(copy):
  meta = json.loads((copy / "export.json").read_text())
  meta["deploy"]["labels"]["thresholds"] = [0.1, 0.1, 0.1]
  (copy / "export.json").write_text(json.dumps(meta))
  with pytest.raises(
    CheckpointError, match=r"export.json does not match the SHA-256 recorded in it"
  ):
    Predictor.load(copy)
  del meta[integrity.FILES_KEY], meta[integrity.RECORD_KEY]  # an older export
  (copy / "export.json").write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match=r"records no SHA-256 of config.json"):
    Predictor.load(copy)
  sealed = integrity.seal(meta, copy)  # a postprocessing.json the export did not write
  del sealed[integrity.FILES_KEY]["postprocessing.json"]
  sealed[integrity.RECORD_KEY] = integrity.record_sha256(sealed)
  (copy / "export.json").write_text(json.dumps(sealed))
  with pytest.raises(CheckpointError, match=r"postprocessing.json is not recorded in export.json"):
    Predictor.load(copy)


def _two_channel_onnx(path):
  """pre, post [n, 1, d, h, w] -> logits, probabilities [n, 2, d, h, w]: two regions."""
  import onnx
  from onnx import TensorProto, helper

  shape_in, shape_out = ["n", 1, "d", "h", "w"], ["n", 2, "d", "h", "w"]
  graph = helper.make_graph(
    [
      helper.make_node("Concat", ["pre", "post"], ["logits"], axis=1),
      helper.make_node("Sigmoid", ["logits"], ["probabilities"]),
    ],
    "two",
    [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape_in) for n in ("pre", "post")],
    [
      helper.make_tensor_value_info(n, TensorProto.FLOAT, shape_out)
      for n in ("logits", "probabilities")
    ],
  )
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  model.ir_version = 8
  onnx.save(model, str(path))
  return path


def test_an_onnx_model_with_the_wrong_channel_count_is_refused(copy):
  pytest.importorskip("onnxruntime")
  path = _two_channel_onnx(copy / onnx_runtime.FILE)
  window = onnx_runtime.OnnxWindow(path)  # without the config, it runs
  assert window(np.zeros((1, 4, 4, 4, 2), np.float32)).shape == (1, 4, 4, 4, 2)
  with pytest.raises(CheckpointError, match="outputs 2 channels, the config has 3 regions"):
    onnx_runtime.OnnxWindow(path, regions=3)
  # recorded as if the export had written it (its digest and the record's rewritten): the
  # digests pass, the channel check does not
  meta = json.loads((copy / "export.json").read_text())
  meta["onnx"] = {
    "written": True,
    "file": onnx_runtime.FILE,
    "sha256": files.sha256(path),
  }
  (copy / "export.json").write_text(json.dumps(integrity.seal(meta, copy)))
  with pytest.raises(CheckpointError, match="outputs 2 channels, the config has 3 regions"):
    Predictor.load(copy, backend="onnxruntime")
