"""The names a training option can take: one tuple per idea, importable without TensorFlow.

The modules that implement each choice import their tuple from here (models.py the
backbones and strategies, train.py the classifiers and stages, roi.py the ROI modes,
sources.py the class weightings), and the command line offers exactly these, so a name
added here is a name `thyroid-cad train` accepts. Keep this module free of imports.
"""

BACKBONES = (
    "tiny",
    "unet",
    "vgg16",
    "vgg19",
    "resnet50",
    "efficientnetb0",
    "mobilenetv2",
    "squeezenet",
)
STRATEGIES = ("frozen", "partial", "full", "two-phase")
CLASSIFIERS = ("softmax", "svm", "rf", "logreg")
# Classifiers that live in the network's own head (models.CamHead): the logistic
# regression probe is fitted on pooled features, then written into the head's weights
# (models.fold_linear_probe). They export with the heatmap, TTA and ensembles; SVM and
# RF export as a scikit-learn graph after the features, without a heatmap.
HEAD_CLASSIFIERS = ("softmax", "logreg")
# What a training run's images are: thyroid ultrasound, or the radiograph stage of
# progressive transfer.
STAGES = ("thyroid", "radiograph")
ROI_MODES = ("off", "annotations", "localiser")
# --class-weights: 'global' balances classes over the training set; 'source' balances
# them within every source and gives every source the same total weight.
CLASS_WEIGHTINGS = ("global", "source")
# --tta / export --tta: test-time augmentation views averaged in the graph (training/tta.py).
TTA_MODES = ("none", "flips", "full")
