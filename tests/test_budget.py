"""The complexity budget of the README: <= 700 lines per top-level file, <= 5,150 in all."""
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_complexity_budget():
    sizes = {os.path.basename(p): sum(1 for _ in open(p)) for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert sizes, "no top-level python files found"
    too_long = {k: v for k, v in sizes.items() if v > 700}
    assert not too_long, f"files over 700 lines: {too_long}"
    assert sum(sizes.values()) <= 5150, f"top-level python is {sum(sizes.values())} lines > 5150: {sizes}"
