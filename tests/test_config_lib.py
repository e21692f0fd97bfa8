import pytest
from conftest import ROOT

from resfuse_jax import config_lib, models
from resfuse_jax.errors import ConfigError

REQUIRED = [
  "seed",
  "model.name",
  "model.features",
  "model.fusion",
  "data.name",
  "data.root",
  "data.patch_size",
  "data.fold",
  "train.steps",
  "train.batch_size",
  "train.lr",
  "eval.every_steps",
  "checkpoint.every_steps",
  "mesh.data",
]


def get(c, dotted):
  for part in dotted.split("."):
    c = c[part]
  return c


class ConfigFile:
  """``configs/<name>.py`` loaded through the package's one loader."""

  def __init__(self, name):
    self.name = name

  def get_config(self, arg=None):
    return config_lib.load(f"{ROOT / 'configs' / self.name}.py:{arg or ''}")

  def __repr__(self):
    return self.name


phantom_config, brats_config = ConfigFile("phantom"), ConfigFile("brats")
DATASETS = [phantom_config, brats_config, ConfigFile("breast"), ConfigFile("manifest")]


@pytest.mark.parametrize("module", DATASETS)
@pytest.mark.parametrize(
  "arg", [None, *config_lib.MODELS, "resunet,smoke", "a2fnet,smoke", "smoke"]
)
def test_configs_load_with_the_contract_keys(module, arg):
  c = module.get_config(arg)
  for key in REQUIRED:
    get(c, key)
  variant = (arg or "resfuse").split(",")[0]
  variant = "resfuse" if variant == "smoke" else variant
  assert c.model.variant == variant
  assert c.model.name == config_lib.VARIANTS[variant][0]
  assert c.model.name in models.names()
  levels = len(c.model.features)
  assert all(p % 2 ** (levels - 1) == 0 for p in c.data.patch_size)


def test_every_registered_model_has_a_config():
  assert set(models.names()) <= set(config_lib.MODELS)


@pytest.mark.parametrize("module", DATASETS)
@pytest.mark.parametrize("options", ["", ",smoke"])
def test_model_configs_differ_in_the_model_only(module, options):
  """A comparison changes one thing: data, training, evaluation and seed are shared."""
  reference = module.get_config(f"resfuse{options}").to_dict()
  for variant in config_lib.MODELS:
    c = module.get_config(f"{variant}{options}").to_dict()
    assert {k: v for k, v in c.items() if k != "model"} == {
      k: v for k, v in reference.items() if k != "model"
    }
    assert c["model"]["features"] == reference["model"]["features"]


def test_unknown_config_arg_is_an_error():
  with pytest.raises(ConfigError, match="Unknown config args"):
    phantom_config.get_config("resfuse,fast")


def test_datasets_differ_only_in_data_and_size():
  p, b = phantom_config.get_config("resfuse"), brats_config.get_config("resfuse")
  assert p.model.fusion == b.model.fusion and p.train.optimizer == b.train.optimizer
  assert p.data.name == "phantom" and b.data.name == "brats"


def test_load_applies_overrides_and_reports_bad_ones(tmp_path):
  c = config_lib.load(f"{ROOT}/configs/phantom.py:resunet,smoke", {"train.steps": 7})
  assert c.train.steps == 7 and c.model.name == "resunet" and c.model.features == (4, 8)
  with pytest.raises(ConfigError, match="train.nonsense"):
    config_lib.load(f"{ROOT}/configs/phantom.py", {"train.nonsense.deep": 1})
  with pytest.raises(ConfigError, match="not found"):
    config_lib.load(f"{tmp_path}/nope.py")
  (tmp_path / "empty.py").write_text("x = 1\n")
  with pytest.raises(ConfigError, match="defines no get_config"):
    config_lib.load(f"{tmp_path}/empty.py")


def test_with_model_keeps_the_options():
  assert config_lib.with_model("c.py:resunet,smoke", "lits") == "c.py:lits,smoke"
  assert config_lib.with_model("c.py", "a2fnet") == "c.py:a2fnet"
  with pytest.raises(ConfigError, match="unet9000.*resfuse"):
    config_lib.with_model("c.py:smoke", "unet9000")


def test_conv_impl_is_a_config_field_the_env_var_sets_once(monkeypatch):
  monkeypatch.delenv("RESFUSE_CONV_IMPL", raising=False)
  assert phantom_config.get_config().model.conv_impl == "auto"
  monkeypatch.setenv("RESFUSE_CONV_IMPL", "xla")
  c = phantom_config.get_config()
  monkeypatch.setenv("RESFUSE_CONV_IMPL", "planes")  # later changes reach no built config
  assert c.model.conv_impl == "xla"


def test_no_sys_path_manipulation_in_configs_tests_or_benchmarks():
  offenders = [
    str(p.relative_to(ROOT))
    for folder in ("configs", "tests", "benchmarks")
    for p in (ROOT / folder).rglob("*.py")
    if "sys.path" in p.read_text() and p.name != "test_config_lib.py"
  ]
  assert offenders == []


def test_a_shipped_config_name_resolves_to_the_file_inside_the_package(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here: names work from any folder
  shipped = config_lib.shipped_configs()
  assert set(shipped) == {"brats", "breast", "manifest", "phantom"}
  package = ROOT / "resfuse_jax" / "configs"
  assert (
    config_lib.resolve_spec("phantom:resunet,smoke") == f"{package / 'phantom.py'}:resunet,smoke"
  )
  assert config_lib.resolve_spec("brats.py") == str(package / "brats.py")
  assert config_lib.load("phantom:resunet,smoke").model.name == "resunet"
  # The checkout's configs/ is the same files, not a copy.
  assert (ROOT / "configs").resolve() == package.resolve()


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "phantom").write_text(
    "import ml_collections\n\ndef get_config(arg=None):\n"
    "  return ml_collections.ConfigDict({'mine': True, 'arg': arg})\n"
  )
  assert config_lib.resolve_spec("phantom:smoke") == "phantom:smoke"
  assert config_lib.load("phantom:smoke").to_dict() == {"mine": True, "arg": "smoke"}
  spec = f"{ROOT}/configs/phantom.py:smoke"
  assert config_lib.resolve_spec(spec) == spec  # a path is used as given


@pytest.mark.parametrize("spec", ["nosuch:smoke", "configs/nosuch.py", "sub/phantom"])
def test_an_unknown_config_names_the_spec_and_the_shipped_names(spec, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError) as e:
    config_lib.resolve_spec(spec)
  assert f"config {spec!r} not found" in str(e.value)
  assert "(brats, breast, manifest, phantom)" in str(e.value)
