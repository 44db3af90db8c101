"""The one rule for a tensor's channel axis."""


def channel_axis(tensor, channels_first):
    """The channel axis of a tensor: 1 for channels_first maps, else last."""
    rank = len(tensor.shape)
    return 1 if channels_first and rank > 2 else rank - 1


def channels(tensor, channels_first):
    """The size of a tensor's channel axis."""
    return int(tensor.shape[channel_axis(tensor, channels_first)])
