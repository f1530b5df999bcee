"""Transforms against torchvision: eval preset pixels, crop geometry, RandomResizedCrop."""

import numpy as np
import pytest
from PIL import Image

from flowers_jax.data import fake
from flowers_jax.data import pipeline
from flowers_jax.data import transforms as tr

T = pytest.importorskip('torchvision.transforms')
torch = pytest.importorskip('torch')
tf = pipeline.import_tf()


@pytest.fixture(scope='module')
def image():
  return fake.render(3, 10, 150, 201, np.random.default_rng(0))  # uint8 [150, 201, 3]


@pytest.mark.parametrize('size,crop', [(73, 64), (256, 224)])
@pytest.mark.parametrize('interp,max_diff', [('bilinear', 1), ('bicubic', 16)])
def test_eval_view_matches_torchvision(image, size, crop, interp, max_diff):
  mode = {'bilinear': T.InterpolationMode.BILINEAR, 'bicubic': T.InterpolationMode.BICUBIC}
  ref = T.Compose([T.Resize(size, interpolation=mode[interp]), T.CenterCrop(crop)])
  ref = np.asarray(ref(Image.fromarray(image))).astype(int)
  ours = tr.center_crop(tr.resize_shorter(tf.constant(image), size, interp), crop).numpy()
  assert ours.shape == ref.shape == (crop, crop, 3) and ours.dtype == np.uint8
  diff = np.abs(ours - ref)
  assert diff.max() <= max_diff and diff.mean() < 0.3


@pytest.mark.parametrize('hw', [(500, 667), (667, 500), (333, 500), (37, 36)])
def test_resize_shorter_size_rounds_like_torchvision(hw):
  ref = T.Resize(256)(Image.new('RGB', hw[::-1])).size[::-1]
  ours = tr.resize_shorter_size(tf.constant(hw + (3,)), 256)
  assert tuple(int(v) for v in ours) == ref


@pytest.mark.parametrize('hw,crop', [((41, 38), 32), ((40, 47), 33), ((33, 64), 32)])
def test_center_crop_offsets_like_torchvision(hw, crop):
  img = np.arange(hw[0] * hw[1] * 3, dtype=np.int64).reshape(hw + (3,)) % 251
  img = img.astype(np.uint8)
  ref = np.asarray(T.CenterCrop(crop)(Image.fromarray(img)))
  top, left, h, w = (int(v) for v in tr.center_crop_window(tf.constant(hw), crop))
  np.testing.assert_array_equal(img[top:top + h, left:left + w], ref)


@pytest.mark.parametrize('hw,crop', [((20, 30), 32), ((13, 40), 32), ((40, 9), 16),
                                     ((7, 8), 12)])
def test_center_crop_pads_a_smaller_image_like_torchvision(hw, crop):
  img = (np.arange(hw[0] * hw[1] * 3, dtype=np.int64).reshape(hw + (3,)) % 251 + 1)
  img = img.astype(np.uint8)
  ref = np.asarray(T.CenterCrop(crop)(Image.fromarray(img)))
  np.testing.assert_array_equal(tr.center_crop(tf.constant(img), crop).numpy(), ref)


def _windows(hw, n, seed=0):
  ds = tf.data.Dataset.range(n).map(lambda i: tf.stack(tr.random_resized_crop_window(
      tf.constant(hw + (3,)), tf.random.experimental.stateless_fold_in([seed, 0], i))))
  return np.stack(list(ds.batch(n).as_numpy_iterator())[0])  # [n, 4]


def test_random_resized_crop_window_statistics():
  """In bounds, in the scale/ratio ranges, and distributed like torchvision's."""
  hw, n = (300, 400), 2000
  ours = _windows(hw, n)
  top, left, h, w = ours.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= hw[0]).all() and (left + w <= hw[1]).all()
  area = h * w / (hw[0] * hw[1])
  ratio = w / h
  assert area.min() > 0.07 and area.max() <= 1.0
  assert ratio.min() > 0.74 and ratio.max() < 1.35
  torch.manual_seed(0)
  ref = np.array([T.RandomResizedCrop.get_params(torch.zeros(3, *hw), [0.08, 1.0],
                                                 [3 / 4, 4 / 3]) for _ in range(n)])
  ref_area = ref[:, 2] * ref[:, 3] / (hw[0] * hw[1])
  ref_ratio = ref[:, 3] / ref[:, 2]
  # Means agree within ~4 standard errors.
  assert abs(area.mean() - ref_area.mean()) < 4 * ref_area.std() / np.sqrt(n) * np.sqrt(2)
  assert abs(np.log(ratio).mean() - np.log(ref_ratio).mean()) < 0.03
  # The window's centre is spread over the image, not stuck to a corner.
  centre_y = (top + h / 2) / hw[0]
  assert 0.45 < centre_y.mean() < 0.55 and centre_y.std() > 0.1
  # Deterministic in the seed, different for another seed.
  np.testing.assert_array_equal(ours, _windows(hw, n))
  assert (ours != _windows(hw, n, seed=1)).any()


@pytest.mark.parametrize('hw', [(10, 200), (200, 10)])
def test_random_resized_crop_fallback_is_torchvision_central_crop(hw):
  ref = T.RandomResizedCrop.get_params(torch.zeros(3, *hw), [0.08, 1.0], [3 / 4, 4 / 3])
  ours = _windows(hw, 3)
  for row in ours:
    assert tuple(row) == tuple(ref)


def test_flip_and_normalize():
  img = tf.constant(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
  flips = [bool((tr.random_flip(img, [s, 0]).numpy() != img.numpy()).any())
           for s in range(200)]
  assert 0.35 < np.mean(flips) < 0.65
  x = np.full((1, 1, 3), 128, np.uint8)
  want = (128 / 255 - np.array(tr.IMAGENET_MEAN)) / np.array(tr.IMAGENET_STD)
  np.testing.assert_allclose(tr.normalize(x).numpy()[0, 0], want, atol=1e-6)
