"""Evaluation of text-to-video models on Moving Fashion-MNIST prompts (``lumos eval``).

Three parts:

1. **Classifier**: a small CNN (:class:`FashionClassifier`, ~130k parameters) of the ten
   Fashion-MNIST classes, trained on the real FMNIST train split (grayscale 28x28) by
   :func:`train_classifier` and shipped in ``assets/classifier/`` (``classifier.safetensors`` +
   ``classifier.json`` holding its t10k test accuracy); :func:`load_classifier` reads it. Its
   penultimate activations (:meth:`FashionClassifier.features`, 128-d) are the feature space of
   the Frechet distance.
2. **Tracker** (:func:`track_items`): every pixel whose brightness (max over channels) reaches a
   threshold is given the colour of :data:`~lumos.data.COLOURS` with the nearest hue (largest
   cosine between RGB vectors); the black background is ignored. Per colour and frame, the
   item-sized window holding most of that colour's pixels locates the item (the colour counts as
   present if the window holds enough pixels and most of the colour's pixels in the frame, and
   the frame has a mostly black background, so coloured noise does not count); its centroid
   and bounding box follow, and a 28x28 grayscale crop (max over channels / the colour's scale)
   centred on the box is classified.
   The direction is the sign of the larger component of the centroid velocity fitted over the
   first half of the clip (before any bounce); identity consistency is the fraction of frames
   where the colour is present and the predicted class equals the item's majority class.
3. **Scores**: :func:`score_clip` (one clip against its caption's item specs),
   :func:`evaluate` (generate a clip per prompt of :func:`~lumos.data.eval_prompts` and
   aggregate, plus Frechet distances to real clips of the same specs), :func:`evaluate_real`
   (the same on real clips from :func:`~lumos.data.make_clip`: the ceiling of every score, and a
   check of the tracker) and :func:`main` (the ``lumos eval`` command).

Modules, one concern each: :mod:`~lumos.evaluate.classifier`, :mod:`~lumos.evaluate.tracker`,
:mod:`~lumos.evaluate.metrics` (per-clip scores, features, Frechet distance),
:mod:`~lumos.evaluate.run` (prompts, generation, aggregation), :mod:`~lumos.evaluate.compare`
(two runs on the same seeds, item by item: ``lumos eval --against``) and
:mod:`~lumos.evaluate.cli` (``lumos eval``). Every public name is re-exported here.
"""

from lumos.evaluate.classifier import (
    CLASSIFIER_DIR,
    META_FILE,
    WEIGHTS_FILE,
    FashionClassifier,
    classifier_accuracy,
    load_classifier,
    train_classifier,
)
from lumos.evaluate.cli import (
    format_comparison,
    format_confusion,
    format_per_frame,
    format_table,
    main,
)
from lumos.evaluate.compare import compare_results, paired_difference
from lumos.evaluate.metrics import (
    METRICS,
    clip_features,
    confusion,
    frechet_distance,
    motion,
    per_frame,
    score_clip,
)
from lumos.evaluate.run import evaluate, evaluate_real, evaluate_tokenizer, select_prompts
from lumos.evaluate.tracker import ItemTrack, assign_colours, track_items

__all__ = [
    "CLASSIFIER_DIR",
    "FashionClassifier",
    "train_classifier",
    "load_classifier",
    "classifier_accuracy",
    "ItemTrack",
    "assign_colours",
    "track_items",
    "score_clip",
    "clip_features",
    "frechet_distance",
    "select_prompts",
    "evaluate",
    "evaluate_real",
    "main",
    "format_table",
    "format_confusion",
    "format_per_frame",
    "confusion",
    "per_frame",
    "motion",
    "evaluate_tokenizer",
    "METRICS",
    "paired_difference",
    "compare_results",
    "format_comparison",
    "WEIGHTS_FILE",
    "META_FILE",
]
