"""Input pipeline: Flowers102 (TFDS or the raw files) or any image folder -> numpy batches.

  ds = data.build(config.data, seed=config.seed)
  ds.num_classes, ds.class_names, ds.num_examples['train' | 'validation' | 'test']
  for batch in ds.train_stream(global_batch, start_step=0, sampler='random'): ...  # endless
  for batch in ds.train_batches(global_batch, epoch, start_step=0, sampler='random'): ...
  for batch in ds.eval_batches('test', global_batch): ...
  # The device path (data.on_device; ``device_pp``, ``device_cache``): no pixels on the host.
  augment = device_pp.Augmenter(ds.device_cache('train'), pp.from_config(ds.config,
                                'pp_train'), strategy)
  for host in ds.device_train_stream(global_batch, start_step=0, sampler='random'):
    batch = augment(strategy.put_batch(host))   # + 'image' (+ 'positive', 'negative')

Batches are dicts of host-local numpy arrays (rows ``[p*b, (p+1)*b)`` of the global
batch on process ``p``, ``b = global_batch / process_count``):
``image`` uint8 [b, S, S, 3] (normalised on the device), ``label`` int32 [b], ``mask``
float32 [b]; triplet batches add ``positive``, ``negative`` [b, S, S, 3] and
``negative_label`` [b]; eval batches add ``id`` int32 [b] (the example id, e.g. the
Flowers102 image number; padding rows repeat position 0 with mask 0).
``device_train_stream`` batches have ``train_stream``'s rows and keys but, instead of the
images, ``pp.PARAMS_KEY`` ('pp_params'): per image key a dict of 'index' int32 [b] (the
position in ``device_cache('train')``) and the random ops' parameters drawn exactly as
``train_stream`` draws them (``pp.Pipeline.draw``: e.g. '0.window' int32 [b, 4], '1.flip'
int32 [b]); ``device_pp.Augmenter`` turns them into the images on the accelerators
(``device_pp.unsupported(pipe)`` names the ops that have no device version).

``config.data`` keys (all required: ``DataConfig.parse`` rejects unknown or missing
keys; defaults in ``flowers_jax.config.base_config()``):
  source                  'tfds' | 'folder' | 'imagefolder' (see ``sources``).
  dir                     folder root, or TFDS data_dir ('' = TFDS default).
  image_size              S, the side of train and eval images.
  pp_train, pp_eval       preprocessing (see ``pp``): a preset or ops joined by '|' on
                          uint8 images, e.g. 'random_resized_crop|flip_lr' or
                          'resize_small(256)|center_crop(224)'. Presets: 'rrc_flip'
                          (RandomResizedCrop, scale 0.08-1, ratio 3/4-4/3, + horizontal
                          flip), 'flip' (eval view + flip), 'none' / 'center_crop' (the
                          eval view). pp_eval may not hold random ops.
  eval_resize             the eval view: shorter side -> eval_resize, center crop S
                          (the default size of ``resize_small``); 0 = round(S * 256 / 224).
  interpolation           'bilinear' | 'bicubic' | 'nearest' | 'area' (antialiased,
                          like PIL); the default method of the resizing ops; '' =
                          bilinear (the loop first fills it from the weights' timm
                          pretrained_cfg, as it does mean / std / eval_resize).
  mean, std               per-channel normalisation of [0, 1] pixels, applied on the
                          device (batches are uint8); () = ImageNet's.
  skip_corrupt            skip undecodable images with a warning (fully decodes every
                          image once at build); False: fail naming the file.
  cache                   keep images in memory: train images decoded when the split's
                          decoded size is <= 1 GiB (``dataset.DECODED_CACHE_BYTES``),
                          else encoded; eval keeps its final crops when they fit in
                          1 GiB and reads encoded bytes from memory.
  threads                 tf.data parallel calls and private pool; 0 = AUTOTUNE.
  prefetch                host batches prefetched by tf.data.
  on_device               'host' | 'device' | 'auto': where train augmentation runs
                          (``device_pp``); device_cache_size: the shorter side of the
                          images held on the device (0 = 2 x S; never enlarged; see
                          ``device_cache``: replicated on every device, ``fits``).

Determinism: epoch ``e``'s global order is ``np.random.default_rng([seed, e])``'s
permutation (train drops the remainder) and each example's augmentation is a
stateless function of ``(seed, e, position)``, so ``train_batches(..., start_step=k)``
yields batches ``k..`` of the uninterrupted run, on any number of hosts. The training
loop reads ``train_stream``: pass ``p`` of the split is epoch ``p``'s order taken whole,
passes back to back (nothing dropped), seeds ``(seed, p, position)``; ``start_step=k``
gives the stream's batches ``k..`` exactly.
Samplers: 'random'; 'triplet' (the random anchors, each with a random positive of its
class and a random negative of another class); 'pk' (P classes x K=pk_k images per
batch). TensorFlow is imported lazily, only here, with its GPUs hidden.
"""

from flowers_jax.data.dataset import build
from flowers_jax.data.dataset import DataConfig
from flowers_jax.data.dataset import Dataset
from flowers_jax.data.fake import make_fake_flowers
from flowers_jax.data.flowers102 import CLASS_NAMES
from flowers_jax.data.transforms import IMAGENET_MEAN
from flowers_jax.data.transforms import IMAGENET_STD

__all__ = ['build', 'DataConfig', 'Dataset', 'make_fake_flowers', 'CLASS_NAMES', 'IMAGENET_MEAN',
           'IMAGENET_STD']
