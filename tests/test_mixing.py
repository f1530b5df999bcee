"""flowers_jax.mixing against timm's Mixup(mode='batch') and SoftTargetCrossEntropy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from flowers_jax import mixing

torch = pytest.importorskip('torch')
timm_mixup = pytest.importorskip('timm.data.mixup')
timm_loss = pytest.importorskip('timm.loss')

H, W, C, B, K = 12, 10, 3, 6, 5  # H != W so that swapped axes show
N_DRAWS = 2000


def _draws(n, **kw):
  keys = jax.random.split(jax.random.key(0), n)
  p = jax.vmap(functools.partial(mixing.mix_params, image_hw=(H, W), **kw))(keys)
  return jax.tree.map(np.asarray, p)


class _FakeNumpyRandom:
  """numpy.random.rand / beta / randint returning the draws of our `mix_params`, in the order
  timm's `_params_per_batch` and `rand_bbox` call them; checks the arguments timm passes."""

  def __init__(self, params, mixup_alpha, cutmix_alpha):
    use_cutmix = bool(params['use_cutmix'])
    both = mixup_alpha > 0 and cutmix_alpha > 0
    # 1st rand: `rand() < mix_prob` (1.0); 2nd (both alphas): `rand() < switch_prob`.
    self.rands = [0.0] + ([-1.0 if use_cutmix else 2.0] if both else [])
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    self.betas = [((alpha, alpha), float(params['lam_beta']))]
    cy, cx = (int(v) for v in params['centre'])
    self.randints = [((0, H), cy), ((0, W), cx)] if use_cutmix else []

  def rand(self, *shape):
    assert shape == ()
    return self.rands.pop(0)

  def beta(self, a, b, size=None):
    assert size is None
    args, value = self.betas.pop(0)
    assert (a, b) == args
    return value

  def randint(self, low, high, size=None):
    assert size is None
    args, value = self.randints.pop(0)
    assert (low, high) == args
    return value

  def consumed(self):
    return not (self.rands or self.betas or self.randints)


@pytest.mark.parametrize('mixup_alpha,cutmix_alpha,switch_prob,smoothing', [
    (0.8, 1.0, 0.5, 0.1), (0.2, 0.0, 0.5, 0.0), (0.0, 1.0, 0.5, 0.1), (1.0, 0.3, 0.7, 0.2)])
def test_apply_matches_timm(monkeypatch, mixup_alpha, cutmix_alpha, switch_prob, smoothing):
  rng = np.random.default_rng(0)
  kinds = set()
  for seed in range(12):
    params = mixing.mix_params(jax.random.key(seed), mixup_alpha=mixup_alpha,
                               cutmix_alpha=cutmix_alpha, switch_prob=switch_prob,
                               image_hw=(H, W))
    params = jax.tree.map(np.asarray, params)
    kinds.add(bool(params['use_cutmix']))
    x = rng.normal(size=(B, C, H, W)).astype(np.float32)
    labels = rng.integers(0, K, size=B)

    fake = _FakeNumpyRandom(params, mixup_alpha, cutmix_alpha)
    for name in ('rand', 'beta', 'randint'):
      monkeypatch.setattr(np.random, name, getattr(fake, name))
    boxes = []
    orig_bbox = timm_mixup.cutmix_bbox_and_lam
    monkeypatch.setattr(timm_mixup, 'cutmix_bbox_and_lam',
                        lambda *a, boxes=boxes, orig=orig_bbox, **k:
                        boxes.append(orig(*a, **k)) or boxes[-1])
    mixer = timm_mixup.Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                             switch_prob=switch_prob, label_smoothing=smoothing,
                             num_classes=K, mode='batch')
    want_x, want_t = mixer(torch.from_numpy(x.copy()), torch.from_numpy(labels))
    monkeypatch.undo()
    assert fake.consumed()

    if params['use_cutmix']:
      (box, lam), = boxes
      assert tuple(int(b) for b in params['box']) == tuple(int(b) for b in box)
      np.testing.assert_allclose(params['lam'], lam, rtol=0, atol=1e-7)
    else:
      assert not boxes
    images = jnp.asarray(x.transpose(0, 2, 3, 1))
    targets = mixing.smooth_one_hot(jnp.asarray(labels), K, smoothing)
    got_x, got_t = mixing.apply(params, images, targets)
    np.testing.assert_allclose(np.asarray(got_x).transpose(0, 3, 1, 2), want_x.numpy(),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_t, want_t.numpy(), rtol=0, atol=1e-6)
    # mix_batch draws the same parameters from the same key.
    got_x2, got_t2 = mixing.mix_batch(
        jax.random.key(seed), images, jnp.asarray(labels), K, mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha, switch_prob=switch_prob, label_smoothing=smoothing)
    np.testing.assert_array_equal(got_x2, got_x)
    np.testing.assert_array_equal(got_t2, got_t)
  assert kinds == ({True, False} if mixup_alpha and cutmix_alpha else {bool(cutmix_alpha)})


def test_cutmix_box_matches_timm(monkeypatch):
  """The box and corrected lam of timm's cutmix_bbox_and_lam for the same lam and centre,
  including lams where float32 and timm's float64 sqrt(1 - lam) floor differently."""
  rng = np.random.default_rng(1)
  # 4 float32 ulps either side of the lams where int(H sqrt(1 - lam)) or int(W sqrt(1 - lam))
  # steps. At the edges themselves timm's float64 result is rounding noise, as is ours within
  # ~2 ulps; a random draw lands that close with probability ~1e-6.
  edges = np.concatenate([1 - (np.arange(n + 1) / n) ** 2 for n in (H, W)]).astype(np.float32)
  up, down = edges, edges
  for _ in range(4):
    up, down = np.nextafter(up, np.float32(2)), np.nextafter(down, np.float32(-1))
  edges = np.concatenate([up, down])
  tiny = [0.0, 2.0**-54, 2.0**-53, 1e-19, 1e-16, 1e-12, 5.3e-9, 3e-8, 6e-8]
  lams = np.concatenate([rng.beta(0.1, 0.1, 3000), tiny, 1 - np.float32(tiny), edges])
  lams = np.clip(lams, 0, 1).astype(np.float32)
  cy, cx = rng.integers(0, H, lams.size), rng.integers(0, W, lams.size)
  box, lam = jax.vmap(lambda *a: mixing.cutmix_box(*a, (H, W)))(lams, cy, cx)
  box, lam = np.stack(box, 1), np.asarray(lam)
  for i, v in enumerate(lams):
    centre = iter((cy[i], cx[i]))
    monkeypatch.setattr(np.random, 'randint',
                        lambda low, high, size=None, centre=centre: next(centre))
    want_box, want_lam = timm_mixup.cutmix_bbox_and_lam((C, H, W), float(v))
    assert tuple(box[i]) == tuple(int(b) for b in want_box), (i, v)
    assert abs(lam[i] - want_lam) <= 2**-24, (i, v)


def test_lam_is_beta():
  p = _draws(N_DRAWS, mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=0.5)
  cut = p['use_cutmix']
  mix_lam, cut_lam = p['lam_beta'][~cut], p['lam_beta'][cut]
  assert scipy.stats.kstest(mix_lam, 'beta', args=(0.4, 0.4)).pvalue > 1e-3
  assert scipy.stats.kstest(cut_lam, 'beta', args=(1.0, 1.0)).pvalue > 1e-3
  # The test has power: the swapped alphas are rejected.
  assert scipy.stats.kstest(mix_lam, 'beta', args=(1.0, 1.0)).pvalue < 1e-3
  assert scipy.stats.kstest(cut_lam, 'beta', args=(0.4, 0.4)).pvalue < 1e-3
  np.testing.assert_array_equal(p['lam'][~cut], mix_lam)
  p = _draws(N_DRAWS, mixup_alpha=0.2, cutmix_alpha=0.0, switch_prob=0.5)
  assert scipy.stats.kstest(p['lam_beta'], 'beta', args=(0.2, 0.2)).pvalue > 1e-3
  assert scipy.stats.kstest(p['lam_beta'], 'beta', args=(0.3, 0.3)).pvalue < 1e-3
  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)) = 0.0893 for a = 0.2.
  assert abs(p['lam_beta'].mean() - 0.5) < 0.03  # 4.5 sigma: sqrt(0.0893 / 2000) = 0.0067
  assert abs(p['lam_beta'].var() - 1 / (4 * 1.4)) < 0.01


@pytest.mark.parametrize('switch_prob', [0.2, 0.5, 0.9])
def test_cutmix_probability(switch_prob):
  frac = _draws(N_DRAWS, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=switch_prob)[
      'use_cutmix'].mean()
  assert abs(frac - switch_prob) < 0.05  # 4.5 sigma at 2000 draws: sqrt(1/4 / 2000) = 0.011


def test_one_kind_only():
  assert _draws(50, mixup_alpha=0.0, cutmix_alpha=1.0, switch_prob=0.5)['use_cutmix'].all()
  p = _draws(50, mixup_alpha=1.0, cutmix_alpha=0.0, switch_prob=0.5)
  assert not p['use_cutmix'].any()
  assert all((b == 0).all() for b in p['box'])


def test_box_area_is_corrected_lam():
  p = _draws(N_DRAWS, mixup_alpha=0.0, cutmix_alpha=1.0, switch_prob=0.5)
  y0, y1, x0, x1 = p['box']
  assert ((0 <= y0) & (y0 <= y1) & (y1 <= H) & (0 <= x0) & (x0 <= x1) & (x1 <= W)).all()
  area = (y1 - y0) * (x1 - x0)
  # The box area is the corrected lam's exactly; lam itself is within 1 float32 ulp of
  # 1 - area / (H W) (XLA's CPU float32 division is not correctly rounded: x / 120 differs from
  # numpy's by 1 ulp for 76 of x = 0..120; measured max difference 6e-8).
  np.testing.assert_array_equal(np.rint((1 - p['lam'].astype(np.float64)) * H * W), area)
  np.testing.assert_allclose(p['lam'], 1 - area / (H * W), rtol=0, atol=2**-24)
  # Unclipped boxes are int(H sqrt(1 - lam)) x int(W sqrt(1 - lam)) (timm's rand_bbox).
  ratio = np.sqrt(1.0 - p['lam_beta'].astype(np.float64))
  cut_h, cut_w = (H * ratio).astype(int), (W * ratio).astype(int)
  cy, cx = p['centre']
  inside = ((cy - cut_h // 2 >= 0) & (cy + (cut_h + 1) // 2 <= H)
            & (cx - cut_w // 2 >= 0) & (cx + (cut_w + 1) // 2 <= W))
  assert inside.sum() > 100
  np.testing.assert_array_equal((y1 - y0)[inside], cut_h[inside])
  np.testing.assert_array_equal((x1 - x0)[inside], cut_w[inside])
  # The centre is uniform over the pixels.
  assert set(cy.tolist()) == set(range(H)) and set(cx.tolist()) == set(range(W))
  assert scipy.stats.chisquare(np.bincount(cy, minlength=H)).pvalue > 1e-3


def test_no_mixing_when_alphas_zero():
  images = jax.random.normal(jax.random.key(1), (B, H, W, C))
  labels = jnp.arange(B) % K
  got_x, got_t = mixing.mix_batch(jax.random.key(2), images, labels, K, mixup_alpha=0.0,
                                  cutmix_alpha=0.0, switch_prob=0.5, label_smoothing=0.1)
  np.testing.assert_array_equal(got_x, images)
  want = timm_mixup.mixup_target(torch.from_numpy(np.array(labels)), K, 1.0, 0.1)
  assert got_t.dtype == jnp.float32
  np.testing.assert_array_equal(got_t, want.numpy())
  np.testing.assert_allclose(got_t[0], [0.92, 0.02, 0.02, 0.02, 0.02], rtol=1e-6)


def test_jit():
  images = jax.random.normal(jax.random.key(1), (B, H, W, C)).astype(jnp.bfloat16)
  labels = jnp.arange(B) % K
  kw = dict(num_classes=K, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
            label_smoothing=0.1)
  step = jax.jit(functools.partial(mixing.mix_batch, **kw))
  for seed in range(4):
    got = step(jax.random.key(seed), images, labels)
    want = mixing.mix_batch(jax.random.key(seed), images, labels, **kw)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32),
                               atol=1e-2)
    np.testing.assert_allclose(got[1], want[1], atol=1e-6)
  assert step._cache_size() == 1


def test_pmap_pairing():
  n = jax.local_device_count()
  if n < 2:
    pytest.skip('needs several devices')
  images = jax.random.normal(jax.random.key(1), (2 * n, H, W, C))
  targets = mixing.smooth_one_hot(jnp.arange(2 * n) % K, K)
  shard = lambda x: x.reshape(n, 2, *x.shape[1:])
  for seed in range(4):
    params = mixing.mix_params(jax.random.key(seed), mixup_alpha=0.8, cutmix_alpha=1.0,
                               switch_prob=0.5, image_hw=(H, W))
    want = mixing.apply(params, images, targets)
    got = jax.pmap(functools.partial(mixing.apply, axis_name='d'), axis_name='d',
                   in_axes=(None, 0, 0))(params, shard(images), shard(targets))
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, shard(w), rtol=0, atol=1e-6)
    # axis_name=None: rows pair within each device's shard.
    local = jax.pmap(mixing.apply, in_axes=(None, 0, 0))(params, shard(images), shard(targets))
    for d in range(n):
      want_d = mixing.apply(params, shard(images)[d], shard(targets)[d])
      for g, w in zip(local, want_d):
        np.testing.assert_allclose(g[d], w, rtol=0, atol=1e-6)


def test_soft_cross_entropy_matches_timm():
  images = jax.random.normal(jax.random.key(1), (B, H, W, C))
  _, targets = mixing.mix_batch(jax.random.key(3), images, jnp.arange(B) % K, K,
                                mixup_alpha=0.8, cutmix_alpha=0.0, switch_prob=0.5,
                                label_smoothing=0.1)
  logits = np.random.default_rng(0).normal(size=(B, K)) * 3
  loss_fn = timm_loss.SoftTargetCrossEntropy()
  want = loss_fn(torch.from_numpy(logits), torch.from_numpy(np.asarray(targets, np.float64)))
  got = mixing.soft_cross_entropy(jnp.asarray(logits, jnp.float32), targets)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want.item(), rtol=1e-6)
  assert mixing.soft_cross_entropy(jnp.asarray(logits, jnp.bfloat16), targets).dtype == (
      jnp.float32)
  with jax.enable_x64(True):
    got64 = mixing.soft_cross_entropy(jnp.asarray(logits, jnp.float64),
                                      jnp.asarray(targets, jnp.float64))
    assert got64.dtype == jnp.float64
    np.testing.assert_allclose(got64, want.item(), rtol=1e-12)
