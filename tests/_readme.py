"""The README's python code blocks, for the tests that run them as written."""

import os

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme_blocks(after, count):
    """The first `count` python code blocks of README.md after `after`."""
    text = open(README).read()
    text = text[text.index(after):]
    blocks = []
    while len(blocks) < count:
        start = text.index("```python\n") + len("```python\n")
        end = text.index("```", start)
        blocks.append(text[start:end])
        text = text[end + 3:]
    return blocks
