"""`python -m keras_drnet` runs the `keras-drnet` command line."""

from keras_drnet.cli import main

main()
