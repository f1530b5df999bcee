"""Every variant of every config file builds a valid experiment (without training it)."""

import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from flowers_jax import losses, models, train  # noqa: E402

CONFIGS = ('resnet18', 'efficientnet_b0', 'vit_b16', 'demo')


def _variants():
  for name in CONFIGS:
    module = importlib.import_module(f'configs.{name}')
    for variant in module.VARIANTS:
      yield name, variant


@pytest.mark.parametrize('name,variant', list(_variants()))
def test_variant_builds_its_model(name, variant):
  config = importlib.import_module(f'configs.{name}').get_config(variant)
  assert config.variant == variant
  model = train.create_model(config)
  assert model.num_classes == config.model.num_classes
  assert config.train.loss in losses.LOSSES
  assert config.train.freeze in ('none', 'backbone')
  assert config.model.name in models.names()


def test_unknown_variant_lists_the_valid_ones():
  module = importlib.import_module('configs.resnet18')
  with pytest.raises(ValueError, match='valid variants: deform_after_conv1, .*frozen'):
    module.get_config('nope')


def test_vit_image_size_follows_data_image_size():
  config = importlib.import_module('configs.vit_b16').get_config('tcel')
  config.data.image_size = 384
  assert train.create_model(config).image_size == 384


def test_study_variants_set_what_the_study_changed():
  get = lambda n, v: importlib.import_module(f'configs.{n}').get_config(v)  # noqa: E731
  assert get('resnet18', 'frozen').train.freeze == 'backbone'
  assert get('resnet18', 'deform_parallel_conv1').model.deform == 'parallel_conv1'
  assert get('resnet18', 'deform_parallel_conv1').model.deform_init == 'random'
  assert get('resnet18', 'deform_after_conv1_pretrained_init').model.deform_init == 'pretrained'
  assert get('efficientnet_b0', 'eca').model.attention == 'eca'
  assert get('vit_b16', 'tcel').train.loss == 'tcel'
  assert get('vit_b16', 'tcel_hard').train.loss == 'tcel_hard'
