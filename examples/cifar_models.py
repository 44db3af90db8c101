"""The paper's CIFAR networks, with a width multiplier.

VGG16 with BatchNormalization as used for CIFAR (13 convs, then one Dense:
14.73M parameters at width 1, the paper's Table 1) and a CIFAR ResNet18
(11.17M parameters at width 1, Table 2).
"""

import keras

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
          512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_cifar(width=1.0, classes=10, name="vgg16_cifar"):
    x = inputs = keras.Input((32, 32, 3))
    block, index = 1, 1
    for entry in _VGG16:
        if entry == "M":
            x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
            block, index = block + 1, 1
            continue
        prefix = f"block{block}_conv{index}"
        x = keras.layers.Conv2D(
            max(1, int(entry * width)), 3, padding="same", use_bias=False,
            name=prefix,
        )(x)
        x = keras.layers.BatchNormalization(name=f"{prefix}_bn")(x)
        x = keras.layers.ReLU(name=f"{prefix}_relu")(x)
        index += 1
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


def _basic_block(x, filters, stride, name):
    shortcut = x
    y = keras.layers.Conv2D(filters, 3, stride, padding="same",
                            use_bias=False, name=f"{name}_conv1")(x)
    y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                            name=f"{name}_conv2")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, stride, use_bias=False,
                                       name=f"{name}_shortcut")(shortcut)
        shortcut = keras.layers.BatchNormalization(
            name=f"{name}_shortcut_bn")(shortcut)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def resnet18_cifar(width=1.0, classes=10, name="resnet18_cifar"):
    x = inputs = keras.Input((32, 32, 3))
    filters = [max(1, int(f * width)) for f in (64, 128, 256, 512)]
    x = keras.layers.Conv2D(filters[0], 3, padding="same", use_bias=False,
                            name="stem_conv")(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for stage, f in enumerate(filters):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, f, stride, f"stage{stage + 1}_block{block + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)
