"""Install keras_drnet: `pip install -e ".[test]"`."""

import setuptools

setuptools.setup(
    name="keras_drnet",
    version="0.1.0",
    description=(
        "DRNet for Keras 3: dissect a trained ConvNet into per-class channel "
        "importance and run only the channels a sub-task needs."
    ),
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["keras_drnet", "keras_drnet.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.4",
        "tensorflow-datasets",
        # tensorflow-datasets 4.9.x imports it on its download path but
        # declares it only for Python < 3.9: without it, the first
        # `tfds.load("cifar10")` fails with ModuleNotFoundError.
        "importlib_resources",
        "numpy",
        "absl-py",
        "matplotlib",
    ],
    entry_points={"console_scripts": ["keras-drnet=keras_drnet.cli:main"]},
    extras_require={
        # keras_drnet.export(format="litert" / "onnx") and their runtimes.
        "export": ["ai-edge-litert", "tf2onnx", "onnx", "onnxruntime"],
        "test": [
            "pytest",
            "pytest-xdist",
            "ai-edge-litert",
            "tf2onnx",
            "onnx",
            "onnxruntime",
        ],
    },
)
