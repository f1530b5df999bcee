"""Per-parameter lr multipliers (layer-wise lr decay, lr_mults) and zero_head."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tree_util
from flowers_jax import models, optim
from flowers_jax.config import base_config
from flowers_jax.models import vit


def _cfg(**kw):
  cfg = base_config().optim
  cfg.update(dict(lr=0.1, momentum=0.0, weight_decay=0.0, schedule='constant'), **kw)
  return cfg


def _flax_vit(depth, width=64):
  """A Flax ViT of `depth` blocks at 32 px (params from eval_shape: shapes only)."""
  model = vit.VisionTransformer(10, 32, patch_size=16, hidden_dim=width, num_layers=depth,
                                num_heads=2, mlp_dim=2 * width)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))['params']


# Flax ViT path -> timm VisionTransformer parameter-name prefix.
_TO_TIMM = (
    (r'^class_token$', 'cls_token'),
    (r'^encoder/pos_embedding$', 'pos_embed'),
    (r'^conv_proj/', 'patch_embed.proj.'),
    (r'^encoder/layers/encoder_layer_(\d+)/', r'blocks.\1.'),
    (r'^encoder/ln/', 'norm.'),
    (r'^heads/head/', 'head.'),
)


def _timm_prefix(path):
  for regex, prefix in _TO_TIMM:
    if m := re.search(regex, path):
      return m.expand(prefix)
  raise AssertionError(f'no timm name for {path}')


# ------------------------------------------------------------ layer decay ---


@pytest.mark.parametrize('depth', [3])
def test_layer_decay_matches_timm(depth):
  torch = pytest.importorskip('torch')
  timm_vit = pytest.importorskip('timm.models.vision_transformer')
  from timm.optim._param_groups import param_groups_layer_decay
  torch.manual_seed(0)
  model = timm_vit.VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=depth,
                                     num_heads=2, num_classes=10)
  groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
  by_id = {id(p): g['lr_scale'] for g in groups for p in g['params']}
  timm_scales = {n: by_id[id(p)] for n, p in model.named_parameters()}
  assert len(set(timm_scales.values())) == depth + 2  # stem, blocks (+ final norm), head

  params = _flax_vit(depth)
  ours = tree_util.flat(optim.lr_scales(params, _cfg(layer_decay=0.75), 'vit_b16'))
  covered = set()
  for path, scale in ours.items():
    prefix = _timm_prefix(path)
    theirs = {s for n, s in timm_scales.items() if n.startswith(prefix)}
    covered |= {n for n in timm_scales if n.startswith(prefix)}
    assert len(theirs) == 1, (path, prefix, theirs)
    np.testing.assert_allclose(float(scale), theirs.pop(), rtol=1e-12, err_msg=path)
  assert covered == set(timm_scales)  # every timm parameter has a Flax counterpart
  # Stem 0.75^(depth+1), block i 0.75^(depth-i), head 1; timm's final norm joins the last
  # block's group (MATCH_PREV_GROUP), 0.75^1 (BEiT / MAE would give it 1).
  assert ours['class_token'] == 0.75 ** (depth + 1)
  assert ours['encoder/layers/encoder_layer_0/mlp/0/kernel'] == 0.75 ** depth
  assert ours['encoder/ln/scale'] == ours[f'encoder/layers/encoder_layer_{depth - 1}/ln_1/scale']
  assert ours['encoder/ln/scale'] == 0.75
  assert ours['heads/head/kernel'] == 1.0


def test_layer_decay_depth_comes_from_params():
  scales = tree_util.flat(optim.lr_scales(_flax_vit(2), _cfg(layer_decay=0.5), 'vit_l16'))
  assert scales['conv_proj/kernel'] == 0.125
  assert scales['encoder/layers/encoder_layer_1/ln_1/scale'] == 0.5


def test_layer_decay_refused_for_models_without_layer_ids():
  params = {'fc': {'kernel': jnp.ones((2, 2))}}
  for name in ('resnet18', None):
    with pytest.raises(ValueError, match=r"only models \['vit_b16', 'vit_b32', 'vit_l16'\]"):
      optim.make_optimizer(_cfg(layer_decay=0.75), params, total_steps=10, model_name=name)
  with pytest.raises(ValueError, match='ViT blocks'):  # a ViT name on non-ViT params
    optim.lr_scales(params, _cfg(layer_decay=0.75), 'vit_b16')


# ---------------------------------------------------------------- lr_mults ---


@pytest.mark.parametrize('spec, match', [
    ('heads/=10,[bad=2', "regex '\\[bad' does not compile"),
    ('heads/10', "entry 'heads/10' has no '='"),
    ('heads/=0', "multiplier '0' is not a positive"),
    ('heads/=-1', "multiplier '-1' is not a positive"),
    ('heads/=inf', "multiplier 'inf' is not a positive"),
    ('heads/=ten', "multiplier 'ten' is not a positive"),
    ('=2', 'empty regex'),
    ('heads/=2, ^nope/=3', "regex '\\^nope/' matches no parameter path"),
])
def test_lr_mults_errors_are_one_line(spec, match):
  params = {'heads': {'kernel': jnp.ones((2, 2))}, 'stem': {'kernel': jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match=match) as err:
    optim.lr_scales(params, _cfg(lr_mults=spec))
  assert '\n' not in str(err.value) and "'regex=mult,regex=mult'" in str(err.value)


def test_lr_mults_first_match_wins_and_multiplies_layer_decay():
  params = _flax_vit(2)
  cfg = _cfg(layer_decay=0.5, lr_mults=' ^heads/head/kernel = 3 , ^heads/=10,bias$=2 ')
  assert optim.parse_lr_mults(cfg.lr_mults) == [
      ('^heads/head/kernel', 3.0), ('^heads/', 10.0), ('bias$', 2.0)]
  scales = tree_util.flat(optim.lr_scales(params, cfg, 'vit_b16'))
  assert scales['heads/head/kernel'] == 3.0
  assert scales['heads/head/bias'] == 10.0                  # '^heads/' before 'bias$'
  assert scales['conv_proj/bias'] == 2.0 * 0.125
  assert scales['conv_proj/kernel'] == 0.125
  assert scales['encoder/layers/encoder_layer_1/mlp/0/bias'] == 2.0 * 0.5
  assert optim.parse_lr_mults('') == [] and optim.parse_lr_mults(' , ') == []
  summary = optim.describe_lr_scales(optim.lr_scales(params, cfg, 'vit_b16'))
  assert summary.startswith('lr multipliers x0.125..x10 in ') and '\n' not in summary
  assert optim.describe_lr_scales(optim.lr_scales(params, _cfg())) == (
      'lr multipliers: none (all x1)')


# --------------------------------------------------- optimizer vs torch ---


def _two_layer_vit_params(dtype):
  """A tiny ViT-named params dict with 2 blocks (every kind of leaf the ViT has)."""
  rng = np.random.default_rng(0)
  n = lambda *s: jnp.asarray(rng.normal(size=s), dtype)
  block = lambda: {'ln_1': {'scale': n(4), 'bias': n(4)},
                   'mlp': {'0': {'kernel': n(4, 8), 'bias': n(8)}}}
  return {
      'class_token': n(1, 1, 4),
      'conv_proj': {'kernel': n(2, 2, 3, 4), 'bias': n(4)},
      'encoder': {'pos_embedding': n(1, 5, 4),
                  'layers': {'encoder_layer_0': block(), 'encoder_layer_1': block()},
                  'ln': {'scale': n(4), 'bias': n(4)}},
      'heads': {'head': {'kernel': n(4, 3), 'bias': n(3)}},
  }


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_scaled_optimizer_matches_torch_param_groups(name):
  """3 steps == torch SGD(momentum, nesterov) / AdamW with one param group per leaf at
  lr * scale, weight decay included (torch scales the decay by the group's lr too)."""
  torch = pytest.importorskip('torch')
  lr, wd = 0.05, 0.1
  cfg = _cfg(name=name, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd, clip_norm=0.0,
             layer_decay=0.6, lr_mults='^heads/=10,ln_1/=3')
  no_decay = models.spec('vit_b16').no_weight_decay
  with jax.enable_x64(True):
    params = _two_layer_vit_params(jnp.float64)
    tx = optim.make_optimizer(cfg, params, total_steps=10, no_decay=no_decay,
                              model_name='vit_b16')
    scales = {k: float(v) for k, v in
              tree_util.flat(optim.lr_scales(params, cfg, 'vit_b16')).items()}
    assert len(set(scales.values())) >= 5
    rng = np.random.default_rng(1)
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape), params) for _ in range(3)]
    state, new = tx.init(params), params
    for g in grads:
      updates, state = tx.update(g, state, new)
      new = optax.apply_updates(new, updates)
    new = tree_util.flat(new)

  flat = tree_util.flat(params)
  tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in flat.items()}
  decayed = lambda k: flat[k].ndim > 1 and not re.search(no_decay, k)
  groups = [{'params': [t], 'lr': lr * scales[k], 'weight_decay': wd if decayed(k) else 0.0}
            for k, t in tp.items()]
  if name == 'sgd':
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
  else:
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
  for g in grads:
    for k, v in tree_util.flat(g).items():
      tp[k].grad = torch.tensor(v, dtype=torch.float64)
    opt.step()
  for k, v in new.items():
    np.testing.assert_allclose(v, tp[k].detach().numpy(), rtol=1e-12, atol=1e-12, err_msg=k)
    assert not np.allclose(v, flat[k]), k


def test_scaling_with_freezing_and_unchanged_state_when_off():
  params = _two_layer_vit_params(jnp.float32)
  kw = dict(total_steps=10, freeze='^conv_proj/', head_pattern=vit.HEAD, model_name='vit_b16')
  tx = optim.make_optimizer(_cfg(name='adamw', layer_decay=0.5), params, **kw)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  plain = optim.make_optimizer(_cfg(name='adamw'), params, **kw)
  ref, _ = plain.update(grads, plain.init(params), params)
  scales = tree_util.flat(optim.lr_scales(params, _cfg(layer_decay=0.5), 'vit_b16'))
  for k, u in tree_util.flat(updates).items():
    expected = 0 if k.startswith('conv_proj/') else scales[k] * tree_util.flat(ref)[k]
    np.testing.assert_allclose(u, expected, rtol=1e-6, err_msg=k)
  # Off (the defaults): the very transform of before, so old opt_states still restore.
  assert jax.tree.structure(plain.init(params)) == jax.tree.structure(
      optim.make_optimizer(_cfg(name='adamw'), params, total_steps=10, freeze='^conv_proj/',
                           head_pattern=vit.HEAD).init(params))
  assert isinstance(plain.init(params), optax.MultiTransformState)


# --------------------------------------------------------------- zero_head ---


@pytest.mark.parametrize('name', ['resnet18', 'efficientnet_b0', 'vit_b16'])
def test_zero_head_zeros_exactly_the_head(name):
  spec = models.spec(name)
  options = {'image_size': 32} if name.startswith('vit') else {}
  model = models.create(name, num_classes=10, **options)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))['params']
  params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
  out = tree_util.flat(optim.zero_head(params, spec.head))
  head = [k for k in out if re.search(spec.head, k)]
  assert sorted(k.rsplit('/', 1)[1] for k in head) == ['bias', 'kernel'], head
  for k, v in tree_util.flat(params).items():
    np.testing.assert_array_equal(out[k], 0 if k in head else v, err_msg=k)
    assert out[k].shape == v.shape and out[k].dtype == v.dtype
  with pytest.raises(ValueError, match="head pattern '\\^nohead/' matches no parameter"):
    optim.zero_head(params, '^nohead/')
