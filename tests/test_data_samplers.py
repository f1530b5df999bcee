"""Triplet and PK samplers: plan properties, and the pipeline delivers the planned images."""

import numpy as np
import pytest

from flowers_jax import config as config_lib
from flowers_jax import data
from flowers_jax.data import fake
from flowers_jax.data import samplers

# 7 classes of uneven sizes, one singleton class (6).
LABELS = np.array([0] * 9 + [1] * 2 + [2] * 5 + [3] * 7 + [4] * 3 + [5] * 3 + [6] * 1)


@pytest.mark.parametrize('epoch', [0, 1, 5])
def test_triplet_plan(epoch):
  plan = samplers.triplet_plan(LABELS, 6, seed=3, epoch=epoch)
  a, p, n = plan['index'], plan['positive'], plan['negative']
  assert a.shape == p.shape == n.shape == (5, 6)
  np.testing.assert_array_equal(a, samplers.random_plan(LABELS, 6, 3, epoch)['index'])
  assert (LABELS[p] == LABELS[a]).all()
  assert (LABELS[n] != LABELS[a]).all()
  alone = LABELS[a] == 6
  assert ((p != a) | alone).all()  # never itself unless alone in its class


def test_triplet_choices_cover_the_class():
  """Over many epochs the positives of an anchor are uniform over its class-mates."""
  labels = np.array([0] * 4 + [1] * 4)
  seen = {}
  for epoch in range(300):
    plan = samplers.triplet_plan(labels, 8, seed=0, epoch=epoch)
    for a, p, n in zip(*(plan[k].ravel() for k in ('index', 'positive', 'negative'))):
      seen.setdefault(a, []).append((p, n))
  for a, pairs in seen.items():
    pos, neg = np.array(pairs).T
    assert set(pos) == set(np.flatnonzero(labels == labels[a])) - {a}
    assert set(neg) == set(np.flatnonzero(labels != labels[a]))
    counts = np.bincount(pos, minlength=8)[labels == labels[a]]
    counts = counts[counts > 0]
    assert counts.min() > 0.6 * counts.mean()


def test_pk_plan():
  plan = samplers.pk_plan(LABELS, 8, seed=0, epoch=2, k=4)['index']  # P=2, K=4
  assert plan.shape == (len(LABELS) // 8, 8)
  for batch in plan:
    classes = LABELS[batch].reshape(2, 4)
    assert (classes == classes[:, :1]).all()  # K images of each class, class-major
    assert classes[0, 0] != classes[1, 0]  # P distinct classes
    for row in batch.reshape(2, 4):  # without replacement when the class has >= K
      if (LABELS == LABELS[row[0]]).sum() >= 4:
        assert len(set(row)) == 4
  with pytest.raises(ValueError, match='multiple of K=3'):
    samplers.pk_plan(LABELS, 8, 0, 0, k=3)
  with pytest.raises(ValueError, match='P=8 classes.*has 7'):
    samplers.pk_plan(LABELS, 16, 0, 0, k=2)


def test_eval_plan_pads():
  plan = samplers.eval_plan(10, 4)
  np.testing.assert_array_equal(plan['index'].ravel()[:10], np.arange(10))
  np.testing.assert_array_equal(plan['mask'].ravel(), [1] * 10 + [0] * 2)


@pytest.fixture(scope='module')
def fake_ds(tmp_path_factory):
  root = tmp_path_factory.mktemp('fake')
  fake.make_fake_flowers(str(root), num_classes=4, per_class=8, image_size=36, seed=4)
  cfg = config_lib.base_config().data
  cfg.update(dict(source='folder', dir=str(root), image_size=32, pp_train='none'))
  return data.build(cfg, seed=0, process_index=0, process_count=1)


def test_pipeline_delivers_the_planned_triplets(fake_ds):
  """With pp_train='none' every image equals the eval view of its planned example."""
  split = fake_ds.splits['train']
  views = {int(i): im for b in fake_ds.eval_batches('train', 4)
           for i, im, m in zip(b['id'], b['image'], b['mask']) if m}
  plan = fake_ds.train_plan(8, epoch=1, sampler='triplet')
  batches = list(fake_ds.train_batches(8, epoch=1, sampler='triplet'))
  assert len(batches) == 2
  for step, b in enumerate(batches):
    for key, plan_key in [('image', 'index'), ('positive', 'positive'), ('negative', 'negative')]:
      want = np.stack([views[int(split.ids[i])] for i in plan[plan_key][step]])
      np.testing.assert_allclose(b[key], want, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(b['label'], split.labels[plan['index'][step]])
    np.testing.assert_array_equal(b['negative_label'], split.labels[plan['negative'][step]])
    assert (b['negative_label'] != b['label']).all()


def test_pipeline_pk_batches(fake_ds):
  batches = list(fake_ds.train_batches(8, epoch=0, sampler='pk', pk_k=4))
  assert len(batches) == 2
  for b in batches:
    classes = b['label'].reshape(2, 4)
    assert (classes == classes[:, :1]).all() and classes[0, 0] != classes[1, 0]
  with pytest.raises(ValueError, match='Unknown sampler'):
    fake_ds.train_batches(8, 0, sampler='hard')
