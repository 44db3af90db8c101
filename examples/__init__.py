"""Examples and studies; `cifar_models` holds the models they and the
benchmarks share (`from examples import cifar_models`)."""
