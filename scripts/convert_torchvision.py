"""Converts torchvision weights into a Flax (orbax) checkpoint directory.

    python scripts/convert_torchvision.py --model resnet18 --weights resnet18.pth --out ckpt/r18
    python scripts/convert_torchvision.py --model vit_b16 --download --out ckpt/vit \
        --num-classes 102
    python scripts/convert_torchvision.py --model resnet18 --weights r18.pth --out ckpt/r18d \
        --option deform=after_conv1

`--download` fetches torchvision's DEFAULT weights (needs network and the torch extra).
Read the result with `flowers_jax.convert.load_variables(DIR)`, or pass DIR wherever a
torchvision state_dict is accepted (`convert.torchvision_to_flax(name, DIR, ...)`): training
then needs no torch.
"""

from __future__ import annotations

import argparse
import ast
import sys

from flowers_jax import convert
from flowers_jax import models


def parse_option(text: str) -> tuple[str, object]:
  """'key=value' -> (key, python literal or the raw string)."""
  key, sep, value = text.partition('=')
  if not sep:
    raise argparse.ArgumentTypeError(f'--option wants key=value, got {text!r}')
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', required=True, choices=models.names())
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--weights', help='torchvision state_dict file (.pth)')
  source.add_argument('--download', action='store_true',
                      help="torchvision's DEFAULT pretrained weights")
  parser.add_argument('--out', required=True, help='new checkpoint directory')
  parser.add_argument('--num-classes', type=int, default=None,
                      help="head size (default: the checkpoint's); another size "
                           'initialises a new head')
  parser.add_argument('--option', type=parse_option, action='append', default=[],
                      help='model option key=value (repeatable), e.g. deform=after_conv1')
  parser.add_argument('--allow-partial', action='store_true',
                      help='load the tensors that match and initialise the rest (default: '
                           'stop unless every backbone tensor loads)')
  parser.add_argument('--seed', type=int, default=0, help='seed of new leaves')
  parser.add_argument('--force', action='store_true', help='overwrite --out')
  return parser.parse_args(argv)


def download(name: str):
  """torchvision's DEFAULT pretrained state_dict for the registered model `name` (from torch's
  hub cache when it is there); SystemExit with one line when it cannot be fetched."""
  import torch
  import torchvision
  tv_name = models.spec(name).torchvision
  weights = torchvision.models.get_model_weights(tv_name).DEFAULT
  try:
    return torchvision.models.get_model(tv_name, weights=weights).state_dict()
  except OSError as e:  # urllib's URLError, a refused or timed-out connection, a full disk
    reason = getattr(e, 'reason', None) or e
    raise SystemExit(
        f'error: cannot download {weights.url} ({reason}); without network, fetch that file '
        f'elsewhere and pass it with --weights FILE, or put it in '
        f'{torch.hub.get_dir()}/checkpoints/') from None


def main(argv=None) -> convert.Report:
  import jax

  args = parse_args(sys.argv[1:] if argv is None else argv)
  options = dict(args.option)
  state_dict = download(args.model) if args.download else args.weights
  try:
    variables, report = convert.torchvision_to_flax(
        args.model, state_dict, args.num_classes, rng=jax.random.PRNGKey(args.seed),
        allow_partial=args.allow_partial, **options)
  except (ValueError, FileNotFoundError) as e:  # one line, no traceback
    raise SystemExit(f'error: {e}') from None
  num_classes = convert.head_classes(args.model, variables)
  convert.save_variables(args.out, variables, model=args.model, num_classes=num_classes,
                         options=options, report=report, force=args.force)
  print(report.summary())
  print(f'wrote {args.out}')
  return report


if __name__ == '__main__':
  main()
