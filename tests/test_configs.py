"""Every variant of every config file builds a valid experiment (without training it); the
`:arg` syntax, `BASE` and the unknown-key checks."""

import os
import re
import subprocess
import sys

import pytest

from flowers_jax import config_checks, config_utils, losses, models, train
from flowers_jax.config import BASE, ConfigError, base_config, parse_arg, select_variant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ('resnet18', 'efficientnet_b0', 'vit_b16', 'demo')


def config_file(name: str):
  return config_utils.load_module(os.path.join(ROOT, 'configs', f'{name}.py'))


def get(name: str, arg: str | None = None):
  return config_file(name).get_config(arg)


def _variants():
  for name in CONFIGS:
    for variant in config_file(name).VARIANTS:
      yield name, variant


@pytest.mark.parametrize('name,variant', list(_variants()))
def test_variant_builds_its_model(name, variant):
  config = get(name, variant)
  assert config.variant == variant
  config_checks.validate(config)
  model = train.create_model(config)
  assert model.num_classes == config.model.num_classes
  assert config.train.loss in losses.LOSSES
  assert config.train.freeze in ('none', 'backbone')
  assert config.model.name in models.names()


def test_unknown_variant_lists_the_valid_ones():
  with pytest.raises(ValueError, match='valid variants: deform_after_conv1, .*frozen'):
    get('resnet18', 'nope')


def test_vit_image_size_follows_data_image_size():
  config = get('vit_b16', 'tcel')
  config.data.image_size = 384
  assert train.create_model(config).image_size == 384


def test_study_variants_set_what_the_study_changed():
  assert get('resnet18', 'frozen').train.freeze == 'backbone'
  assert get('resnet18', 'deform_parallel_conv1').model.deform == 'parallel_conv1'
  assert get('resnet18', 'deform_parallel_conv1').model.deform_init == 'random'
  assert get('resnet18', 'deform_after_conv1_pretrained_init').model.deform_init == 'pretrained'
  assert get('efficientnet_b0', 'eca').model.attention == 'eca'
  assert get('vit_b16', 'tcel').train.loss == 'tcel'
  assert get('vit_b16', 'tcel_hard').train.loss == 'tcel_hard'


# ------------------------------------------------------------------------------- :arg ---


def _without_variant(config) -> dict:
  d = config.to_dict()
  d.pop('variant')
  return d


@pytest.mark.parametrize('args,named', [
    ('deform=parallel_conv1,init=pretrained', 'deform_parallel_conv1_pretrained_init'),
    ('init=pretrained,deform=every_stage', 'deform_every_stage_pretrained_init'),
    ('deform=after_conv1', 'deform_after_conv1'),
    ('variant=frozen', 'frozen'),
    ('', 'finetune'),
])
def test_args_give_the_config_of_the_named_variant(args, named):
  by_args, by_name = get('resnet18', args), get('resnet18', named)
  assert _without_variant(by_args) == _without_variant(by_name)
  assert by_name.variant == named
  assert re.fullmatch(r'[A-Za-z0-9_.-]+', by_args.variant), by_args.variant  # a directory name


def test_variant_name_of_args():
  assert get('resnet18', 'deform=parallel_conv1,init=pretrained').variant == (
      'finetune_deform-parallel_conv1_init-pretrained')
  frozen = get('resnet18', 'frozen,init=pretrained')
  assert frozen.variant == 'frozen_init-pretrained'
  assert frozen.train.freeze == 'backbone' and frozen.optim.lr == pytest.approx(0.05)
  assert frozen.model.deform_init == 'pretrained' and frozen.model.deform == 'none'


@pytest.mark.parametrize('name,arg,expected', [
    ('resnet18', 'deform=sideways', "unknown deform 'sideways'; valid deforms: after_conv1, "
                                    'every_stage, none, parallel_conv1'),
    ('resnet18', 'dtype=bfloat16', 'valid args: variant=, deform=, init='),
    ('resnet18', 'init=random,init=pretrained', "'init' given twice"),
    ('resnet18', 'deform=none,frozen', "unknown config arg 'frozen'"),
    ('vit_b16', 'deform=after_conv1', 'valid args: variant= '),
    ('demo', 'finetune', "unknown variant 'finetune'; valid variants: default"),
])
def test_bad_args_are_one_line_naming_the_valid_ones(name, arg, expected):
  with pytest.raises(ConfigError) as e:
    get(name, arg)
  assert expected in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_load_config_passes_the_arg():
  spec = os.path.join(ROOT, 'configs', 'resnet18.py:deform=after_conv1,init=pretrained')
  config = config_utils.load_config(spec)
  assert (config.model.deform, config.model.deform_init) == ('after_conv1', 'pretrained')


def test_parse_arg():
  choices = {'variant': ('a', 'b'), 'size': ('s', 'm')}
  assert parse_arg(None, **choices) == {}
  assert parse_arg('b', **choices) == {'variant': 'b'}
  assert parse_arg('b,size=m', **choices) == {'variant': 'b', 'size': 'm'}
  assert parse_arg('size=s', **choices) == {'size': 's'}


def test_a_variant_that_sets_an_unknown_key_is_an_error():
  variants = {'finetune': {}, 'typo': {'optim.lrr': 0.1}, 'deep': {'optim.lr.x': 1}}
  with pytest.raises(ConfigError, match=r"variant 'typo' sets unknown key 'optim.lrr'; .*lr,"):
    select_variant(base_config(), 'typo', variants)
  with pytest.raises(ConfigError, match="variant 'deep' sets unknown key 'optim.lr.x'"):
    select_variant(base_config(), 'deep', variants)
  with pytest.raises(ConfigError, match="config arg size=big sets unknown key 'model.size'"):
    select_variant(base_config(), 'size=big', variants, size={'big': {'model.size': 2}})


# ------------------------------------------------------------------------------- BASE ---


def test_base_config_is_base():
  assert base_config().to_dict() == BASE
  config = base_config()
  config.optim.lr = 1.0
  assert BASE['optim']['lr'] == pytest.approx(0.01) and base_config().optim.lr == 0.01


def test_base_imports_without_ml_collections():
  code = ("import sys; sys.modules['ml_collections'] = None\n"
          "from flowers_jax.config import BASE; print(BASE['optim']['eps'])")
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert float(proc.stdout) == pytest.approx(1e-8)


# ----------------------------------------------------------------------- unknown keys ---


@pytest.mark.parametrize('dotted,value,expected', [
    ('learning_rate', 0.1, "unknown config key 'learning_rate'; valid keys in the config: data,"),
    ('optim.epss', 1e-6, "unknown config key 'optim.epss' (did you mean 'eps'?); valid keys in "
                         'optim: b1,'),
    ('train.nested.key', 1, "unknown config key 'train.nested'"),
    ('model.attention', 'eca', "unknown config key 'model.attention'; valid keys in model: "
                               'deform, deform_init, name, num_classes'),
])
def test_validate_rejects_unknown_keys(dotted, value, expected):
  config = get('resnet18', 'finetune')
  *parents, leaf = dotted.split('.')
  node = config
  for p in parents:
    if p not in node:
      node[p] = {}
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError) as e:
    config_checks.validate(config)
  assert str(e.value).startswith(expected), str(e.value)


def test_model_options_are_those_of_the_model():
  config = get('efficientnet_b0', 'eca')
  config_checks.validate(config)  # model.attention, dropout, stochastic_depth: its options
  config.model.name = 'resnet18'
  with pytest.raises(ConfigError, match="'model.attention'"):
    config_checks.validate(config)


@pytest.mark.parametrize('key,value,valid', [
    ('model.name', 'resnet81', 'resnet18'),
    ('optim.eps', 0.0, 'a number > 0'),
    # Steps where fractions are meant: the lr would never decay.
    ('optim.step_boundaries', (200, 300, 400), 'increasing fractions'),
    ('optim.step_boundaries', (0.75, 0.5), 'increasing fractions'),
    ('evals.names', 'classification,embeding', 'classification, embedding'),
    ('evals.names', 'embedding', 'including classification'),
    ('evals.knn_k', 0, 'an integer >= 1'),
    ('evals.knn_k', -2, 'an integer >= 1'),
    ('distributed.num_processes', 0, 'an integer >= 1'),
    ('distributed.process_id', 5, r'\[0, distributed.num_processes\)'),
])
def test_validate_rejects_bad_values(key, value, valid):
  config = get('resnet18')
  section, leaf = key.split('.')
  config[section][leaf] = value
  with pytest.raises(ConfigError, match=f'--config.{key}=.* expected .*{valid}'):
    config_checks.validate(config)
