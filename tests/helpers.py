"""Test-only helpers (not part of the toolkit)."""
import torch

from target import load_target


def sharpened_target(name="tiny-qwen3", factor=60.0, **kw):
    """A target whose lm_head is scaled by `factor`: a random tiny target is nearly uniform, a sharpened one is
    peaked like a trained model, so greedy and sampled decoding accept drafts often enough to test."""
    t = load_target(name, **kw)
    head = t.model.get_output_embeddings()
    if head.weight is t.model.get_input_embeddings().weight:  # untie before scaling the head only
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    head.weight.data.mul_(factor)
    return t
