"""Lightning data modules for the benchmarks of the flow literature, read from local files.

Every dataset yields ``(image, label)``: the image an integer tensor (uint8) of shape (C, H, W)
with values in [0, num_bins - 1], the label an int64 class index (-1 where a dataset has none:
CelebA, CelebA-HQ). Dequantization happens in the model.

Where the files live, under ``data.root`` (default ``$NFCV_DATA``, else ``./data``):

==============  ================================================================================
``digits``      inside scikit-learn (no files to fetch)
``mnist``       ``ROOT/MNIST/raw/`` (torchvision's layout: the four IDX files, uncompressed), or
                the four original ``.gz`` files directly in ROOT (staged once under $NFCV_CACHE)
``fashion_``    the same with ``ROOT/FashionMNIST/raw/``
``mnist``
``cifar10``     ``ROOT/cifar-10-batches-py/``: ``data_batch_1..5``, ``test_batch``,
                ``batches.meta`` (the python pickle batches)
``cifar100``    ``ROOT/cifar-100-python/``: ``train``, ``test``, ``meta``
``svhn``        ``ROOT/svhn/``: ``train_32x32.mat``, ``test_32x32.mat`` (``extra_32x32.mat``)
``celeba``,     ``ROOT/celeba/``: ``img_align_celeba/*.jpg`` and torchvision's five text files
``celeba64``    (``list_eval_partition.txt``, ``list_attr_celeba.txt``, ``identity_CelebA.txt``,
                ``list_bbox_celeba.txt``, ``list_landmarks_align_celeba.txt``)
``celeba_hq``   ``ROOT/celeba_hq/``: the 30,000 CelebA-HQ images as image files named by their
                index (``0.png`` or ``00000.jpg`` ... ``29999``), square, at any power-of-two
                multiple of the configured size (1024 x 1024 as released)
``imagenet32``  ``ROOT/imagenet32/``: ``train_data_batch_1..10.npz`` and ``val_data.npz``
``imagenet64``  ``ROOT/imagenet64/``: the same names at 64 x 64
``folder``      ``data.root`` is an image folder in torchvision's ImageFolder layout:
                ``ROOT/<class>/<image>``
==============  ================================================================================

Nothing is downloaded unless ``data.download=true``; missing files give one `DataError` naming
the expected paths and the command that fetches them (``python scripts/prepare_data.py NAME
ROOT``, on a machine with internet). Every source file is read once at setup: hashed (sha256 and
MD5, checked against torchvision's MD5s where it lists them and ``verify`` is on), image files
decoded, the results cached in ``$NFCV_CACHE/files/`` keyed by path, size and modification time;
a truncated or corrupt file fails at setup with its name. `ImageDataModule.describe` records the
dataset, its split sizes, image shape, levels, preprocessing and the sha256 of its files, so two
bits-per-dim figures can be compared knowing they are on the same data.
"""

from nfcv.data.base import ImageDataModule, LocalDataModule
from nfcv.data.celeba import CelebADataModule, CelebAHQDataModule
from nfcv.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from nfcv.data.digits import DigitsDataModule
from nfcv.data.files import NO_LABEL, SPLITS, FileRecord, check_files, default_cache
from nfcv.data.folder import FolderDataModule
from nfcv.data.imagenet import ImageNetDataModule
from nfcv.data.images import ImageTensorDataset, NpyImages, reduce_bits
from nfcv.data.mnist import FashionMNISTDataModule, MNISTDataModule
from nfcv.data.svhn import SVHNDataModule

__all__ = [
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "CelebADataModule",
    "CelebAHQDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "FileRecord",
    "FolderDataModule",
    "ImageDataModule",
    "ImageNetDataModule",
    "ImageTensorDataset",
    "LocalDataModule",
    "MNISTDataModule",
    "NO_LABEL",
    "NpyImages",
    "SPLITS",
    "SVHNDataModule",
    "check_files",
    "default_cache",
    "reduce_bits",
]
