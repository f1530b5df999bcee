"""flowers_jax.ema against timm's ModelEmaV3 (get_decay and update)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowers_jax import ema

torch = pytest.importorskip('torch')
model_ema = pytest.importorskip('timm.utils.model_ema')

STEPS = list(range(51)) + [100, 1000, 10_000, 31_623, 1_000_000, 10_000_000]
SETTINGS = [
    dict(decay=0.9999),
    dict(decay=0.998, warmup_gamma=2.0, warmup_power=0.75, min_decay=0.3, update_after_step=5),
    dict(decay=0.99, warmup=False, update_after_step=3),
]


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _timm_ema(model, kw):
  kw = dict(kw)
  return model_ema.ModelEmaV3(model, use_warmup=kw.pop('warmup', True), **kw)


@pytest.mark.parametrize('kw', SETTINGS)
def test_decay_at_matches_timm(kw):
  ref = _timm_ema(torch.nn.Linear(1, 1), kw)
  want = np.array([ref.get_decay(s) for s in STEPS])
  got = jax.jit(lambda s: ema.decay_at(s, **kw))(jnp.asarray(STEPS))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-7)
  np.testing.assert_array_equal(got[:2], 0.0)  # steps 0 and 1: the EMA copies the weights
  with jax.enable_x64(True):
    got64 = jax.jit(lambda s: ema.decay_at(s, **kw))(jnp.asarray(STEPS))
    assert got64.dtype == jnp.float64
    np.testing.assert_allclose(got64, want, rtol=0, atol=1e-15)
    assert float(ema.decay_at(STEPS[-1], **kw)) == want[-1]


def _state(model):
  return {k: jnp.asarray(v.detach().numpy()) for k, v in model.state_dict().items()}


@pytest.mark.parametrize('decay', [0.8, 0.9999])
def test_update_matches_timm(x64, decay):
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).double()
  ref = model_ema.ModelEmaV3(model, decay=decay, use_warmup=True)
  ours = _state(model)
  capped = False
  for step in range(20):
    with torch.no_grad():  # move the weights, then update the BatchNorm statistics
      for p in model.parameters():
        p.add_(torch.randn_like(p))
    model.train()
    model(torch.randn(8, 4, dtype=torch.float64) * (step + 1))
    ref.update(model, step=step)
    d = ema.decay_at(step, decay=decay)
    capped |= float(d) == decay
    ours = ema.update(ours, _state(model), d)
    want = _state(ref.module)
    assert set(ours) == set(want)
    for k, v in want.items():
      assert ours[k].dtype == v.dtype, k
      if jnp.issubdtype(v.dtype, jnp.floating):
        np.testing.assert_allclose(ours[k], v, rtol=0, atol=1e-12, err_msg=k)
      else:
        np.testing.assert_array_equal(ours[k], v, err_msg=k)  # num_batches_tracked: copied
  assert int(ours['1.num_batches_tracked']) == 20
  assert capped == (decay == 0.8)
  # The EMA is not the model (the test would pass trivially with decay 0).
  assert not np.allclose(ours['0.weight'], _state(model)['0.weight'])


def test_update_dtypes():
  e = {'w': jnp.ones(3, jnp.bfloat16), 'f': jnp.zeros(2), 'n': jnp.array(1, jnp.int32)}
  x = {'w': jnp.full(3, 2.0, jnp.bfloat16), 'f': jnp.ones(2), 'n': jnp.array(5, jnp.int32)}
  out = jax.jit(ema.update)(e, x, jnp.float32(0.75))
  assert jax.tree.map(lambda a: a.dtype, out) == jax.tree.map(lambda a: a.dtype, e)
  np.testing.assert_array_equal(out['w'], np.full(3, 1.25, np.float32))
  np.testing.assert_array_equal(out['f'], np.full(2, 0.25, np.float32))
  assert int(out['n']) == 5
