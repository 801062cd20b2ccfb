"""Training data for Lumos: Moving Fashion-MNIST, users' video folders and token shards.

**Moving Fashion-MNIST** is our synthetic text-to-video world. Each clip is ``T`` frames of a
black ``size x size`` canvas on which 1..``max_items`` *real* Fashion-MNIST images (read from
the Debian package ``dataset-fashion-mnist``) are colourised (grayscale x an RGB colour; two
items are composited with a per-pixel ``max``) and move in a straight line, bouncing off the
walls. Every item is a triple ``(class, colour, direction)`` plus a speed.

Caption grammar (lower case, no final period; built by :func:`build_caption`, inverted by
:func:`parse_caption`)::

    video caption := clause (" while " clause)*
    clause        := ARTICLE " " COLOUR " " CLASS " " VERB [" " SPEED]
    image caption := noun (" and " noun)*          (1-frame clips, no motion)
    noun          := ARTICLE " " COLOUR " " CLASS
    ARTICLE       := "a" | "an"                      ("an" before a vowel: "an orange bag")
    COLOUR        := red | green | blue | yellow | cyan | magenta | orange | white
    CLASS         := t-shirt | trouser | pullover | dress | coat | sandal | shirt | sneaker
                   | bag | ankle boot
    VERB          := "moves left" | "moves right" | "rises" | "falls"
                     (directions left / right / up / down; "rises" = up the screen)
    SPEED         := "slowly" | "quickly"            (1 / 3 pixels per frame by default)

e.g. ``"a red sneaker moves left quickly while a blue bag falls slowly"`` and, for images,
``"a red sneaker and a blue bag"``. The speed word is included unless
``MovingFashionConfig.caption_speed`` is false. The verb names the *initial* direction:
items start far enough from the wall ahead to keep that direction for at least the first
half of the clip, then bounce (reverse) at the borders.

**Held-out combinations** (:data:`HELD_OUT`): the 32 of the 320 ``(class, colour, direction)``
triples with ``(class_index + 3 * colour_index + direction_index) % 10 == 0`` (indices into
:data:`CLASSES`, :data:`COLOURS`, :data:`DIRECTIONS`). They never appear in the ``"train"``
split; every class, colour and direction, and every *pair* of them, still does. Splits:
``"train"`` (seen triples, FMNIST train images), ``"test"`` (seen triples, FMNIST test
images), ``"heldout"`` (only held-out triples, FMNIST test images).

**Users' data**: :class:`VideoFolderDataset` reads a folder of videos with same-stem ``.txt``
captions, or a CSV with ``path,caption`` columns.

**Token shards**: :func:`write_shards` stores pre-tokenised clips (video codes from a
tokenizer callable, text ids from a text tokenizer callable) as flat memory-mappable ``.npy``
files; :class:`ShardDataset` reads them back with ``np.load(mmap_mode="r")``.

The package has one concern per module: :mod:`~lumos.data.vocab` (classes, colours, directions,
held-out triples), :mod:`~lumos.data.fmnist` (reading Fashion-MNIST),
:mod:`~lumos.data.captions` (the caption grammar), :mod:`~lumos.data.render` (clips and the
dataset), :mod:`~lumos.data.prompts` (evaluation prompts), :mod:`~lumos.data.folders` (users'
videos) and :mod:`~lumos.data.shards` (token shards). Every public name is re-exported here.
"""

from lumos.data.captions import build_caption, parse_caption, parse_caption_items
from lumos.data.fmnist import FMNIST_DEFAULT_DIR, FMNIST_ENV, load_fashion_mnist
from lumos.data.folders import VideoFolderDataset
from lumos.data.prompts import eval_prompts
from lumos.data.render import (
    Clip,
    Item,
    MovingFashionConfig,
    MovingFashionDataset,
    collate_clips,
    make_clip,
)
from lumos.data.shards import MANIFEST, SHARD_FORMAT, SHARD_VERSION, ShardDataset, write_shards
from lumos.data.vocab import (
    CLASSES,
    COLOURS,
    DIRECTION_VECTORS,
    DIRECTION_VERBS,
    DIRECTIONS,
    HELD_OUT,
    SPEEDS,
    SPLITS,
    ItemSpec,
    is_held_out,
)

__all__ = [
    "FMNIST_DEFAULT_DIR",
    "FMNIST_ENV",
    "CLASSES",
    "COLOURS",
    "DIRECTIONS",
    "DIRECTION_VERBS",
    "DIRECTION_VECTORS",
    "SPEEDS",
    "HELD_OUT",
    "SPLITS",
    "load_fashion_mnist",
    "is_held_out",
    "ItemSpec",
    "Item",
    "Clip",
    "MovingFashionConfig",
    "build_caption",
    "make_clip",
    "MovingFashionDataset",
    "collate_clips",
    "parse_caption",
    "parse_caption_items",
    "eval_prompts",
    "VideoFolderDataset",
    "write_shards",
    "ShardDataset",
    "SHARD_FORMAT",
    "SHARD_VERSION",
    "MANIFEST",
]
