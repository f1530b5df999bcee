"""Losses against torch and hand-computed values."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowers_jax import losses

torch = pytest.importorskip('torch')


def _rand(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------- triplet ---


def _triplet_inputs():
  a, p, n = _rand(0, 6, 16), _rand(1, 6, 16), _rand(2, 6, 16)
  p[1] = a[1]                 # identical anchor / positive
  p[2] = a[2] + 1e-6          # a - p + eps == 0 exactly: the sqrt(0) case
  n[3] = a[3] + 5.0           # a satisfied triplet (relu at 0)
  return a, p, n


@pytest.mark.parametrize('margin', [1.0, 0.3])
def test_triplet_margin_matches_torch_value_and_grad(margin):
  a, p, n = _triplet_inputs()
  ta, tp, tn = (torch.tensor(x, requires_grad=True) for x in (a, p, n))
  t_loss = torch.nn.TripletMarginLoss(margin=margin, p=2, eps=1e-6)(ta, tp, tn)
  t_loss.backward()

  loss, grads = jax.value_and_grad(
      lambda *xs: losses.triplet_margin(*xs, margin=margin),
      argnums=(0, 1, 2))(a, p, n)
  np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-5)
  for g, t in zip(grads, (ta, tp, tn)):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-5, atol=1e-7)
  # The sqrt(0) row gets a zero (torch-like) gradient from its positive term.
  np.testing.assert_array_equal(grads[1][2], 0.0)


def test_triplet_margin_mask_excludes_rows():
  a, p, n = _triplet_inputs()
  mask = np.array([1, 1, 0, 1, 0, 1], np.float32)
  keep = mask > 0
  full = losses.triplet_margin(a[keep], p[keep], n[keep])
  np.testing.assert_allclose(losses.triplet_margin(a, p, n, mask=mask), full,
                             rtol=1e-6)


def test_safe_norm_gradient_at_zero():
  g = jax.grad(lambda x: losses.safe_norm(x).sum())(jnp.zeros((2, 3)))
  np.testing.assert_array_equal(g, 0.0)


# ------------------------------------------------------------- batch hard ---


def test_batch_hard_picks_hardest_pairs_exact_value():
  # 1-D embeddings, so distances are |x_i - x_j|.
  emb = np.array([[0.0], [1.0], [3.0], [0.5], [2.0], [10.0]], np.float32)
  labels = np.array([0, 0, 0, 1, 1, 2])
  # anchor 0: hardest pos 3 (to 3.0), hardest neg 0.5 -> relu(1+3-0.5) = 3.5
  # anchor 1: pos max(1, 2) = 2, neg min(0.5, 1) = 0.5   -> 2.5
  # anchor 2: pos 3, neg min(2.5, 1, 7) = 1              -> 3.0
  # anchor 3: pos 1.5, neg min(0.5, .5, 2.5, 9.5) = 0.5  -> 2.0
  # anchor 4: pos 1.5, neg min(2, 1, 1, 8) = 1           -> 1.5
  # anchor 5: no positive -> excluded
  expected = np.mean([3.5, 2.5, 3.0, 2.0, 1.5])
  loss = losses.batch_hard_triplet(emb, labels, margin=1.0)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)

  # Masking row 2 (the far positive of anchors 0/1) changes their mining:
  # anchor 0: pos 1, neg 0.5 -> 1.5; anchor 1: pos 1, neg .5 -> 1.5;
  # anchor 3: pos 1.5, neg 0.5 -> 2.0; anchor 4: pos 1.5, neg 1 -> 1.5.
  mask = np.array([1, 1, 0, 1, 1, 1], np.float32)
  loss = losses.batch_hard_triplet(emb, labels, margin=1.0, mask=mask)
  np.testing.assert_allclose(loss, np.mean([1.5, 1.5, 2.0, 1.5]), rtol=1e-6)


def test_batch_hard_gradient_is_finite_with_duplicates():
  emb = np.array([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0], [3.0, 1.0]], np.float32)
  labels = np.array([0, 0, 1, 1])
  g = jax.grad(losses.batch_hard_triplet)(emb, labels)
  assert np.all(np.isfinite(g))
  # All anchors without a positive or a negative: loss 0, gradient 0.
  g = jax.grad(losses.batch_hard_triplet)(emb, np.zeros(4, np.int32))
  np.testing.assert_array_equal(g, 0.0)


def test_batch_hard_pmap_mines_globally():
  """4 fake CPU devices: pmean of pmap value / grads == global batch."""
  script = textwrap.dedent("""
      import jax, numpy as np
      from flowers_jax import losses
      assert jax.device_count() == 4, jax.devices()
      rng = np.random.default_rng(0)
      x = rng.normal(size=(16, 8)).astype(np.float32)
      w = rng.normal(size=(8, 8)).astype(np.float32)
      labels = rng.integers(0, 5, size=16)
      labels[:4] = [0, 1, 2, 3]     # device 0 has no local positive at all
      mask = np.ones(16, np.float32)
      mask[[5, 9, 10]] = 0
      def loss(w, x, y, m, axis_name=None):
        return losses.batch_hard_triplet(x @ w, y, 0.5, m, axis_name)
      ref, ref_g = jax.value_and_grad(loss)(w, x, labels, mask)
      def step(w, x, y, m):
        l, g = jax.value_and_grad(loss)(w, x, y, m, 'b')
        return jax.lax.pmean(l, 'b'), jax.lax.pmean(g, 'b')
      sh = lambda a: a.reshape(4, 4, *a.shape[1:])
      l, g = jax.pmap(step, axis_name='b', in_axes=(None, 0, 0, 0))(
          w, sh(x), sh(labels), sh(mask))
      local = sum(loss(w, *(a[4 * k:4 * k + 4] for a in (x, labels, mask)))
                  for k in range(4)) / 4
      print('RESULT', float(ref), float(l[0]), float(abs(g[0] - ref_g).max()),
            float(abs(ref_g).max()), float(local))
  """)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', script], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [x for x in out.stdout.splitlines() if x.startswith('RESULT')][0]
  ref, got, grad_diff, grad_scale, local_only = map(float, line.split()[1:])
  assert ref > 0
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  assert grad_diff <= 1e-5 * grad_scale
  assert abs(local_only - ref) > 1e-3   # local-only mining would differ


# ------------------------------------------------------------ cross entropy --


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_cross_entropy_matches_torch(smoothing):
  logits, labels = _rand(3, 8, 10) * 3, np.arange(8) % 10
  ref = torch.nn.functional.cross_entropy(
      torch.tensor(logits), torch.tensor(labels), label_smoothing=smoothing)
  got = losses.cross_entropy(logits, labels, label_smoothing=smoothing)
  np.testing.assert_allclose(got, ref.item(), rtol=1e-5)


def test_cross_entropy_mask_ignores_padded_rows():
  logits, labels = _rand(4, 8, 10), np.arange(8) % 10
  mask = np.array([1, 1, 1, 0, 1, 0, 1, 1], np.float32)
  padded = logits.copy()
  padded[mask == 0] = 1e4    # garbage in padded rows must not leak
  ref = torch.nn.functional.cross_entropy(
      torch.tensor(logits[mask > 0]), torch.tensor(labels[mask > 0]),
      label_smoothing=0.1)
  got = losses.cross_entropy(padded, labels, mask, label_smoothing=0.1)
  np.testing.assert_allclose(got, ref.item(), rtol=1e-5)
  assert float(losses.cross_entropy(logits, labels, np.zeros(8))) == 0.0


# ---------------------------------------------------------------- compute ---


def _outputs_and_batch():
  b, c, d = 6, 5, 4
  outputs = {'logits': _rand(5, b, c), 'embedding': _rand(6, b, d),
             'positive_embedding': _rand(7, b, d),
             'negative_embedding': _rand(8, b, d)}
  batch = {'label': np.array([0, 1, 0, 1, 2, 2]),
           'mask': np.array([1, 1, 1, 1, 1, 0], np.float32)}
  return outputs, batch


def test_compute_combines_terms():
  cfg = ml_collections.ConfigDict(dict(label_smoothing=0.1, triplet_margin=0.7,
                                       triplet_weight=0.5))
  o, b = _outputs_and_batch()
  ce = losses.cross_entropy(o['logits'], b['label'], b['mask'], 0.1)
  tri = losses.triplet_margin(o['embedding'], o['positive_embedding'],
                              o['negative_embedding'], 0.7, mask=b['mask'])
  hard = losses.batch_hard_triplet(o['embedding'], b['label'], 0.7, b['mask'])
  expected = {'ce': ce, 'triplet': tri, 'tcel': ce + 0.5 * tri,
              'tcel_hard': ce + 0.5 * hard}
  assert set(losses.LOSSES) == set(expected)
  for name in losses.LOSSES:
    loss, aux = losses.compute(name, cfg, o, b)
    np.testing.assert_allclose(loss, expected[name], rtol=1e-6)
    assert all(np.shape(v) == () for v in aux.values())


def test_compute_unknown_loss_lists_valid_names():
  o, b = _outputs_and_batch()
  with pytest.raises(ValueError, match='tcel_hard'):
    losses.compute('focal', ml_collections.ConfigDict(), o, b)


def test_every_loss_names_its_batch_inputs_and_sampler():
  from flowers_jax.data import samplers
  for loss in losses.LOSSES.values():
    assert loss.sampler in samplers.SAMPLERS, loss
    assert set(loss.extra_inputs) <= {'positive', 'negative'}, loss
  assert losses.get('tcel_hard').sampler == 'pk' and losses.get('tcel').sampler == 'triplet'
  assert losses.get('tcel').extra_inputs == ('positive', 'negative')
  assert losses.get('ce').extra_inputs == ()


def test_a_registered_loss_is_trainable_by_name():
  @losses.register('test_only_half_ce')
  def half_ce(cfg, outputs, batch, axis_name):
    del axis_name
    ce = losses.cross_entropy(outputs['logits'], batch['label'], batch.get('mask'))
    return 0.5 * ce, {'ce': ce}
  try:
    o, b = _outputs_and_batch()
    loss, aux = losses.compute('test_only_half_ce', None, o, b)
    np.testing.assert_allclose(loss, 0.5 * aux['ce'], rtol=1e-6)
    with pytest.raises(ValueError, match='twice'):
      losses.register('test_only_half_ce')(half_ce)
  finally:
    del losses.LOSSES['test_only_half_ce']
