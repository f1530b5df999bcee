"""BatchNorm and LayerNorm numerics against torch, in the cases where Flax's defaults differ.

- BatchNorm's running variance takes the unbiased batch variance (x n/(n-1)), like torch, also
  when the batch statistics are averaged over pmap devices (n = rows of the global batch).
- Variances in two passes: a channel (token) whose mean is 100x its std loses digits in
  E[x^2] - E[x]^2 (measured 6.7e-3 off torch for LayerNorm, 2.3e-5 two-pass).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowers_jax.models import vit
from flowers_jax.models.layers.norm import BatchNorm

torch = pytest.importorskip('torch')


def _batchnorm_step(x: np.ndarray, axis_name=None):
  """One training-mode BatchNorm call on x [B, H, W, C]: (output, new running mean, var)."""
  bn = BatchNorm(use_running_average=False, axis_name=axis_name)
  variables = bn.init(jax.random.key(0), x[:1])
  y, upd = bn.apply(variables, x, mutable=['batch_stats'])
  return y, upd['batch_stats']['mean'], upd['batch_stats']['var']


def _torch_batchnorm_step(x: np.ndarray):
  bn = torch.nn.BatchNorm2d(x.shape[-1])
  bn.train()
  with torch.no_grad():
    y = bn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
  return y.numpy(), bn.running_mean.numpy(), bn.running_var.numpy()


def test_batchnorm_train_step_equals_torch_on_1x1_maps():
  """1x1 maps (ResNet18's layer4 at 32 px): n = B = 4, so a biased update is off by 4/3."""
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(4, 1, 1, 8)).astype(np.float32)
  got = _batchnorm_step(x)
  want = _torch_batchnorm_step(x)
  for name, g, w in zip(('output', 'running_mean', 'running_var'), got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_batchnorm_under_pmap_uses_the_global_batch():
  """4 devices x 2 rows: the statistics and the n/(n-1) factor are those of the 8 rows."""
  x = np.random.default_rng(1).normal(0.5, 2.0, size=(8, 2, 2, 3)).astype(np.float32)
  n = jax.local_device_count()
  assert n == 4, 'tests/conftest.py sets 4 fake CPU devices'
  step = jax.pmap(lambda xs: _batchnorm_step(xs, axis_name='batch'), axis_name='batch')
  y, mean, var = step(x.reshape(n, -1, *x.shape[1:]))
  want_y, want_mean, want_var = _torch_batchnorm_step(x)
  np.testing.assert_allclose(np.asarray(y).reshape(x.shape), want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(mean)[0], want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(var)[0], want_var, rtol=1e-5, atol=1e-6)


def test_batchnorm_variance_is_two_pass():
  """Channel mean 1000x its std: one-pass variance in float32 is mostly round-off."""
  x = (1000.0 + np.random.default_rng(2).normal(size=(16, 4, 4, 2))).astype(np.float32)
  _, _, var = _batchnorm_step(x)
  _, _, want = _torch_batchnorm_step(x)
  np.testing.assert_allclose(np.asarray(var), want, rtol=1e-3)


def test_vit_layernorm_two_pass_equals_torch_at_large_mean():
  """A token whose mean is 100x its std: Flax's fast variance is off by ~7e-3."""
  d = 768
  x = (100.0 + np.random.default_rng(3).normal(size=(2, 5, d))).astype(np.float32)
  ln = vit.layer_norm_(jnp.float32, 'ln')
  variables = ln.init(jax.random.key(0), x)
  got = np.asarray(ln.apply(variables, x))
  want = torch.nn.LayerNorm(d, eps=vit.LN_EPS)(torch.from_numpy(x)).detach().numpy()
  assert np.abs(got - want).max() < 1e-4
