"""Parity of flowers_jax.models.layers.deform with torchvision.ops.deform_conv2d."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowers_jax.models.layers import deform, torch_init

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')


@dataclasses.dataclass(frozen=True)
class Case:
  """One deform_conv2d configuration; `offsets` is 'fractional' (U(-1, 1)), 'large'
  (U(-3, 3): samples leave the image) or 'integer' (integers in [-3, 3], so samples sit
  exactly on pixels and on the -1 / H borders)."""
  name: str
  c_in: int = 4
  c_out: int = 6
  size: tuple = (7, 9)
  kernel: tuple = (3, 3)
  stride: tuple = (1, 1)
  padding: tuple = (1, 1)
  dilation: tuple = (1, 1)
  offset_groups: int = 1
  groups: int = 1
  mask: bool = False
  offsets: str = 'fractional'
  batch: int = 2

  @property
  def out_size(self):
    return tuple(deform.output_size(*a) for a in zip(
        self.size, self.kernel, self.stride, self.padding, self.dilation))


CASES = [
    Case('plain'),
    Case('large_mask_g2', size=(8, 10), padding=(0, 0), offset_groups=2, mask=True,
         offsets='large'),
    Case('stride2_pad2_groups', c_in=6, c_out=4, size=(11, 9), stride=(2, 2),
         padding=(2, 2), groups=2, mask=True, offsets='large'),
    Case('nonsquare_dilated', c_out=4, size=(9, 11), kernel=(2, 3), stride=(1, 2),
         padding=(1, 2), dilation=(2, 2), offset_groups=2, groups=2),
    Case('integer_mask', size=(7, 8), mask=True, offsets='integer'),
    Case('integer_strided', c_out=4, size=(10, 7), kernel=(3, 2), stride=(2, 2),
         padding=(2, 0), dilation=(2, 1), offset_groups=2, groups=2, offsets='integer'),
    Case('conv1_like_7x7', c_in=3, c_out=4, size=(11, 11), kernel=(7, 7), stride=(2, 2),
         padding=(3, 3), mask=True, offsets='large'),
]
IDS = [c.name for c in CASES]


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _arrays(case: Case, dtype, seed=0):
  """Random operands in torch layout (NCHW, OIHW) as numpy arrays."""
  rng = np.random.default_rng(seed)
  (h, w), (kh, kw), (ho, wo) = case.size, case.kernel, case.out_size
  g, taps = case.offset_groups, kh * kw
  off_shape = (case.batch, 2 * g * taps, ho, wo)
  offset = {'fractional': lambda: rng.uniform(-1, 1, off_shape),
            'large': lambda: rng.uniform(-3, 3, off_shape),
            'integer': lambda: rng.integers(-3, 4, off_shape).astype(float)}[case.offsets]()
  arrays = dict(
      x=rng.normal(size=(case.batch, case.c_in, h, w)),
      offset=offset,
      weight=rng.normal(size=(case.c_out, case.c_in // case.groups, kh, kw)),
      bias=rng.normal(size=(case.c_out,)),
      mask=rng.uniform(0, 1, (case.batch, g * taps, ho, wo)) if case.mask else None,
      cotangent=rng.normal(size=(case.batch, case.c_out, ho, wo)))
  return {k: None if v is None else v.astype(dtype) for k, v in arrays.items()}


_NCHW_TO_NHWC = {'x': (0, 2, 3, 1), 'offset': (0, 2, 3, 1), 'mask': (0, 2, 3, 1),
                 'weight': (2, 3, 1, 0), 'bias': (0,), 'cotangent': (0, 2, 3, 1)}
_OPERANDS = ('x', 'offset', 'weight', 'bias', 'mask')


def _to_jax(name, a):
  return None if a is None else jnp.asarray(a.transpose(_NCHW_TO_NHWC[name]))


def _to_torch_layout(name, a):
  return np.asarray(a).transpose(np.argsort(_NCHW_TO_NHWC[name]))


def _torch_forward_and_grads(case, arrays):
  t = {k: None if arrays[k] is None else torch.tensor(arrays[k], requires_grad=True)
       for k in _OPERANDS}
  out = torchvision.ops.deform_conv2d(
      t['x'], t['offset'], t['weight'], t['bias'], stride=case.stride,
      padding=case.padding, dilation=case.dilation, mask=t['mask'])
  names = [k for k in _OPERANDS if t[k] is not None]
  grads = torch.autograd.grad(out, [t[k] for k in names], torch.tensor(arrays['cotangent']))
  return out.detach().numpy(), {k: g.numpy() for k, g in zip(names, grads)}


def _jax_forward_and_grads(case, arrays):
  j = {k: _to_jax(k, arrays[k]) for k in _OPERANDS}

  def f(x, offset, weight, bias, mask):
    return deform.deform_conv2d(x, offset, weight, bias, mask, stride=case.stride,
                                padding=case.padding, dilation=case.dilation)

  out, vjp = jax.vjp(jax.jit(f), *(j[k] for k in _OPERANDS))
  grads = vjp(_to_jax('cotangent', arrays['cotangent']))
  return (_to_torch_layout('x', out),
          {k: _to_torch_layout(k, g) for k, g in zip(_OPERANDS, grads) if g is not None})


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_float64_forward_and_gradients_match_torchvision(case, x64):
  arrays = _arrays(case, np.float64)
  out, grads = _jax_forward_and_grads(case, arrays)
  ref_out, ref_grads = _torch_forward_and_grads(case, arrays)
  assert out.dtype == np.float64
  np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-10)
  assert sorted(grads) == sorted(ref_grads)
  for name in ref_grads:
    assert np.abs(ref_grads[name]).max() > 0, name  # the comparison is not vacuous
    np.testing.assert_allclose(grads[name], ref_grads[name], rtol=0, atol=1e-10,
                               err_msg=f'gradient w.r.t. {name}')


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_float32_forward_and_gradients_match_torchvision(case):
  arrays = _arrays(case, np.float32, seed=1)
  out, grads = _jax_forward_and_grads(case, arrays)
  ref_out, ref_grads = _torch_forward_and_grads(case, arrays)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-4)
  for name in ref_grads:
    scale = max(1.0, np.abs(ref_grads[name]).max())
    np.testing.assert_allclose(grads[name], ref_grads[name], rtol=0, atol=1e-5 * scale,
                               err_msg=f'gradient w.r.t. {name}')


@pytest.mark.parametrize('case', [c for c in CASES if c.offsets != 'integer'],
                         ids=lambda c: c.name)
def test_zero_offsets_and_unit_mask_equal_plain_conv(case, x64):
  arrays = _arrays(case, np.float64)
  x, kernel = _to_jax('x', arrays['x']), _to_jax('weight', arrays['weight'])
  offset = jnp.zeros((case.batch, *case.out_size, 2 * case.offset_groups * np.prod(case.kernel)))
  mask = jnp.ones(offset.shape[:-1] + (offset.shape[-1] // 2,)) if case.mask else None
  conv = jax.jit(lambda x, offset, kernel, mask: deform.deform_conv2d(
      x, offset, kernel, mask=mask, stride=case.stride, padding=case.padding,
      dilation=case.dilation))
  out = conv(x, offset, kernel, mask)
  ref = jax.lax.conv_general_dilated(
      x, kernel, case.stride, [(p, p) for p in case.padding], rhs_dilation=case.dilation,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=case.groups)
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize('strides,padding,use_mask', [(1, 1, False), (2, 3, True)])
def test_deform_conv_module_equals_plain_conv_at_init(strides, padding, use_mask):
  kernel_size = 3 if padding == 1 else 7
  layer = deform.DeformConv(6, kernel_size, strides=strides, padding=padding,
                            offset_groups=2, use_mask=use_mask,
                            bias_init=torch_init.uniform_fan_in(kernel_size ** 2 * 4))
  x = jax.random.normal(jax.random.key(0), (2, 11, 9, 4))
  variables = jax.jit(layer.init)(jax.random.key(1), x)
  params = variables['params']
  assert sorted(params) == ['bias', 'kernel', 'offset']
  assert params['kernel'].shape == (kernel_size, kernel_size, 4, 6)
  offset_groups, taps = 2, kernel_size ** 2  # G*K (dy, dx) pairs (+ G*K mask logits)
  assert params['offset']['kernel'].shape[-1] == offset_groups * taps * (3 if use_mask else 2)
  assert np.abs(params['bias']).max() > 0
  out = jax.jit(layer.apply)(variables, x)
  ref = jax.lax.conv_general_dilated(
      x, params['kernel'], (strides, strides), [(padding, padding)] * 2,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + params['bias']
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)

  # The floor + fraction form gives the zero-initialised offset predictor a gradient
  # at init (the tent form max(0, 1 - |y - k|) would not).
  grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({'params': p}, x) ** 2)))(params)
  assert np.abs(grads['offset']['kernel']).max() > 1e-3


def test_module_bf16_runs_and_stays_close():
  layer = deform.DeformConv(4, 3, padding=1, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
  variables = jax.jit(layer.init)(jax.random.key(1), x)
  out = jax.jit(layer.apply)(variables, x)
  ref = jax.jit(deform.DeformConv(4, 3, padding=1).apply)(variables, x)
  assert out.dtype == jnp.bfloat16
  assert variables['params']['kernel'].dtype == jnp.float32
  np.testing.assert_allclose(out.astype(np.float32), ref, atol=0.1)


@pytest.mark.parametrize('what,shape,match', [
    ('offset', (2, 7, 9, 17), 'multiple of 2 \\* kh \\* kw = 18'),
    ('offset', (2, 6, 9, 18),
     'offset must have shape .* = \\(2, 7, 9, 18\\), got \\(2, 6, 9, 18\\)'),
    ('mask', (2, 7, 9, 18), 'mask must have shape .* = \\(2, 7, 9, 9\\)'),
    ('kernel', (3, 3, 3, 6), 'must divide C_in = 4'),
    ('bias', (5,), 'bias must have shape \\[C_out\\] = \\(6,\\)'),
])
def test_bad_shapes_raise_clear_errors(what, shape, match):
  operands = dict(x=jnp.zeros((2, 7, 9, 4)), offset=jnp.zeros((2, 7, 9, 18)),
                  kernel=jnp.zeros((3, 3, 4, 6)), bias=None, mask=None)
  operands[what] = jnp.zeros(shape)
  with pytest.raises(ValueError, match=match):
    deform.deform_conv2d(**operands, padding=1)
