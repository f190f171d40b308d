import importlib
import pathlib

import pytest

from fat5_jax import config as config_lib

CONFIGS = sorted(p.stem for p in pathlib.Path(__file__).parents[1].joinpath("configs").glob("*.py")
                 if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_validates(name):
  config = config_lib.from_config_dict(importlib.import_module(f"configs.{name}").get_config())
  assert config.data.decoder_length_buckets[-1] == config.data.decoder_length


def test_small_fr_matches_fat5_recipe():
  config = config_lib.from_config_dict(importlib.import_module("configs.small_fr").get_config())
  m, t = config.model, config.train
  assert (m.d_model, m.d_ff, m.d_kv, m.num_heads, m.num_layers, m.vocab_size) == (512, 2048, 64, 8, 12, 32768)
  assert (t.batch_size, t.grad_accum_steps, t.learning_rate, t.warmup_steps, t.z_loss) == (128, 4, 5e-3, 20000, 1e-4)


@pytest.mark.parametrize("section,field,value,message", [
    ("model", "d_modle", 3, "unknown model field"),
    ("model", "position_encoding_type", "sinusoid", "is not one of"),
    ("model", "d_model", "512", "must be int"),
    ("model", "num_heads", 0, "must be positive"),
    ("data", "decoder_length_buckets", (128, 256), "must end at data.decoder_length"),
    ("data", "decoder_length_buckets", (256, 512, 512), "strictly increasing"),
    ("data", "denoiser_proportions", (0.5, 0.5), "same, non-zero length"),
    ("data", "tokenizer_vocab_size", 40000, "exceeds model.vocab_size"),
    ("train", "warmup_init_fraction", 0.0, "warmup_init_fraction"),
    ("train", "profile_steps", (1, 2, 3), "profile_steps"),
    ("train", "optimizer", "adam", "train.optimizer='adam' is not one of"),
    ("finetune", "head", "pooler", "finetune.head='pooler' is not one of"),
    ("finetune", "steps", 0, "exactly one of finetune.steps and finetune.epochs"),
    ("finetune", "task", "files", "needs finetune.train_file and finetune.test_file"),
    ("finetune", "train_file", "a.jsonl", "only with finetune.task='files'"),
    ("finetune", "learning_rate", 0.0, "finetune.learning_rate must be positive"),
    ("finetune", "input_length", 4, "finetune.input_length must be >= 8"),
    ("finetune", "train_examples", -1, "finetune.train_examples must be >= 0"),
])
def test_bad_values_name_the_field(section, field, value, message):
  values = config_lib.to_config_dict().to_dict()
  values[section][field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.from_config_dict(values)


def test_unknown_top_level_field():
  values = config_lib.to_config_dict().to_dict()
  values["wrkdir"] = "x"
  with pytest.raises(config_lib.ConfigError, match="unknown top-level"):
    config_lib.from_config_dict(values)


def test_finetune_workdir_defaults_under_the_run():
  values = config_lib.to_config_dict().to_dict()
  values["workdir"] = "/runs/tiny"
  assert config_lib.finetune_workdir(config_lib.from_config_dict(values)) == "/runs/tiny/finetune/wiki_fr_category"
  values["finetune"]["workdir"] = "/elsewhere"
  assert config_lib.finetune_workdir(config_lib.from_config_dict(values)) == "/elsewhere"


def test_configuration_doc_is_current():
  doc = pathlib.Path(__file__).parents[1].joinpath("docs", "configuration.md").read_text()
  assert doc == config_lib.markdown_reference(), "regenerate: python -m fat5_jax.config > docs/configuration.md"


def test_a_tuple_field_given_twice_on_the_command_line_is_refused_in_one_line():
  buckets = ["--config.data.decoder_length_buckets=(16,32)", "--config.data.decoder_length_buckets=(32,)"]
  with pytest.raises(config_lib.ConfigError, match=r"^--config\.data\.decoder_length_buckets is given twice: give it once"):
    config_lib.check_override_names(["main.py", *buckets])
  config_lib.check_override_names(["main.py", "--config.train.steps=2", "--config.train.steps=3", buckets[1]])
