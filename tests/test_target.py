"""target.py: tapped layers, feature capture, chat masks, the smollm2 alias and bad-input errors."""
import os
import shutil

import pytest
import torch

import target as target_mod
from target import default_layer_ids, load_target

CONV = [{"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2 + 2 = 4.\nAnything else?"}]


def test_default_layer_ids():
    """The rule of DESIGN.md for the targets we ship configs for, and a clear error below 8 layers."""
    assert default_layer_ids(36) == [1, 9, 17, 25, 33]
    assert default_layer_ids(40) == [1, 10, 19, 28, 37]
    assert default_layer_ids(30) == [1, 8, 14, 21, 27]
    with pytest.raises(ValueError, match="at least 8 layers"):
        default_layer_ids(6)


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-llama"])
def test_features_equal_hidden_states(name):
    """taps = HF hidden_states[id+1] in list order, last_hidden = the final normed state, logits match."""
    t = load_target(name, layer_ids=[3, 0, 4])
    ids = torch.randint(0, 250, (2, 17), generator=torch.Generator().manual_seed(0))
    taps, last = t.features(ids)
    out = t.model(ids, output_hidden_states=True)
    ref = torch.cat([out.hidden_states[i + 1] for i in (3, 0, 4)], dim=-1)
    assert taps.shape == (2, 17, 3 * t.config.hidden_size)
    torch.testing.assert_close(taps, ref, rtol=0, atol=0)
    torch.testing.assert_close(last, out.hidden_states[-1], rtol=0, atol=0)
    torch.testing.assert_close(t.logits(last), out.logits, rtol=1e-6, atol=1e-6)


def test_incremental_forward_matches_full():
    """Target.forward with a cache gives the same logits and taps as one full forward."""
    t = load_target("tiny-qwen3")
    ids = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(1))
    logits_a, taps_a, cache = t.forward(ids[:, :8])
    logits_b, taps_b, _ = t.forward(ids[:, 8:], cache=cache)
    logits, taps, _ = t.forward(ids)
    torch.testing.assert_close(torch.cat([logits_a, logits_b], 1), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([taps_a, taps_b], 1), taps, rtol=1e-5, atol=1e-5)


def masked_text(t, conv):
    ex = t.render(conv)
    return t.tokenizer.decode(ex["input_ids"][ex["loss_mask"].bool()]), ex


@pytest.mark.parametrize("n_turns", [2, 4])
def test_qwen3_training_rendering_is_deepspecs(n_turns):
    """Qwen3 targets render training samples as DeepSpec does (REFERENCE.md s.7): the system prompt "You are a
    helpful assistant." first, and each answer's empty think block, content and <|im_end|>\n in the loss mask."""
    t = load_target("tiny-qwen3")
    conv = CONV[:n_turns]
    text, ex = masked_text(t, conv)
    answer = lambda c: "<think>\n\n</think>\n\n" + c + "<|im_end|>\n"  # noqa: E731
    assert text == "".join(answer(m["content"]) for m in conv if m["role"] == "assistant")
    full = t.tokenizer.decode(ex["input_ids"])
    assert full == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + "".join(
        f"<|im_start|>{m['role']}\n" + (answer(m["content"]) if m["role"] == "assistant" else m["content"] + "<|im_end|>\n")
        for m in conv)
    # a sample with its own system prompt keeps it instead
    own = t.tokenizer.decode(t.render([{"role": "system", "content": "Be brief."}] + conv)["input_ids"])
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user") and "helpful" not in own
    # the prompt side of the training text is what generation saw, minus the system prompt (evaluation rendering)
    prompt = t.tokenizer.decode(t.render_prompt(conv[:1]))
    assert full.replace("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", "").startswith(prompt)


def test_gemma4_training_pieces():
    """Gemma-4's training text (GEMMA4.md s.6): <bos>, no system prompt, the empty thought channel after each model
    header outside the mask, the content through <turn|>\n inside it."""
    from target import training_pieces
    pieces = training_pieces(CONV[:2], "gemma4")
    assert "".join(p for p, _ in pieces) == ("<bos><|turn>user\nHi there<turn|>\n<|turn>model\n<|channel>thought\n"
                                             "<channel|>Hello! How can I help?<turn|>\n")
    assert [p for p, masked in pieces if masked] == ["Hello! How can I help?<turn|>\n"]


def test_prompt_rendering_ends_with_generation_prompt():
    """The evaluation prompt ends with the assistant header and, for Qwen3, the empty think block."""
    t = load_target("tiny-qwen3")
    text = t.tokenizer.decode(t.render_prompt(CONV[:3]))
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.fixture(scope="module")
def smollm2():
    return load_target("smollm2")


@pytest.mark.parametrize("n_turns", [2, 4])
def test_loss_mask_smollm2_template(smollm2, n_turns):
    """SmolLM2 template: its default system prompt is kept but never supervised."""
    conv = CONV[:n_turns]
    text, ex = masked_text(smollm2, conv)
    assert text == "".join(m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant")
    assert "You are a helpful AI assistant" in smollm2.tokenizer.decode(ex["input_ids"])


def test_smollm2_matches_gguf(smollm2):
    """The converted fp32 folder continues a fixed prompt exactly like the GGUF loaded directly."""
    from transformers import AutoModelForCausalLM
    gguf_dir, gguf_file = os.path.split(target_mod.smollm2_gguf_path())
    direct = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    ids = smollm2.render_prompt([{"role": "user", "content": "Name three primary colors."}])[None]
    kw = dict(max_new_tokens=12, do_sample=False)
    a = smollm2.model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    b = direct.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(a, b)
    assert smollm2.mask_token_id == 16 and smollm2.layer_ids == [1, 8, 14, 21, 27]


def test_corrupt_smollm2_cache_is_rebuilt(smollm2, tmp_path, monkeypatch, capsys):
    """A damaged converted folder is detected by its digest and rebuilt, not silently used."""
    src = target_mod.smollm2_folder()
    shutil.copytree(src, tmp_path / "smollm2")
    with open(tmp_path / "smollm2" / "config.json", "a") as f:
        f.write(" ")
    monkeypatch.setattr(target_mod, "CACHE_ROOT", str(tmp_path))
    path = target_mod.smollm2_folder()
    assert "corrupt" in capsys.readouterr().out
    assert open(os.path.join(path, "config.json")).read() == open(os.path.join(src, "config.json")).read()


@pytest.mark.parametrize("name,msg", [("./no/such/folder", "neither a local folder"),
                                      ("not-an-alias", "neither a local folder"),
                                      ("nobody-xyz/no-such-model-123", "cannot load 'nobody-xyz/no-such-model-123'")])
def test_bad_target_names(name, msg):
    """A missing path, an unknown alias or an uncached hub id fails with one line naming it."""
    with pytest.raises(SystemExit, match=msg) as e:
        load_target(name)
    assert "\n" not in str(e.value)
